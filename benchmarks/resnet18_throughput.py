"""Training throughput of the Flax ResNet18 under DGNOpt and optax: steps/s and images/s.

    python benchmarks/resnet18_throughput.py --device gpu
    python benchmarks/resnet18_throughput.py --steps 300 --batch 128 --optimizers gr-kfac,sgd,adam
    python benchmarks/resnet18_throughput.py --width 8 --steps 20     # narrow, on a CPU

The model is ``step_time.py``'s ``resnet18``: the CIFAR-style Flax ResNet18 of
:mod:`dgnopt_jax.models` (BatchNorm in train mode) turned into a game by
``games.from_flax``, on random 32x32x3 inputs with random labels of 10
classes (``--width`` narrows it; 64 is ResNet18). Each optimizer trains it
for ``--steps`` steps with the main job's jit-compiled train step
(:func:`dgnopt_jax.optimizer_from_name`; optax baselines differentiate the same
network's loss, learning rates are the main job's defaults unless named as
``name@lr``), cycling through ``--pool`` batches placed on the device
beforehand, so that making inputs on the host does not hold the device up.

The step is compiled ahead of time (its compile seconds and XLA's peak
bytes are reported on their own) and the first step runs untimed (the
first run of a program sets up buffers and library handles); the rate is
over the remaining steps, dispatched back to back and waited for once at
the end, as a training loop runs. Reported per optimizer: steps/s,
images/s, the loss of the first and last steps and the mean of the last
ten, the steps a DGNOpt solver skipped (``state.skipped``: a non-finite
loss, update or params; optax keeps no such count) and the steps whose loss
was not finite.

Prints a table and writes the figures as JSON (after every optimizer, the
optimizers done so far).
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import sys
import time

import jax
import numpy as np

import dgnopt_jax as dgnopt

import step_time
import timing


def train_run(name: str, game, params, batches: list, steps: int,
              damping: float | None = None) -> dict:
  """One optimizer's run of ``steps`` steps on ``batches`` (cycled), with its figures."""
  optimizer = dgnopt.optimizer_from_name(name, game, vxx_reg=0.0, damping=damping)
  used_lr = optimizer.learning_rate
  state = optimizer.tx.init(params)
  x, y = batches[0]
  compiled, compile_s, peak = step_time.compile_ahead(jax.jit(optimizer.step), params, state,
                                                      x, y)
  cycle = itertools.cycle(batches)
  start = time.perf_counter()
  params, state, first_loss = jax.block_until_ready(compiled(params, state, *next(cycle)))
  first_step_s = time.perf_counter() - start
  losses = [first_loss]
  start = time.perf_counter()
  for _ in range(steps - 1):
    params, state, loss = compiled(params, state, *next(cycle))
    losses.append(loss)
  jax.block_until_ready((params, state, losses))
  seconds = time.perf_counter() - start
  losses = np.asarray(jax.device_get(losses), np.float64)
  skipped = getattr(state, "skipped", None)
  timed = steps - 1
  batch = int(x.shape[0])
  return {"optimizer": name, "learning_rate": used_lr, "damping": damping, "steps": steps,
          "timed_steps": timed, "batch": batch, "compile_s": compile_s,
          "first_step_s": first_step_s, "timed_s": seconds,
          "steps_per_s": timed / seconds if timed else None,
          "images_per_s": timed * batch / seconds if timed else None,
          "first_loss": float(losses[0]), "final_loss": float(losses[-1]),
          "final_loss_mean10": float(np.mean(losses[-10:])),
          "skipped_steps": None if skipped is None else int(skipped),
          "nonfinite_losses": int(np.sum(~np.isfinite(losses))), "peak_bytes": peak}


def table(rows: list[dict]) -> str:
  fmt = lambda v, spec: "–" if v is None else format(v, spec)
  lines = ["| optimizer | steps/s | images/s | step (ms) | compile (s) | first loss | "
           "final loss | mean loss, last 10 | skipped | non-finite losses | peak memory (MB) |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
  for r in rows:
    step_ms = 1e3 / r["steps_per_s"] if r["steps_per_s"] else None
    peak = r["peak_bytes"] / 2**20 if r["peak_bytes"] else None
    lines.append(f"| {r['optimizer']} | {fmt(r['steps_per_s'], '.2f')} | "
                 f"{fmt(r['images_per_s'], '.0f')} | {fmt(step_ms, '.2f')} | "
                 f"{r['compile_s']:.1f} | {r['first_loss']:.4f} | {r['final_loss']:.4f} | "
                 f"{r['final_loss_mean10']:.4f} | "
                 f"{fmt(r['skipped_steps'], 'd')} | {r['nonfinite_losses']} | "
                 f"{fmt(peak, '.1f')} |")
  return "\n".join(lines)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--optimizers", default="gr-kfac,sgd,adam",
                 help="comma-separated main-job names (name@lr sets a learning rate)")
  p.add_argument("--steps", type=int, default=300, help="training steps per optimizer")
  p.add_argument("--batch", type=int, default=128)
  p.add_argument("--width", type=int, default=64, help="base width (64: ResNet18)")
  p.add_argument("--pool", type=int, default=8, help="distinct batches, cycled")
  p.add_argument("--damping", type=float, default=None,
                 help="DGNOpt curvature damping (default per curvature)")
  p.add_argument("--device", default="cpu", choices=("cpu", "gpu"))
  p.add_argument("--out", default=None, help="JSON path (default runs/benchmarks/...)")
  args = p.parse_args(argv)
  if args.steps < 2:
    p.error("--steps must be >= 2 (the first step is not timed)")
  if args.pool < 1:
    p.error("--pool must be >= 1")
  device, machine = timing.device_and_machine(args.device)
  optimizers = [o for o in args.optimizers.split(",") if o]
  print(f"resnet18 width {args.width}, batch {args.batch}, {args.steps} steps per optimizer "
        f"({args.pool} random 32x32x3 batches, cycled) on {machine}", flush=True)
  # On a CPU the host LAPACK on one thread, as the main job runs KFAC/EKFAC there.
  limit = (dgnopt.limit_lapack_threads(1) if args.device == "cpu"
           else contextlib.nullcontext())
  rows = []
  with jax.default_device(device), limit:
    game, params, _, _ = step_time.problem("resnet18", args.batch, args.width)
    params = jax.device_put(params, device)
    batches = list(itertools.islice(
        step_time.training_batches("resnet18", args.batch, device), args.pool))
    for name in optimizers:
      row = train_run(name, game, params, batches, args.steps, damping=args.damping)
      row["width"] = args.width
      rows.append(row)
      print(f"  {name}: compiled in {row['compile_s']:.1f} s, "
            f"{row['steps_per_s']:.2f} steps/s, final loss {row['final_loss']:.4f}, "
            f"skipped {row['skipped_steps']}", flush=True)
      # Written after every optimizer: an interrupted run keeps the ones it finished.
      timing.write_record(args.out, f"resnet18_throughput_{args.device}.json",
                          {"machine": machine, "width": args.width, "batch": args.batch,
                           "steps": args.steps, "rows": rows})
  print(f"\n{machine}\n\n{table(rows)}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
