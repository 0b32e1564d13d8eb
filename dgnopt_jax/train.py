"""Train a network on an embedded dataset with DGNOpt beside its baselines.

    python -m dgnopt_jax.train                       # DIGITS, residual CNN, gr-adam beside adam
    python -m dgnopt_jax.train --model mlp --optimizers sgd,fne-sgd,adam,fne-adam
    python -m dgnopt_jax.train --model cnn --optimizers sgd,fne-sgd --steps 800

Optimizer names: ``sgd``, ``rmsprop``, ``adam`` are optax's own (gradients by
``jax.grad``); ``olne-<c>``, ``fne-<c>`` and ``gr-<c>`` are this library's
open-loop, feedback-Nash and group-rational solvers with curvature ``<c>`` in
identity (alias sgd), rmsprop, adam, kfac, ekfac, dense (``olne-kfac`` is KFAC
with the empirical Fisher). ``name@lr`` sets one optimizer's learning rate;
``name/N`` with a kfac or ekfac curvature folds the batch's Kronecker
statistics into the running averages every N steps (``statistics_every``),
e.g. ``gr-kfac/5@0.03``.
Prints progress, a markdown result table, and writes a JSON record and a PNG of
the curves to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

import dgnopt_jax as dgnopt
from dgnopt_jax import datasets

G = dgnopt.games

DEFAULT_LR = {"identity": 0.1, "sgd": 0.1, "rmsprop": 1e-3, "adam": 1e-3, "kfac": 0.03,
              "ekfac": 0.03, "dense": 0.3}


MODELS = ("mlp", "cnn", "resnet", "inception")
IMAGE_MODELS = ("cnn", "resnet", "inception")


def make_model(name: str, data: datasets.Dataset, alignment: str = "merge",
               residual_blocks: int = 3) -> G.Game:
  """The networks.

  * ``mlp``: DDPNOpt Appendix D.1 (4 tanh layers of width 32, linear head);
  * ``cnn``: 4 conv + 2 dense (DGNOpt Appendix E's fictitious-player net, narrower);
  * ``resnet``: a conv stem and ``residual_blocks`` (3) residual blocks with
    identity shortcuts, 12 feature maps, no normalisation (DGNOpt Appendix E,
    MNIST);
  * ``inception``: conv, an inception block (a 4-player stage), conv, two dense
    layers (DGNOpt Appendix E).
  """
  if name == "mlp":
    layers = [G.Dense(32, "tanh") for _ in range(4)] + [G.Dense(data.num_classes)]
    return G.sequential(layers, data.x_train.shape[1:])
  if name == "cnn":
    layers = [G.Conv2D(8, (3, 3), activation="relu") for _ in range(4)]
    layers += [G.AvgPool((2, 2)), G.Dense(32, "relu"), G.Dense(data.num_classes)]
    return G.sequential(layers, data.x_train.shape[1:])
  if name == "resnet":
    layers = [G.Conv2D(12, (3, 3), activation="relu")]
    layers += [G.ResidualBlock(12, alignment=alignment) for _ in range(residual_blocks)]
    layers += [G.AvgPool((2, 2)), G.Dense(data.num_classes)]
    return G.sequential(layers, data.x_train.shape[1:])
  if name == "inception":
    layers = [G.Conv2D(8, (3, 3), activation="relu"), G.InceptionBlock(4),
              G.Conv2D(8, (3, 3), activation="relu"), G.AvgPool((2, 2)),
              G.Dense(32, "relu"), G.Dense(data.num_classes)]
    return G.sequential(layers, data.x_train.shape[1:])
  raise ValueError(f"unknown model {name!r}; choose one of {MODELS}")


def make_step(name: str, game: G.Game, lr: float | None, vxx_reg: float,
              damping: float | None = None) -> tuple[Callable, Callable, float]:
  """(init, jitted step, learning rate) for an optimizer name.

  ``name@lr`` sets the learning rate, ``name/N`` a Kronecker curvature's
  ``statistics_every``.
  """
  if "@" in name:
    name, lr = name.split("@", 1)
    lr = float(lr)
  statistics_every = None
  if "/" in name:
    name, period = name.split("/", 1)
    statistics_every = int(period)
    if name.split("-", 1)[-1] not in ("kfac", "ekfac"):
      raise ValueError(f"{name}/{period}: a statistics period needs the kfac or ekfac curvature")
  if "-" in name:
    kind, curvature = name.split("-", 1)
    makers = {"olne": dgnopt.olne, "fne": dgnopt.fne, "gr": dgnopt.gr}
    if kind not in makers:
      raise ValueError(f"unknown optimizer {name!r}")
    curvature = "identity" if curvature == "sgd" else curvature
    lr = DEFAULT_LR[curvature] if lr is None else lr
    if statistics_every is not None:
      curvature = getattr(dgnopt.curvature, curvature)(statistics_every=statistics_every)
    make = makers[kind]
    tx = make(game, lr, curvature, vxx_reg=vxx_reg, damping=damping)

    @jax.jit
    def step(params, state, x, y):
      updates, state = tx.update(None, state, params, batch=(x, y))
      return optax.apply_updates(params, updates), state, state.loss

    return tx.init, step, lr
  if name not in ("sgd", "rmsprop", "adam"):
    raise ValueError(f"unknown optimizer {name!r}")
  lr = DEFAULT_LR[name] if lr is None else lr
  tx = getattr(optax, name)(lr)

  @jax.jit
  def step(params, state, x, y):
    def terminal(p):
      out = game.apply(p, x)
      return jnp.mean(jax.vmap(game.loss.per_sample)(out, y))
    loss, grads = jax.value_and_grad(terminal)(params)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state, loss

  return tx.init, step, lr


def accuracy(game: G.Game, params: Any, x: np.ndarray, y: np.ndarray) -> float:
  logits = jax.jit(game.apply)(params, x)
  return float(jnp.mean(jnp.argmax(logits, -1) == y))


def run_one(name: str, game: G.Game, data: datasets.Dataset, seed: int, args) -> dict:
  init, step, lr = make_step(name, game, args.lr, args.vxx_reg, args.damping)
  params = game.init(jax.random.PRNGKey(seed))
  state = init(params)
  stream = datasets.batches(data.x_train, data.y_train, args.batch_size, seed=seed)
  curve, times, losses = [], [], []
  for i in range(1, args.steps + 1):
    x, y = next(stream)
    t0 = time.perf_counter()
    params, state, loss = step(params, state, x, y)
    loss = float(loss)
    times.append(time.perf_counter() - t0)
    losses.append(loss)
    if i % args.eval_every == 0 or i == args.steps:
      acc = accuracy(game, params, data.x_test, data.y_test)
      window = losses[-args.eval_every:]
      curve.append({"step": i, "train_loss": float(np.mean(window)), "test_accuracy": acc})
      bar = "#" * int(20 * i / args.steps)
      print(f"  [{bar:<20}] {name:>12} seed {seed} step {i:5d}  "
            f"loss {curve[-1]['train_loss']:.4f}  test acc {acc:.4f}", flush=True)
  warm = times[min(10, len(times) - 1):]
  return {"optimizer": name, "seed": seed, "learning_rate": lr, "curve": curve,
          "final_train_loss": curve[-1]["train_loss"], "test_accuracy": curve[-1]["test_accuracy"],
          "step_time_s": statistics.median(warm)}


def summarise(runs: list[dict], optimizers: list[str]) -> tuple[str, list[dict]]:
  rows = []
  base = None
  for name in optimizers:
    mine = [r for r in runs if r["optimizer"] == name]
    acc = [100 * r["test_accuracy"] for r in mine]
    loss = [r["final_train_loss"] for r in mine]
    t = statistics.median(r["step_time_s"] for r in mine)
    base = t if base is None else base
    rows.append({"optimizer": name, "learning_rate": mine[0]["learning_rate"],
                 "train_loss": float(np.mean(loss)), "train_loss_std": float(np.std(loss)),
                 "test_accuracy": float(np.mean(acc)), "test_accuracy_std": float(np.std(acc)),
                 "step_time_ms": 1e3 * t, "step_time_ratio": t / base})
  lines = [f"| optimizer | lr | train loss | test acc (%) | step time (ms) | / {optimizers[0]} |",
           "|---|---|---|---|---|---|"]
  for r in rows:
    lines.append(f"| {r['optimizer']} | {r['learning_rate']:g} | {r['train_loss']:.4f} ± "
                 f"{r['train_loss_std']:.4f} | {r['test_accuracy']:.2f} ± {r['test_accuracy_std']:.2f}"
                 f" | {r['step_time_ms']:.2f} | {r['step_time_ratio']:.2f}× |")
  return "\n".join(lines), rows


def plot(runs: list[dict], optimizers: list[str], path: str) -> bool:
  try:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
  except ImportError:
    print("matplotlib is not installed: no plot written")
    return False
  fig, axes = plt.subplots(1, 2, figsize=(10, 4))
  for name in optimizers:
    mine = [r for r in runs if r["optimizer"] == name]
    steps = [c["step"] for c in mine[0]["curve"]]
    loss = np.mean([[c["train_loss"] for c in r["curve"]] for r in mine], axis=0)
    acc = np.mean([[c["test_accuracy"] for c in r["curve"]] for r in mine], axis=0)
    axes[0].plot(steps, loss, label=name)
    axes[1].plot(steps, 100 * acc, label=name)
  axes[0].set(xlabel="step", ylabel="train loss", yscale="log")
  axes[1].set(xlabel="step", ylabel="test accuracy (%)")
  axes[1].legend()
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return True


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--dataset", default="digits", choices=datasets.EMBEDDED + datasets.TFDS,
                 help="an embedded dataset, or a tensorflow-datasets one read from --data-dir")
  p.add_argument("--data-dir", default=None,
                 help="tensorflow-datasets data_dir (default: tfds's own, ~/tensorflow_datasets)")
  p.add_argument("--max-train", type=int, default=None,
                 help="keep only the first N training examples")
  p.add_argument("--max-test", type=int, default=None, help="keep only the first N test examples")
  p.add_argument("--model", default="resnet", choices=MODELS)
  p.add_argument("--alignment", default="merge", choices=G.RESIDUAL_ALIGNMENTS,
                 help="where a residual block's shortcut plays (resnet)")
  p.add_argument("--optimizers", default="adam,gr-adam",
                 help="comma-separated; the first is the step-time baseline")
  p.add_argument("--lr", type=float, default=None, help="one learning rate for all (default per curvature)")
  p.add_argument("--vxx-reg", type=float, default=0.0, help="Tikhonov term on V_xx for fne/gr")
  p.add_argument("--damping", type=float, default=None,
                 help="Tikhonov term on the curvature (default per curvature)")
  p.add_argument("--batch-size", type=int, default=32)
  p.add_argument("--steps", type=int, default=1500)
  p.add_argument("--eval-every", type=int, default=250)
  p.add_argument("--seeds", type=int, default=2, help="number of seeds (0..n-1)")
  p.add_argument("--out", default="runs", help="folder for the JSON record and the plot")
  p.add_argument("--lapack-threads", type=int, default=1,
                 help="threads of the host LAPACK behind KFAC/EKFAC's eigh on a CPU "
                      "(dgnopt_jax.limit_lapack_threads); 0 leaves OpenBLAS's own default")
  return p.parse_args(argv)


def main(argv=None) -> int:
  args = parse_args(argv)
  images = args.model in IMAGE_MODELS
  if images and args.dataset not in ("digits",) + datasets.TFDS:
    raise SystemExit(f"--model {args.model} needs an image dataset: digits (8x8) or one of "
                     f"{', '.join(datasets.TFDS)}")
  data = datasets.load(args.dataset, images=images, data_dir=args.data_dir,
                       max_train=args.max_train, max_test=args.max_test)
  game = make_model(args.model, data, args.alignment)
  optimizers = [o.strip() for o in args.optimizers.split(",") if o.strip()]
  if args.lapack_threads and jax.default_backend() == "cpu":
    dgnopt.limit_lapack_threads(args.lapack_threads)
  print(f"dgnopt_jax {dgnopt.__version__} | jax {jax.__version__} on {jax.default_backend()} | "
        f"{args.dataset}: {len(data.x_train)} train / {len(data.x_test)} test | model {args.model} | "
        f"batch {args.batch_size} | {args.steps} steps | seeds {args.seeds}", flush=True)
  runs = []
  for seed in range(args.seeds):
    for name in optimizers:
      runs.append(run_one(name, game, data, seed, args))
  table, rows = summarise(runs, optimizers)
  print("\n" + table)
  os.makedirs(args.out, exist_ok=True)
  stem = os.path.join(args.out, f"{args.dataset}_{args.model}")
  record = {"args": vars(args), "machine": platform.platform(), "backend": jax.default_backend(),
            "summary": rows, "runs": runs}
  with open(stem + ".json", "w") as f:
    json.dump(record, f, indent=1)
  wrote = plot(runs, optimizers, stem + ".png")
  print(f"\nwrote {stem}.json" + (f" and {stem}.png" if wrote else ""))
  return 0


if __name__ == "__main__":
  sys.exit(main())
