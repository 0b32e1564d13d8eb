"""DDPNOpt Table 3 on WINE, IRIS and DIGITS: every baseline beside its DDP version.

    python experiments/ddpnopt_table3.py [--datasets wine,iris,digits] [--seeds 5]
        [--out runs/experiments/ddpnopt_table3]

DDPNOpt (arXiv 2020) Table 3, the rows of the embedded datasets: final
training loss and test accuracy of SGD, RMSprop, KFAC, EKFAC and of the DDP
optimizers DDP-SGD, DDP-RMSprop, DDP-EKFAC and vanilla DDP. Networks as its
Appendix D: fully connected, tanh, 4 hidden layers and a linear prediction
layer, hidden width 10 (WINE, IRIS) or 32 (DIGITS), batch 32 (WINE, IRIS) or 8
(DIGITS). Here:

* SGD / RMSprop: ``optax.sgd`` / ``optax.rmsprop`` on ``jax.grad``;
  KFAC / EKFAC: ``olne-kfac`` / ``olne-ekfac`` (the open-loop solver with the
  Kronecker curvature of the empirical Fisher, refreshed every 10 steps);
* DDP-SGD / DDP-RMSprop / DDP-EKFAC: ``fne`` with the identity, RMSprop and
  EKFAC curvatures; vanilla DDP: ``fne`` with the ``dense`` curvature (the
  layer's full Gauss-Newton ``Q_uu``, inverted).

Learning rates are the main job's defaults (the paper tunes each and does not
list them): 0.1 (SGD), 1e-3 (RMSprop), 0.03 (KFAC, EKFAC), 0.3 (dense).
Vanilla DDP inverts each layer's full ``Q_uu`` every step; it is skipped
where a layer has more than ``--dense-max-params`` params (default 2000: on
DIGITS the first layer has 2080, and 5 seeds × 2000 steps of 2080² solves take
most of an hour on a 2-core CPU). Not as in the paper: WINE's prediction layer is linear with the softmax
cross-entropy (the paper uses a sigmoid there); KWNG is not run. Writes
``<out>.md`` and ``<out>.json``.
"""

from __future__ import annotations

import argparse
import platform
import time

import jax

import dgnopt_jax as dgnopt
from dgnopt_jax import datasets

from common import batch_streams, make_run, mean_std, seeds_of, write_outputs

G = dgnopt.games

# (column, optimizer name, learning rate)
OPTIMIZERS = (("SGD", "sgd", 0.1), ("RMSprop", "rmsprop", 1e-3), ("KFAC", "olne-kfac", 0.03),
              ("EKFAC", "olne-ekfac", 0.03), ("DDP-SGD", "fne-sgd", 0.1),
              ("DDP-RMSprop", "fne-rmsprop", 1e-3), ("DDP-EKFAC", "fne-ekfac", 0.03),
              ("DDP", "fne-dense", 0.3))
# DDPNOpt Table 3: dataset -> column -> (train loss, test accuracy %).
PAPER = {
    "wine": {"SGD": (0.5654, 94.35), "RMSprop": (0.5515, 98.10), "KFAC": (0.5601, 97.78),
             "EKFAC": (0.5610, 94.60), "DDP-SGD": (0.5657, 94.29),
             "DDP-RMSprop": (0.5515, 98.10), "DDP-EKFAC": (0.5610, 94.60),
             "DDP": (0.5649, 98.00)},
    "iris": {"SGD": (0.0514, 93.00), "RMSprop": (0.0942, 91.48), "KFAC": (0.0588, 94.28),
             "EKFAC": (0.0514, 94.86), "DDP-SGD": (0.0505, 93.79),
             "DDP-RMSprop": (0.0515, 94.81), "DDP-EKFAC": (0.0567, 92.72),
             "DDP": (0.0552, 94.44)},
    "digits": {"SGD": (0.0400, 95.28), "RMSprop": (0.0562, 94.52), "KFAC": (0.4474, 84.61),
               "EKFAC": (0.0864, 94.53), "DDP-SGD": (0.0364, 95.43),
               "DDP-RMSprop": (0.0450, 94.71), "DDP-EKFAC": (0.0666, 95.36),
               "DDP": (0.2197, 91.94)},
}
SETUP = {"wine": (10, 32, 400), "iris": (10, 32, 400), "digits": (32, 8, 2000)}  # width, batch, steps


