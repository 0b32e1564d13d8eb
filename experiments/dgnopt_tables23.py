"""DGNOpt Tables 2-3 and Fig. 5 at DIGITS scale: each baseline and its lifts to FNE and GR.

    python experiments/dgnopt_tables23.py [--networks resnet,inception] [--seeds 4]
        [--steps 1500] [--vxx-rank outer] [--dataset digits]
        [--out runs/experiments/dgnopt_tables23]

DGNOpt (ICML 2021) Table 2 (residual networks) and Table 3 (inception
networks) compare SGD, RMSprop, Adam and EKFAC with DGNOpt; Fig. 5 lifts each
best-tuned baseline to the richer information structures: the same
preconditioner with the feedback of the closed-loop Nash game (FNE) and of the
cooperative game (GR). By DGNOpt Theorem 6 the open-loop solver with a
baseline's preconditioner *is* that baseline, so here

* SGD, RMSprop, Adam: ``optax.sgd`` / ``optax.rmsprop`` / ``optax.adam`` on
  ``jax.grad``; EKFAC: ``olne-ekfac`` (empirical-Fisher EKFAC, refreshed every
  10 steps);
* FNE lift: ``fne-<c>``, GR lift: ``gr-<c>`` with the same curvature ``c`` and
  learning rate.

Networks are the main job's (``dgnopt_jax.games.network_from_name``): ``resnet``
= a conv stem and 3 residual blocks of 12 feature maps (DGNOpt Appendix E's MNIST
network; identity shortcuts, so every stage has one player and GR = FNE:
the GR lift is only run where a stage has several players), ``inception`` =
conv, an inception block (a 4-player stage), conv, two dense layers. DIGITS
8x8 images stand in for MNIST (``--dataset`` takes a tfds name and
``--data-dir`` when that data is present). Batch 32, learning rates the main
job's defaults (SGD 0.1, RMSprop and Adam 1e-3, EKFAC 0.03). ``--vxx-rank``
chooses the lifts' value Hessian: ``outer`` (rank-1, the default of
:func:`dgnopt_jax.fne`) or ``exact`` (the loss's rank-C factor). EMSA is not run.
The paper's MNIST values are given beside ours. Writes ``<out>.md`` and
``<out>.json``.
"""

from __future__ import annotations

import argparse
import platform
import time

import jax

import dgnopt_jax as dgnopt

from common import (add_data_arguments, batch_streams, load_data, make_run, mean_std, seeds_of,
                    write_outputs)

G = dgnopt.games

# (column, baseline optimizer, curvature of its lifts, learning rate)
BASELINES = (("SGD", "sgd", "sgd", 0.1), ("RMSprop", "rmsprop", "rmsprop", 1e-3),
             ("Adam", "adam", "adam", 1e-3), ("EKFAC", "olne-ekfac", "ekfac", 0.03))
# DGNOpt Table 2 / Table 3, MNIST rows: baselines and DGNOpt; Fig. 5 (MNIST): the
# accuracy change of each baseline lifted to the richer information structure.
PAPER = {"resnet": {"SGD": 98.65, "RMSprop": 98.61, "Adam": 98.49, "EKFAC": 98.77,
                    "DGNOpt": 98.76},
         "inception": {"SGD": 97.96, "RMSprop": 97.75, "Adam": 97.72, "EKFAC": 97.90,
                       "DGNOpt": 98.03}}
PAPER_LIFT = {"resnet": {"SGD": 0.05, "RMSprop": -0.02, "Adam": 0.05, "EKFAC": -0.01},
              "inception": {"SGD": 0.07, "RMSprop": 0.10, "Adam": 0.05, "EKFAC": 0.03}}


def runs_of(game: G.Game) -> list[tuple[str, str, str, float]]:
  """(column, lift, optimizer, lr) of every run on ``game``; the GR lift only with multi-player stages."""
  cooperative = any(len(stage.players) > 1 for stage in game.stages)
  runs = []
  for column, baseline, curvature, lr in BASELINES:
    runs.append((column, "baseline", baseline, lr))
    runs.append((column, "FNE", f"fne-{curvature}", lr))
    if cooperative:
      runs.append((column, "GR", f"gr-{curvature}", lr))
  return runs


def mean(values) -> float:
  return sum(values) / len(values)


