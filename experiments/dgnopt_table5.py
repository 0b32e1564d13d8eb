"""DGNOpt Table 5 / Fig. 10 at DIGITS scale: fixed, random and adaptive (EXP3++) alignment.

    python experiments/dgnopt_table5.py [--seeds 4] [--steps 600] [--solver fne]
        [--lr 0.03] [--dataset digits] [--out runs/experiments/dgnopt_table5]

A residual block with a projection shortcut can be written as two games:
the shortcut plays beside the block's second convolution ("merge") or
beside its first ("split"; DGNOpt Fig. 10a). DGNOpt §5.3 draws the alignment
every step: fixed (always "merge"), random (uniform), or adaptive (EXP3++, the
reward the validation accuracy after the step; Alg. 2-3), against EKFAC (the
same network and curvature without the game's information structure). Here
:func:`dgnopt_jax.aligned` with ``<solver>-ekfac`` per alignment, beside
``olne-ekfac``. Network as DGNOpt Appendix E's SVHN one, narrower input: a
3x3 conv stem (8 maps), one residual block with 12 feature maps and a 1x1
projection shortcut, no BatchNorm, average pooling, a dense head; batch 32.
``--validation`` training samples are held out (for every method) and the
validation batch of each step is drawn from them. Reports the final test
accuracy, the test accuracy early in training (``--early`` steps, Fig. 10b)
and how often each alignment was drawn. Writes ``<out>.md`` and ``<out>.json``.
"""

from __future__ import annotations

import argparse
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np

import dgnopt_jax as dgnopt
from dgnopt_jax import datasets

from common import (accuracy_on, add_data_arguments, evaluate, load_data,
                    make_curve_run, make_update, mean_std, transform_update, write_outputs)

G = dgnopt.games
STRATEGIES = ("fixed", "random", "adaptive")
PAPER = {"SVHN": {"EKFAC": 87.49, "fixed": 88.20, "random": 88.12, "adaptive": 88.33},
         "CIFAR10": {"EKFAC": 84.67, "fixed": 85.20, "random": 85.27, "adaptive": 85.65}}


def residual_game(data: datasets.Dataset, alignment: str) -> G.Game:
  layers = [G.Conv2D(8, (3, 3), activation="relu"),
            G.ResidualBlock(12, shortcut="projection", alignment=alignment),
            G.AvgPool((2, 2)), G.Dense(data.num_classes)]
  return G.sequential(layers, data.x_train.shape[1:])


def hold_out(data: datasets.Dataset, size: int, seed: int = 0):
  """``(training data without the held-out samples, (x_val, y_val))``."""
  if not 0 < size < len(data.x_train):
    raise SystemExit(f"--validation must be in (0, {len(data.x_train)})")
  order = np.random.default_rng(seed).permutation(len(data.x_train))
  val, rest = order[:size], order[size:]
  train = data._replace(x_train=data.x_train[rest], y_train=data.y_train[rest])
  return train, (data.x_train[val], data.y_train[val])


def streams_of(train: datasets.Dataset, validation, args) -> list:
  """Per seed, the training batches and the validation batches, stacked over the steps."""
  streams = []
  for seed in range(args.seeds):
    batches = datasets.batches(train.x_train, train.y_train, args.batch_size, seed=seed)
    checks = datasets.batches(*validation, args.batch_size, seed=1000 + seed)
    steps = [next(batches) + next(checks) for _ in range(args.steps)]
    streams.append(tuple(jnp.asarray(np.stack(part)) for part in zip(*steps)))
  return streams


def markdown(results: dict, args, seconds: float) -> str:
  lines = [f"{args.dataset}, one residual block with a projection shortcut, "
           f"{args.solver}-ekfac per alignment (lr {args.lr:g}) beside olne-ekfac (EKFAC), "
           f"batch {args.batch_size}, {args.steps} steps, {args.seeds} seeds, "
           f"{args.validation} held-out validation samples; mean ± std. "
           f"{platform.machine()} CPU, jax {jax.__version__}, {seconds / 60:.1f} min.", "",
           f"| run | test acc (%) | test acc at step {args.early} (%) | train loss | "
           "draws merge / split | paper SVHN | paper CIFAR-10 |", "|---|---|---|---|---|---|---|"]
  for key in ("EKFAC",) + STRATEGIES:
    r = results[key]
    draws = "—" if key == "EKFAC" else " / ".join(
        f"{v:.0f}" for v in np.mean(np.asarray(r["pulls"]), axis=0))
    lines.append(f"| {key} | {mean_std(r['accuracy'], 2)} | {mean_std(r['early'], 2)} | "
                 f"{mean_std(r['loss'], 4)} | {draws} | {PAPER['SVHN'][key]:.2f} | "
                 f"{PAPER['CIFAR10'][key]:.2f} |")
  return "\n".join(lines) + "\n"


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--solver", default="fne", choices=("fne", "gr"))
  p.add_argument("--lr", type=float, default=0.03)
  p.add_argument("--dataset", default="digits")
  p.add_argument("--seeds", type=int, default=4)
  p.add_argument("--steps", type=int, default=600)
  p.add_argument("--early", type=int, default=100, help="step of the early-phase accuracy")
  p.add_argument("--eval-every", type=int, default=20)
  p.add_argument("--batch-size", type=int, default=32)
  p.add_argument("--validation", type=int, default=256, help="held-out training samples")
  p.add_argument("--out", default="runs/experiments/dgnopt_table5")
  add_data_arguments(p)
  args = p.parse_args(argv)
  if args.steps % args.eval_every or args.early % args.eval_every or args.early > args.steps:
    raise SystemExit("--steps and --early must be multiples of --eval-every, early <= steps")

  start = time.time()
  data = load_data(args.dataset, args, images=True)
  train, validation = hold_out(data, args.validation)
  games = [residual_game(data, "merge"), residual_game(data, "split")]
  accuracy = accuracy_on(games[0], data)
  streams = streams_of(train, validation, args)
  results = {}
  for key in ("EKFAC",) + STRATEGIES:
    if key == "EKFAC":
      init, update = make_update(games[0], "olne-ekfac", args.lr)
      run = make_curve_run(init, lambda p, s, b: update(p, s, b[:2]), accuracy, args.eval_every)
    else:
      tx = dgnopt.aligned(
          games, lambda g: dgnopt.optimizer_from_name(f"{args.solver}-ekfac", g, args.lr).tx,
          key, seed=0)
      run = make_curve_run(*transform_update(tx, validation=True), accuracy, args.eval_every)
    r = results[key] = {"accuracy": [], "early": [], "loss": [], "pulls": [], "curve": []}
    for seed, stream in enumerate(streams):
      params, state, curve, _ = run(games[0].init(jax.random.PRNGKey(seed)), stream)
      if key != "EKFAC":
        r["pulls"].append(np.asarray(state.bandit.pulls).tolist())
      curve = 100 * np.asarray(curve)
      acc, loss = evaluate(games[0], params, data)
      r["accuracy"].append(acc)
      r["early"].append(float(curve[args.early // args.eval_every - 1]))
      r["loss"].append(loss)
      r["curve"].append(curve.tolist())
    print(f"{key:>9}: test acc {mean_std(r['accuracy'], 2)} %  at step {args.early} "
          f"{mean_std(r['early'], 2)} %  ({time.time() - start:.0f} s)", flush=True)

  write_outputs(args.out, markdown(results, args, time.time() - start), args,
                [{"run": k, **r} for k, r in results.items()])
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