def make_game(name: str, data: datasets.Dataset) -> G.Game:
  width = SETUP[name][0]
  return G.sequential([G.Dense(width, "tanh") for _ in range(4)] + [G.Dense(data.num_classes)],
                      data.x_train.shape[1:], loss="softmax_cross_entropy")


def markdown(results: dict, names: list[str], args, seconds: float) -> str:
  lines = [f"Fully connected tanh networks (4 hidden layers), {args.seeds} seeds, mean ± std; "
           f"cells: test accuracy (%) / final training loss; the paper's values "
           f"(DDPNOpt Table 3) in brackets. {platform.machine()} CPU, jax {jax.__version__}, "
           f"{seconds / 60:.1f} min.", "",
           "| dataset (width, batch, steps) | " + " | ".join(c for c, _, _ in OPTIMIZERS) + " |",
           "|---" * (len(OPTIMIZERS) + 1) + "|"]
  for name in names:
    width, batch, steps = SETUP[name][0], SETUP[name][1], args.steps or SETUP[name][2]
    cells = []
    for column, _, _ in OPTIMIZERS:
      r = results.get((name, column))
      loss_p, acc_p = PAPER[name][column]
      if r is None:
        cells.append(f"not run [{acc_p:.2f}] / [{loss_p:.4f}]")
        continue
      cells.append(f"{mean_std(r['accuracy'], 2)} [{acc_p:.2f}] / "
                   f"{mean_std(r['loss'], 4)} [{loss_p:.4f}]")
    lines.append(f"| {name} ({width}, {batch}, {steps}) | " + " | ".join(cells) + " |")
  lines += ["", "**Each DDP optimizer against its baseline** (mean test accuracy, ours vs the "
            "paper's sign):", ""]
  for name in names:
    for base, ddp in (("SGD", "DDP-SGD"), ("RMSprop", "DDP-RMSprop"), ("EKFAC", "DDP-EKFAC")):
      ours = (sum(results[(name, ddp)]["accuracy"]) / args.seeds -
              sum(results[(name, base)]["accuracy"]) / args.seeds)
      paper = PAPER[name][ddp][1] - PAPER[name][base][1]
      lines.append(f"* {name}: {ddp} − {base} = {ours:+.2f} points (paper {paper:+.2f})")
  return "\n".join(lines) + "\n"


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--datasets", default="wine,iris,digits")
  p.add_argument("--seeds", type=int, default=5)
  p.add_argument("--steps", type=int, default=None, help="override every dataset's steps")
  p.add_argument("--dense-max-params", type=int, default=2000,
                 help="skip vanilla DDP where a layer has more params than this")
  p.add_argument("--out", default="runs/experiments/ddpnopt_table3")
  args = p.parse_args(argv)
  names = [n for n in args.datasets.split(",") if n]

  start = time.time()
  results = {}
  for name in names:
    data = datasets.load(name)
    game = make_game(name, data)
    _, batch, steps = SETUP[name]
    streams = batch_streams(data, batch, args.steps or steps, args.seeds)
    largest = max(sum(a.size for a in jax.tree.leaves(G.get_path(params, player.path)))
                  for params in [game.init(jax.random.PRNGKey(0))] for player in game.players)
    for column, optimizer, lr in OPTIMIZERS:
      if optimizer.endswith("-dense") and largest > args.dense_max_params:
        print(f"{name:>6} {column:>12}: not run (a layer of {largest} params > "
              f"--dense-max-params {args.dense_max_params})", flush=True)
        continue
      r = results[(name, column)] = seeds_of(game, make_run(game, optimizer, lr), streams, data)
      print(f"{name:>6} {column:>12}: test acc {mean_std(r['accuracy'], 2)} %  "
            f"train loss {mean_std(r['loss'], 4)}  ({time.time() - start:.0f} s)", flush=True)

  write_outputs(args.out, markdown(results, names, args, time.time() - start), args,
                [{"dataset": n, "optimizer": c, **r} for (n, c), r in results.items()])
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
