"""DGNOpt Fig. 8 at DIGITS scale: the inception network at large learning rates, SGD vs its feedback lifts.

    python experiments/dgnopt_fig8.py [--lrs 0.5,1.0] [--seeds 4] [--steps 1000]
        [--optimizers sgd,fne-sgd,gr-sgd] [--vxx-rank outer] [--dataset digits]
        [--out runs/experiments/dgnopt_fig8]

DGNOpt Fig. 8 trains the inception-based network on MNIST with lr = 1.0 (SVHN:
2.0): SGD struggles to make stable progress while DGNOpt, whose feedback
``K dx`` grows with the step (DGNOpt eq. 12), converges. Here ``optax.sgd``
beside ``fne-sgd`` and ``gr-sgd`` (identity curvature: Theorem 6's lifts of
SGD) at each learning rate, on the main job's inception network
(``dgnopt_jax.games.network_from_name("inception", ...)``), batch 32, test
accuracy every ``--eval-every`` steps. The figure gives no numbers; the table reports the
final test accuracy, the final training loss and the spread of the test
accuracy over the second half of training (its mean absolute step-to-step
change, a measure of instability). ``--optimizers`` adds EKFAC and its lifts
(``olne-ekfac``, ``fne-ekfac``, ``gr-ekfac``). Writes ``<out>.md``, ``<out>.json`` and
``<out>.png`` (the mean curves).
"""

from __future__ import annotations

import argparse
import platform
import time

import jax
import numpy as np

import dgnopt_jax as dgnopt

from common import (accuracy_on, add_data_arguments, batch_streams, evaluate, load_data,
                    make_curve_run, make_update, mean_std, write_outputs)

G = dgnopt.games
OPTIMIZERS = (("SGD", "sgd"), ("DGNOpt-FNE", "fne-sgd"), ("DGNOpt-GR", "gr-sgd"))
# The same lifts with a damped Kronecker curvature, for --optimizers.
MORE = (("EKFAC", "olne-ekfac"), ("DGNOpt-FNE-EKFAC", "fne-ekfac"), ("DGNOpt-GR-EKFAC", "gr-ekfac"))


def markdown(results: dict, lrs: list[float], args, seconds: float) -> str:
  lines = [f"Inception network on {args.dataset}, batch {args.batch_size}, {args.steps} steps, "
           f"DGNOpt with vxx_rank={args.vxx_rank!r}, "
           f"{args.seeds} seeds, mean ± std; jitter = mean |change| of the test accuracy between "
           f"evaluations (every {args.eval_every} steps) over the second half. "
           f"{platform.machine()} CPU, jax {jax.__version__}, {seconds / 60:.1f} min.", "",
           "| lr | optimizer | test acc (%) | train loss | jitter (points) |",
           "|---|---|---|---|---|"]
  for lr in lrs:
    for column in dict.fromkeys(c for _, c in results):
      r = results[(lr, column)]
      lines.append(f"| {lr:g} | {column} | {mean_std(r['accuracy'], 2)} | "
                   f"{mean_std(r['loss'], 4)} | {mean_std(r['jitter'], 2)} |")
  return "\n".join(lines) + "\n"


def plot(results: dict, lrs: list[float], args, path: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, axes = plt.subplots(1, len(lrs), figsize=(5 * len(lrs), 4), squeeze=False)
  steps = args.eval_every * np.arange(1, args.steps // args.eval_every + 1)
  for ax, lr in zip(axes[0], lrs):
    for column in dict.fromkeys(c for _, c in results):
      curves = np.asarray(results[(lr, column)]["curve"])
      ax.plot(steps, curves.mean(0), label=column)
      ax.fill_between(steps, curves.min(0), curves.max(0), alpha=0.2)
    ax.set(title=f"lr = {lr:g}", xlabel="step", ylabel="test accuracy (%)")
    ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--lrs", default="0.5,1.0")
  p.add_argument("--optimizers", default="sgd,fne-sgd,gr-sgd",
                 help="from sgd, fne-sgd, gr-sgd, olne-ekfac, fne-ekfac, gr-ekfac")
  p.add_argument("--dataset", default="digits")
  p.add_argument("--seeds", type=int, default=4)
  p.add_argument("--steps", type=int, default=1000)
  p.add_argument("--eval-every", type=int, default=25)
  p.add_argument("--batch-size", type=int, default=32)
  p.add_argument("--vxx-rank", default="projected", choices=("projected", "outer", "exact"),
                 help="the DGNOpt runs' value Hessian factor (fne/gr vxx_rank)")
  p.add_argument("--out", default="runs/experiments/dgnopt_fig8")
  add_data_arguments(p)
  args = p.parse_args(argv)
  if args.steps % args.eval_every:
    raise SystemExit("--steps must be a multiple of --eval-every")
  lrs = [float(v) for v in args.lrs.split(",") if v]
  known = {name: column for column, name in OPTIMIZERS + MORE}
  chosen = [(known[n], n) for n in args.optimizers.split(",") if n in known]
  if len(chosen) != len([n for n in args.optimizers.split(",") if n]):
    raise SystemExit(f"--optimizers takes names from {tuple(known)}")

  start = time.time()
  data = load_data(args.dataset, args, images=True)
  game = G.network_from_name("inception", data.x_train.shape[1:], data.num_classes)
  streams = batch_streams(data, args.batch_size, args.steps, args.seeds)
  results = {}
  for lr in lrs:
    for column, optimizer in chosen:
      run = make_curve_run(*make_update(game, optimizer, lr, vxx_rank=args.vxx_rank),
                           accuracy_on(game, data),
                           args.eval_every)
      r = results[(lr, column)] = {"accuracy": [], "loss": [], "jitter": [], "curve": []}
      for seed, stream in enumerate(streams):
        params, _, curve, _ = run(game.init(jax.random.PRNGKey(seed)), stream)
        curve = 100 * np.asarray(curve)
        acc, loss = evaluate(game, params, data)
        r["accuracy"].append(acc)
        r["loss"].append(loss)
        r["jitter"].append(float(np.mean(np.abs(np.diff(curve[len(curve) // 2:])))))
        r["curve"].append(curve.tolist())
      print(f"lr {lr:g} {column:>10}: test acc {mean_std(r['accuracy'], 2)} %  train loss "
            f"{mean_std(r['loss'], 4)}  jitter {mean_std(r['jitter'], 2)}  "
            f"({time.time() - start:.0f} s)", flush=True)

  write_outputs(args.out, markdown(results, lrs, args, time.time() - start), args,
                [{"lr": lr, "optimizer": c, **r} for (lr, c), r in results.items()])
  plot(results, lrs, args, args.out + ".png")
  print(f"wrote {args.out}.png")
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
