"""Per-step time, compile time and memory of DGNOpt beside optax, one process, one run.

    python benchmarks/step_time.py                       # DIGITS MLP and residual CNN
    python benchmarks/step_time.py --models mlp --batch 128 --rounds 15
    python benchmarks/step_time.py --device gpu          # the same on a GPU
    python benchmarks/step_time.py --models resnet18 --device gpu   # Flax ResNet18, 32x32x3

Models: the main job's ``mlp``, ``cnn``, ``resnet`` and ``inception`` on DIGITS,
and ``resnet18``: the CIFAR-style Flax ResNet18 of :mod:`dgnopt_jax.models`
(BatchNorm in train mode) turned into a game by ``games.from_flax``, on a
fixed batch of random 32x32x3 inputs and labels (``--resnet18-width`` narrows
it; 64 is ResNet18, 11.2M params: on a CPU expect seconds per step).

For every model and optimizer the jit-compiled train step of the main job
(:func:`dgnopt_jax.optimizer_from_name`: optax baselines differentiate the same
network's loss) is compiled ahead of time (compile time measured), then timed
in interleaved rounds: each round runs ``--steps`` steps of every optimizer in
turn (``block_until_ready`` after each step) so that machine noise hits all of
them alike; the reported time is the median over rounds of the mean step time.
Every round restarts each optimizer from where ``--trained-steps`` steps of
training on other batches of the data left it (default 30; 0 restarts from
the initial params and fresh state): the first steps from initialisation are
not typical of a run (DDP-Adam's first preconditioner is ``1/|g|``, and the
convexity safeguard's power iteration then runs on every stage, where a few
steps later it runs on at most one of the DIGITS MLP's five, most steps none).
Memory is XLA's compiled memory analysis: arguments + outputs + temporaries
(less aliased buffers), i.e. the peak live bytes of one step.

Prints, per model, a table of step time, ratio to optax.sgd and optax.adam,
compile time and memory relative to optax.sgd; writes the figures as JSON
(after every model, the models done so far).

``--games`` times the ``mlp`` and the ``resnet`` made several ways
(``flax_networks.py``): ``network`` (the hand-written game, the default),
``flax`` (the same network as a Flax model traced by ``games.from_flax``). All
games' steps run in the same interleaved rounds, and the table gains each
step time's ratio to the first game's for the same optimizer::

    python benchmarks/step_time.py --games flax,network
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time

import jax
import numpy as np

import dgnopt_jax as dgnopt
from dgnopt_jax import datasets
from dgnopt_jax import games
from dgnopt_jax import models

import flax_networks
import timing

DEFAULT_OPTIMIZERS = ("sgd,adam,olne-sgd,fne-sgd,gr-sgd,olne-adam,fne-adam,gr-adam,"
                      "fne-kfac,gr-kfac,fne-ekfac,gr-ekfac")


def compile_ahead(step, *args):
  """(compiled ``step`` for ``args``, compile seconds, peak bytes or None).

  Peak bytes: XLA's compiled memory analysis, arguments + outputs +
  temporaries less aliased buffers.
  """
  start = time.perf_counter()
  compiled = step.lower(*args).compile()
  compile_s = time.perf_counter() - start
  memory = compiled.memory_analysis()
  peak = None
  if memory is not None:
    peak = (memory.argument_size_in_bytes + memory.output_size_in_bytes +
            memory.temp_size_in_bytes - memory.alias_size_in_bytes)
  return compiled, compile_s, peak


def compiled_step(name: str, game, params, x, y, vxx_reg: float = 0.0):
  """(compiled step, state, compile seconds, peak bytes) of one optimizer."""
  optimizer = dgnopt.optimizer_from_name(name, game, vxx_reg=vxx_reg)
  state = optimizer.tx.init(params)
  compiled, compile_s, peak = compile_ahead(jax.jit(optimizer.step), params, state, x, y)
  return compiled, state, compile_s, peak


def time_rounds(steps: dict, x, y, rounds: int, per_round: int) -> dict:
  """Median over interleaved rounds of each step's mean time (seconds).

  Every round restarts each optimizer from its own params and state
  (``steps[name] = (fn, params, state)``), so that every round times the same
  numerical regime (and ``per_round`` steps of a Kronecker curvature include
  its refreshes at the default period).
  """
  cases = {name: (fn, params, state, x, y) for name, (fn, params, state) in steps.items()}
  return timing.interleaved_step_times(cases, rounds, per_round, warm_each_round=False)


def train_first(compiled, params, state, batches, steps: int):
  """(params, state) after ``steps`` steps of ``compiled`` on ``batches``."""
  for _ in range(steps):
    bx, by = next(batches)
    params, state = compiled(params, state, bx, by)[:2]
  return jax.block_until_ready((params, state))


def training_batches(model: str, batch: int, device):
  """An endless stream of batches other than the timed one, on ``device``."""
  rng = np.random.default_rng(1)
  if model == "resnet18":
    while True:
      yield jax.device_put((np.asarray(rng.normal(size=(batch, 32, 32, 3)), np.float32),
                            rng.integers(0, 10, batch)), device)
  data = datasets.load("digits", images=model in games.IMAGE_NETWORKS)
  for bx, by in datasets.batches(data.x_train, data.y_train, batch, seed=1):
    yield jax.device_put((np.asarray(bx, np.float32), np.asarray(by)), device)


def problem(model: str, batch: int, resnet18_width: int):
  """(game, params, x, y) of a model on a fixed batch (the hand-written game where there is one)."""
  made, x, y = problems(model, batch, resnet18_width)
  return made["network"] + (x, y)


def problems(model: str, batch: int, resnet18_width: int, kinds=("network",)):
  """({kind: (game, params)}, x, y) of a model on a fixed batch, its game made each ``kind`` way."""
  rng = np.random.default_rng(0)
  if model == "resnet18":
    if tuple(kinds) != ("network",):
      raise ValueError("--games applies to the mlp and the resnet; resnet18 is read by from_flax")
    x = jax.numpy.asarray(rng.normal(size=(batch, 32, 32, 3)), np.float32)
    y = jax.numpy.asarray(rng.integers(0, 10, batch))
    net = models.resnet18(10, width=resnet18_width)
    return {"network": (games.from_flax(net, x), net.init(jax.random.PRNGKey(0), x))}, x, y
  if tuple(kinds) != ("network",) and model not in flax_networks.FLAX_NETWORKS:
    raise ValueError(f"--games applies to {flax_networks.FLAX_NETWORKS}, not {model!r}")
  data = datasets.load("digits", images=model in games.IMAGE_NETWORKS)
  idx = rng.choice(len(data.x_train), batch, replace=batch > len(data.x_train))
  x, y = np.asarray(data.x_train[idx], np.float32), np.asarray(data.y_train[idx])
  made = {kind: flax_networks.game_and_params(kind, model, x, data.num_classes)
          for kind in kinds}
  return made, x, y


def run_model(model: str, optimizers: list[str], batch: int, rounds: int, per_round: int,
              device, resnet18_width: int = 64, vxx_reg: float = 0.0,
              trained_steps: int = 0, kinds=("network",)) -> list[dict]:
  made, x, y = problems(model, batch, resnet18_width, kinds)
  x, y = jax.device_put((x, y), device)
  # The same batches for every optimizer, loaded and placed once.
  first = list(itertools.islice(training_batches(model, batch, device), trained_steps))
  steps, rows = {}, {}
  for kind, (game, params) in made.items():
    params = jax.device_put(params, device)
    for name in optimizers:
      compiled, state, compile_s, peak = compiled_step(name, game, params, x, y, vxx_reg)
      start = train_first(compiled, params, state, iter(first), trained_steps)
      steps[(kind, name)] = (compiled,) + start
      rows[(kind, name)] = {"model": model, "game": kind, "optimizer": name, "batch": batch,
                            "vxx_reg": vxx_reg, "trained_steps": trained_steps,
                            "compile_s": compile_s, "peak_bytes": peak}
      print(f"  compiled {model}/{kind}/{name} in {compile_s:.1f} s", flush=True)
  times = time_rounds(steps, x, y, rounds, per_round)
  for (kind, name), r in rows.items():
    base = {b: times.get((kind, b)) for b in ("sgd", "adam")}
    mem_sgd = rows.get((kind, "sgd"), {}).get("peak_bytes")
    r["step_s"] = times[(kind, name)]
    r["vs_sgd"] = times[(kind, name)] / base["sgd"] if base["sgd"] else None
    r["vs_adam"] = times[(kind, name)] / base["adam"] if base["adam"] else None
    r["vs_first_game"] = times[(kind, name)] / times[(kinds[0], name)]
    r["memory_vs_sgd"] = (r["peak_bytes"] / mem_sgd if mem_sgd and r["peak_bytes"]
                          else None)
  return list(rows.values())


def table(rows: list[dict]) -> str:
  """The rows as a markdown table; with several games, a game column and the ratio to the first."""
  fmt = lambda v, spec: "–" if v is None else format(v, spec)
  kinds = list(dict.fromkeys(r["game"] for r in rows))
  several = len(kinds) > 1
  head = "| model | " + ("game | " if several else "") + "optimizer | step (ms) | "
  head += f"/ {kinds[0]} game | " if several else ""
  lines = [head + "/ optax.sgd | / optax.adam | compile (s) | memory / sgd |",
           "|---|" + "---|" * (8 if several else 6)]
  for r in rows:
    line = f"| {r['model']} | " + (f"{r['game']} | " if several else "")
    line += f"{r['optimizer']} | {r['step_s'] * 1e3:.2f} | "
    line += f"{r['vs_first_game']:.2f} | " if several else ""
    lines.append(line + f"{fmt(r['vs_sgd'], '.2f')} | {fmt(r['vs_adam'], '.2f')} | "
                 f"{r['compile_s']:.1f} | {fmt(r['memory_vs_sgd'], '.2f')} |")
  return "\n".join(lines)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--models", default="mlp,resnet",
                 help=f"comma-separated, from {games.NETWORKS + ('resnet18',)}")
  p.add_argument("--resnet18-width", type=int, default=64,
                 help="base width of the resnet18 model (64: ResNet18)")
  p.add_argument("--optimizers", default=DEFAULT_OPTIMIZERS)
  p.add_argument("--games", default="network",
                 help=f"for the mlp and the resnet: comma-separated, from "
                      f"{flax_networks.GAME_KINDS}; ratios are to the first")
  p.add_argument("--batch", type=int, default=128)
  p.add_argument("--rounds", type=int, default=11)
  p.add_argument("--steps", type=int, default=10, help="steps per round")
  p.add_argument("--device", default="cpu", choices=("cpu", "gpu"))
  p.add_argument("--vxx-reg", type=float, default=0.0,
                 help="the fne/gr solvers' value-Hessian Tikhonov term")
  p.add_argument("--trained-steps", type=int, default=30,
                 help="training steps on other batches before the timed rounds "
                      "(0: time from the initial params and fresh state)")
  p.add_argument("--out", default=None, help="JSON path (default runs/benchmarks/...)")
  args = p.parse_args(argv)
  if args.trained_steps < 0:
    p.error("--trained-steps must be >= 0")
  device, machine = timing.device_and_machine(args.device)
  optimizers = [o for o in args.optimizers.split(",") if o]
  rows = []
  for model in args.models.split(","):
    print(f"{model}: batch {args.batch}, {args.rounds} rounds of {args.steps} steps "
          f"after {args.trained_steps} training steps", flush=True)
    with jax.default_device(device):
      done = run_model(model, optimizers, args.batch, args.rounds, args.steps, device,
                       args.resnet18_width, args.vxx_reg, args.trained_steps,
                       tuple(args.games.split(",")))
    rows += done
    print(f"\n{machine}\n\n{table(done)}")
    # Written after every model: an interrupted run keeps the models it finished.
    timing.write_record(args.out, f"step_time_{args.device}.json",
                        {"machine": machine, "rows": rows})
  return 0


if __name__ == "__main__":
  sys.exit(main())
