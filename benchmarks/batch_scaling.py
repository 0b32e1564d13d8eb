"""Step time against batch size: DGNOpt's fast path beside optax.sgd, one process, one run.

    python benchmarks/batch_scaling.py [--batches 32,64,128,256,512] [--width 64]
        [--rounds 15] [--repeats 10] [--device gpu]

Times the jit-compiled train step on the DIGITS MLP (4 tanh layers + linear
head; batches drawn from the DIGITS training set) at every batch size: all
steps are compiled and warmed up first, then timed in interleaved rounds
(every optimizer at every batch size once per round: one untimed step, then
--repeats timed steps, block_until_ready), so that a slow spell of the
machine falls on all of them; the per-step time is the median over rounds.
Every case starts its rounds from where ``--trained-steps`` steps on other
batches of its size left it (default 30, as ``step_time.py``; 0: from the
initial params and fresh state).
Prints a table of per-step times and of time(B)/time(smallest B) for each
optimizer next to optax.sgd's, and writes JSON (default
``runs/benchmarks/batch_scaling_<device>.json``). Linear cost in the batch
shows as growth ratios close to sgd's.
"""

import argparse
import platform

import jax
import jax.numpy as jnp
import numpy as np

import dgnopt_jax as dgnopt
from dgnopt_jax import datasets

import timing
from step_time import train_first

G = dgnopt.games


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--batches", default="32,64,128,256,512")
  p.add_argument("--width", type=int, default=64)
  p.add_argument("--rounds", type=int, default=15)
  p.add_argument("--repeats", type=int, default=10, help="steps per round")
  p.add_argument("--trained-steps", type=int, default=30,
                 help="training steps on other batches before the timed rounds")
  p.add_argument("--device", default="cpu", choices=("cpu", "gpu"))
  p.add_argument("--out", default=None, help="JSON path (default runs/benchmarks/...)")
  args = p.parse_args()
  if args.trained_steps < 0:
    p.error("--trained-steps must be >= 0")
  device, machine = timing.device_and_machine(args.device)
  with jax.default_device(device):
    results, sizes = run(args)
  print(f"{machine}, MLP width {args.width}, median over {args.rounds} interleaved rounds of "
        f"{args.repeats} steps after {args.trained_steps} training steps")
  head = "| optimizer | " + " | ".join(f"B={b} (ms)" for b in sizes) + \
      f" | t({sizes[-1]})/t({sizes[0]}) | vs sgd's ratio | t/sgd at B={sizes[-1]} |"
  print(head)
  print("|" + "---|" * (len(sizes) + 4))
  sgd_growth = results["optax.sgd"][sizes[-1]] / results["optax.sgd"][sizes[0]]
  for name, r in results.items():
    growth = r[sizes[-1]] / r[sizes[0]]
    print(f"| {name} | " + " | ".join(f"{1e3 * r[b]:.3f}" for b in sizes) +
          f" | {growth:.2f} | {growth / sgd_growth:.2f} | "
          f"{r[sizes[-1]] / results['optax.sgd'][sizes[-1]]:.2f} |")
  timing.write_record(args.out, f"batch_scaling_{args.device}.json",
                      {"machine": machine, "platform": platform.platform(),
                       "backend": args.device, "width": args.width, "rounds": args.rounds,
                       "repeats": args.repeats, "trained_steps": args.trained_steps,
                       "seconds": results})


def run(args):
  """(optimizer -> batch size -> seconds per step, batch sizes), on the default device."""
  sizes = [int(b) for b in args.batches.split(",")]
  game = G.sequential([G.Dense(args.width, "tanh") for _ in range(4)] + [G.Dense(10)], (64,))
  params = game.init(jax.random.PRNGKey(0))

  def named(name, **options):
    optimizer = dgnopt.optimizer_from_name(name, game, **options)
    return optimizer.tx.init, jax.jit(optimizer.step)

  optimizers = {"optax.sgd": named("sgd@0.1"),
                "olne-sgd": named("olne-sgd@0.1"),
                "fne-sgd": named("fne-sgd@0.1"),
                "fne-sgd exact": named("fne-sgd@0.1", vxx_rank="exact"),
                "fne-adam": named("fne-adam@1e-3")}
  rng = np.random.default_rng(0)
  data = datasets.load("digits")

  def digits_batch(b):
    idx = rng.choice(len(data.x_train), b, replace=b > len(data.x_train))
    return (jnp.asarray(data.x_train[idx], jnp.float32), jnp.asarray(data.y_train[idx]))

  cases = {}
  for b in sizes:
    x, y = digits_batch(b)
    for name, (init, step) in optimizers.items():
      start = train_first(step, params, init(params), iter(lambda: digits_batch(b), None),
                          args.trained_steps)
      cases[name, b] = (step, *start, x, y)
  timings = timing.interleaved_step_times(cases, args.rounds, args.repeats)
  return {name: {b: timings[name, b] for b in sizes} for name in optimizers}, sizes


if __name__ == "__main__":
  main()