def markdown(results: dict, networks: list[str], args, seconds: float) -> str:
  lines = [f"{args.dataset}, batch {args.batch_size}, {args.steps} steps, {args.seeds} seeds, "
           f"lifts with vxx_rank={args.vxx_rank!r}, "
           f"mean ± std of the final test accuracy (%); the paper's MNIST values in brackets. "
           f"{platform.machine()} CPU, jax {jax.__version__}, {seconds / 60:.1f} min.", "",
           "**Tables 2-3** (baselines and the best DGNOpt lift):", "",
           "| network | " + " | ".join(c for c, *_ in BASELINES) + " | DGNOpt (best lift) |",
           "|---" * (len(BASELINES) + 2) + "|"]
  for net in networks:
    cells = [f"{mean_std(results[(net, c, 'baseline')]['accuracy'], 2)} [{PAPER[net][c]:.2f}]"
             for c, *_ in BASELINES]
    lifts = [(mean(r["accuracy"]), key) for key, r in results.items()
             if key[0] == net and key[2] != "baseline"]
    _, best = max(lifts)
    cells.append(f"{mean_std(results[best]['accuracy'], 2)} ({best[2]}-{best[1]}) "
                 f"[{PAPER[net]['DGNOpt']:.2f}]")
    lines.append(f"| {net} | " + " | ".join(cells) + " |")
  lines += ["", "**Fig. 5** (change of the mean test accuracy, points, when each baseline is "
            "lifted to FNE / GR with the same preconditioner and learning rate; the paper's "
            "MNIST change in brackets):", "",
            "| network | lift | " + " | ".join(c for c, *_ in BASELINES) + " |",
            "|---" * (len(BASELINES) + 2) + "|"]
  for net in networks:
    for lift in ("FNE", "GR"):
      if (net, BASELINES[0][0], lift) not in results:
        continue
      cells = []
      for c, *_ in BASELINES:
        delta = mean(results[(net, c, lift)]["accuracy"]) - mean(results[(net, c, "baseline")]["accuracy"])
        cells.append(f"{delta:+.2f} [{PAPER_LIFT[net][c]:+.2f}]")
      lines.append(f"| {net} | {lift} | " + " | ".join(cells) + " |")
  lines += ["", "**Final training loss** (whole training set, mean ± std):", "",
            "| network | run | " + " | ".join(c for c, *_ in BASELINES) + " |",
            "|---" * (len(BASELINES) + 2) + "|"]
  for net in networks:
    for lift in ("baseline", "FNE", "GR"):
      if (net, BASELINES[0][0], lift) not in results:
        continue
      cells = [mean_std(results[(net, c, lift)]["loss"], 4) for c, *_ in BASELINES]
      lines.append(f"| {net} | {lift} | " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--networks", default="resnet,inception")
  p.add_argument("--dataset", default="digits")
  p.add_argument("--seeds", type=int, default=4)
  p.add_argument("--steps", type=int, default=1500)
  p.add_argument("--batch-size", type=int, default=32)
  p.add_argument("--vxx-rank", default="projected", choices=("projected", "outer", "exact"),
                 help="the lifts' value Hessian factor (fne/gr vxx_rank)")
  p.add_argument("--out", default="runs/experiments/dgnopt_tables23")
  add_data_arguments(p)
  args = p.parse_args(argv)
  networks = [n for n in args.networks.split(",") if n]
  for net in networks:
    if net not in PAPER:
      raise SystemExit(f"unknown network {net!r}; choose from {tuple(PAPER)}")

  start = time.time()
  data = load_data(args.dataset, args, images=True)
  streams = batch_streams(data, args.batch_size, args.steps, args.seeds)
  results = {}
  for net in networks:
    game = G.network_from_name(net, data.x_train.shape[1:], data.num_classes)
    for column, lift, optimizer, lr in runs_of(game):
      run = make_run(game, optimizer, lr, vxx_rank=args.vxx_rank)
      r = results[(net, column, lift)] = seeds_of(game, run, streams, data)
      print(f"{net:>9} {column:>7} {lift:>8} ({optimizer}, lr {lr:g}): test acc "
            f"{mean_std(r['accuracy'], 2)} %  train loss {mean_std(r['loss'], 4)}  "
            f"({time.time() - start:.0f} s)", flush=True)

  write_outputs(args.out, markdown(results, networks, args, time.time() - start), args,
                [{"network": n, "baseline": c, "lift": l, **r} for (n, c, l), r in results.items()])
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
