"""What the Kronecker curvatures cost on wide layers, beside optax (and kfac-jax's K-FAC).

    python benchmarks/curvature_cost.py                     # mlp 64/128, mlp 256/512, conv 64/128
    python benchmarks/curvature_cost.py --sizes mlp:256:512 --rounds 9
    python benchmarks/curvature_cost.py --fast              # a quick check (2 rounds of 2 steps)
    python benchmarks/curvature_cost.py --compare-kfac-jax  # and kfac-jax 0.0.8 on the MLPs

Sizes are ``model:width:batch``: ``mlp`` is 4 x Dense(width, tanh) + Dense(10)
on DIGITS's 64 standardised features, ``conv`` 3 x Conv2D(width, 3x3, relu),
AvgPool(2x2) and Dense(10) on DIGITS's 8x8x1 images (the pooling keeps the
head's input factor at ``4 * 4 * width + 1`` rows rather than four times that).

Cases, every one built by name (:func:`dgnopt_jax.optimizer_from_name`): ``optax.sgd`` (0.1) and
``optax.adam`` (1e-3) on the network's loss; ``fne-sgd`` (``dgnopt_jax.fne``
with the identity curvature, 0.1) and ``fne-adam`` (1e-3); ``gr-kfac`` and
``gr-ekfac`` (0.03) with the factors' statistics every 5 steps and their
eigendecompositions every 10 (``curvature.kfac(statistics_every=5,
inverse_every=10)``); ``olne-kfac`` (0.03), plain K-FAC (the open-loop solver,
no feedback) for reference. The learning rates are the library's defaults
(``dgnopt_jax.DEFAULT_LEARNING_RATES``).

Protocol, one process: every case is compiled ahead of time (memory: XLA's
compiled memory analysis, the peak live bytes of one step, as
``step_time.py``) and warmed up, then trained ``--trained-steps`` (30) steps
on other batches (the same list for every case); then ``--rounds`` (9)
interleaved rounds of ``--steps`` (10) steps each, every case restarting from
its own trained params and state (``timing.interleaved_step_times``; host
LAPACK on one thread); the step time is the median over rounds. Ten steps
from step 31 on hold one refresh of the eigendecompositions and two
statistics steps, the average regime of these periods.

Per size, one table: step time, ratios to optax.sgd and optax.adam, memory
relative to optax.sgd, and the derived figures:

* the curvature's extra cost, ``(gr-kfac - fne-sgd) / optax.sgd`` and
  ``(gr-ekfac - fne-sgd) / optax.sgd``: what the Kronecker curvature adds to
  the feedback solver's step, in optax.sgd steps;
* ``(fne-adam / optax.adam) / (fne-sgd / optax.sgd)``: whether the solver
  costs more, relative to its optax counterpart, with Adam's curvature than
  with the identity.

``--compare-kfac-jax`` also times kfac-jax 0.0.8's ``kfac_jax.Optimizer``
(``benchmarks/kfac_jax_anchor.py``) on the same MLPs beside its own
optax.sgd, in a virtual environment of its own (``benchmarks/.venv-kfac-jax``,
made with pip the first time: kfac-jax 0.0.8 needs jax <= 0.7), and
``gr-kfac/1`` (statistics every step) here, and prints one table of the
curvature's extra cost: ours ``(gr-kfac - fne-sgd) / sgd`` and
``(olne-kfac - sgd) / sgd`` against kfac-jax's ``(K-FAC - sgd) / sgd``.

Writes every figure as JSON (``--out``, default
``runs/benchmarks/curvature_cost_<device>.json``).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax

import dgnopt_jax as dgnopt
from dgnopt_jax import datasets

import step_time
import timing

G = dgnopt.games
HERE = pathlib.Path(__file__).resolve().parent

DEFAULT_SIZES = "mlp:64:128,mlp:256:512,conv:64:128"
STATISTICS_EVERY = 5

KFAC_JAX_VENV = HERE / ".venv-kfac-jax"
KFAC_JAX_PACKAGES = ("jax==0.7.2", "jaxlib==0.7.2", "kfac-jax==0.0.8", "optax", "flax",
                     "scikit-learn", "threadpoolctl")


# ----------------------------------------------------------------------------
# Networks and steps.
# ----------------------------------------------------------------------------


def parse_sizes(text: str) -> list[tuple[str, int, int]]:
  """``"mlp:64:128,conv:64:128"`` -> ``[("mlp", 64, 128), ("conv", 64, 128)]``."""
  sizes = []
  for item in filter(None, text.split(",")):
    parts = item.split(":")
    if len(parts) != 3 or parts[0] not in ("mlp", "conv") or not all(
        p.isdigit() and int(p) > 0 for p in parts[1:]):
      raise ValueError(f"size {item!r}: expected mlp:<width>:<batch> or conv:<channels>:<batch>")
    sizes.append((parts[0], int(parts[1]), int(parts[2])))
  if not sizes:
    raise ValueError("no sizes given")
  return sizes


def network(model: str, width: int, data: datasets.Dataset) -> G.Game:
  """The MLP (4 tanh layers of ``width``) or the conv net (3 convolutions of ``width`` channels)."""
  if model == "mlp":
    layers = [G.Dense(width, "tanh") for _ in range(4)] + [G.Dense(data.num_classes)]
  else:
    layers = [G.Conv2D(width, (3, 3), activation="relu") for _ in range(3)]
    layers += [G.AvgPool((2, 2)), G.Dense(data.num_classes)]
  return G.sequential(layers, data.x_train.shape[1:])


def cases(game: G.Game, with_every_step_statistics: bool) -> dict:
  """``name -> (init, jitted step)`` of every case timed, at the default learning rates.

  The Kronecker cases fold a batch into their factors every
  ``STATISTICS_EVERY`` steps (``/5``) and refresh the eigendecompositions
  every ``inverse_every`` (the default, 10); ``gr-kfac/1`` folds every step,
  beside kfac-jax's ``curvature_update_period=1``.
  """
  names = {"optax.sgd": "sgd", "optax.adam": "adam", "fne-sgd": "fne-sgd",
           "fne-adam": "fne-adam", "gr-kfac": f"gr-kfac/{STATISTICS_EVERY}",
           "gr-ekfac": f"gr-ekfac/{STATISTICS_EVERY}",
           "olne-kfac": f"olne-kfac/{STATISTICS_EVERY}"}
  if with_every_step_statistics:
    names["gr-kfac/1"] = "gr-kfac/1"
  out = {}
  for key, name in names.items():
    built = dgnopt.optimizer_from_name(name, game)
    out[key] = (built.tx.init, jax.jit(built.step))
  return out


def problem(model: str, width: int, batch: int, trained_steps: int, device):
  """(game, params, timed x, timed y, the training batches) on ``device``."""
  data = datasets.load("digits", images=model == "conv")
  game = network(model, width, data)
  rng = np.random.default_rng(0)
  idx = rng.choice(len(data.x_train), batch, replace=batch > len(data.x_train))
  x, y = np.asarray(data.x_train[idx], np.float32), np.asarray(data.y_train[idx])
  others = datasets.batches(data.x_train, data.y_train, batch, seed=1)
  first = [jax.device_put((np.asarray(bx, np.float32), np.asarray(by)), device)
           for bx, by in itertools.islice(others, trained_steps)]
  params = game.init(jax.random.PRNGKey(0))
  return (game,) + tuple(jax.device_put((params, x, y), device)) + (first,)


# ----------------------------------------------------------------------------
# One size.
# ----------------------------------------------------------------------------


def run_size(model: str, width: int, batch: int, rounds: int, per_round: int,
             trained_steps: int, device, with_every_step_statistics: bool = False) -> dict:
  """Times every case on one network; returns the figures of one size."""
  game, params, x, y, first = problem(model, width, batch, trained_steps, device)
  timed, rows = {}, {}
  for name, (init, step) in cases(game, with_every_step_statistics).items():
    state = init(params)
    compiled, compile_s, peak = step_time.compile_ahead(step, params, state, x, y)
    jax.block_until_ready(compiled(params, state, x, y))  # warm-up
    start = step_time.train_first(compiled, params, state, iter(first), trained_steps)
    timed[name] = (compiled,) + start + (x, y)
    rows[name] = {"compile_s": compile_s, "peak_bytes": peak}
    print(f"  compiled {model}:{width}:{batch} {name} in {compile_s:.1f} s", flush=True)
  seconds = timing.interleaved_step_times(timed, rounds, per_round, warm_each_round=False)
  sgd, adam = seconds["optax.sgd"], seconds["optax.adam"]
  mem_sgd = rows["optax.sgd"]["peak_bytes"]
  for name, row in rows.items():
    row["step_s"] = seconds[name]
    row["vs_sgd"] = seconds[name] / sgd
    row["vs_adam"] = seconds[name] / adam
    row["memory_vs_sgd"] = (row["peak_bytes"] / mem_sgd
                            if mem_sgd and row["peak_bytes"] else None)
  return {"model": model, "width": width, "batch": batch, "rounds": rounds,
          "steps_per_round": per_round, "trained_steps": trained_steps, "cases": rows,
          "derived": derived(seconds)}


def derived(seconds: dict) -> dict:
  """The curvature's extra cost in optax.sgd steps, and fne-adam's ratio over fne-sgd's."""
  sgd, fne = seconds["optax.sgd"], seconds["fne-sgd"]
  out = {f"({name} - fne-sgd) / optax.sgd": (seconds[name] - fne) / sgd
         for name in ("gr-kfac", "gr-ekfac", "gr-kfac/1") if name in seconds}
  out["(olne-kfac - optax.sgd) / optax.sgd"] = (seconds["olne-kfac"] - sgd) / sgd
  out["(fne-adam / optax.adam) / (fne-sgd / optax.sgd)"] = (
      (seconds["fne-adam"] / seconds["optax.adam"]) / (fne / sgd))
  return out


def size_table(result: dict) -> str:
  fmt = lambda v, spec: "–" if v is None else format(v, spec)
  lines = [f"{result['model']}, width {result['width']}, batch {result['batch']} "
           f"({result['rounds']} rounds of {result['steps_per_round']} steps after "
           f"{result['trained_steps']} trained)", "",
           "| case | step (ms) | / optax.sgd | / optax.adam | memory / sgd |",
           "|---|---|---|---|---|"]
  for name, r in result["cases"].items():
    lines.append(f"| {name} | {r['step_s'] * 1e3:.2f} | {r['vs_sgd']:.2f} | "
                 f"{r['vs_adam']:.2f} | {fmt(r['memory_vs_sgd'], '.2f')} |")
  for name, value in result["derived"].items():
    lines.append(f"| **{name}** | | {value:.2f} | | |")
  return "\n".join(lines)


# ----------------------------------------------------------------------------
# kfac-jax.
# ----------------------------------------------------------------------------


def kfac_jax_python() -> str:
  """The python of ``benchmarks/.venv-kfac-jax``, made the first time it is asked for.

  kfac-jax 0.0.8 needs jax <= 0.7, older than this project's, hence a virtual
  environment of its own (``python -m venv``, then pip). A marker names the
  packages installed; a venv without it (an install that failed) is made anew.
  """
  python = KFAC_JAX_VENV / "bin" / "python"
  marker = KFAC_JAX_VENV / "installed.txt"
  wanted = "\n".join(KFAC_JAX_PACKAGES) + "\n"
  if marker.exists() and marker.read_text() == wanted and python.exists():
    return str(python)
  print(f"making {KFAC_JAX_VENV} ({' '.join(KFAC_JAX_PACKAGES)})", flush=True)
  subprocess.run([sys.executable, "-m", "venv", "--clear", str(KFAC_JAX_VENV)], check=True)
  subprocess.run([str(python), "-m", "pip", "install", "-q", *KFAC_JAX_PACKAGES], check=True)
  marker.write_text(wanted)
  return str(python)


def run_kfac_jax(sizes: list, rounds: int, per_round: int, trained_steps: int) -> dict:
  """kfac_jax_anchor.py's JSON: its K-FAC and optax.sgd on the MLP sizes."""
  python = kfac_jax_python()
  spec = ",".join(f"{w}:{b}" for _, w, b in sizes)
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(
      [str(HERE.parent)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
  done = subprocess.run(
      [python, str(HERE / "kfac_jax_anchor.py"), "--sizes", spec, "--rounds", str(rounds),
       "--steps", str(per_round), "--trained-steps", str(trained_steps)],
      env=env, stdout=subprocess.PIPE, text=True, check=True)
  return json.loads(done.stdout)


def anchor_table(ours: list, theirs: dict) -> str:
  lines = ["curvature's extra cost in optax.sgd steps (ours beside fne-sgd or optax.sgd, "
           "kfac-jax beside its own optax.sgd)", "",
           "| width / batch | ours (gr-kfac - fne-sgd) / sgd | ours (gr-kfac/1 - fne-sgd) / sgd "
           "| ours (olne-kfac - sgd) / sgd | kfac-jax (K-FAC/5 - sgd) / sgd "
           "| kfac-jax (K-FAC/1 - sgd) / sgd | kfac-jax sgd (ms) | our sgd (ms) |",
           "|---|---|---|---|---|---|---|---|"]
  for result in ours:
    key = f"{result['width']}:{result['batch']}"
    if result["model"] != "mlp" or key not in theirs["sizes"]:
      continue
    d, t = result["derived"], theirs["sizes"][key]["seconds"]
    ksgd = t["optax.sgd"]
    lines.append(
        f"| {result['width']} / {result['batch']} | "
        f"{d['(gr-kfac - fne-sgd) / optax.sgd']:.2f} | "
        f"{d.get('(gr-kfac/1 - fne-sgd) / optax.sgd', float('nan')):.2f} | "
        f"{d['(olne-kfac - optax.sgd) / optax.sgd']:.2f} | "
        f"{(t['kfac/5'] - ksgd) / ksgd:.2f} | {(t['kfac/1'] - ksgd) / ksgd:.2f} | "
        f"{ksgd * 1e3:.2f} | {result['cases']['optax.sgd']['step_s'] * 1e3:.2f} |")
  return "\n".join(lines)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--sizes", default=DEFAULT_SIZES,
                 help="comma-separated model:width:batch, model mlp or conv "
                      "(default: %(default)s)")
  p.add_argument("--rounds", type=int, default=9)
  p.add_argument("--steps", type=int, default=10, help="timed steps per round")
  p.add_argument("--trained-steps", type=int, default=30,
                 help="training steps on other batches before the timed rounds")
  p.add_argument("--fast", action="store_true",
                 help="a quick check: 2 rounds of 2 steps after 5 trained steps")
  p.add_argument("--compare-kfac-jax", action="store_true",
                 help="also time kfac-jax 0.0.8's K-FAC on the MLP sizes (makes "
                      "benchmarks/.venv-kfac-jax the first time)")
  p.add_argument("--device", default="cpu", choices=("cpu", "gpu"))
  p.add_argument("--out", default=None, help="JSON path (default runs/benchmarks/...)")
  args = p.parse_args(argv)
  try:
    sizes = parse_sizes(args.sizes)
  except ValueError as e:
    p.error(str(e))
  if args.fast:
    args.rounds, args.steps, args.trained_steps = 2, 2, 5
  if min(args.rounds, args.steps) < 1 or args.trained_steps < 0:
    p.error("--rounds and --steps must be >= 1, --trained-steps >= 0")
  if args.compare_kfac_jax and args.device != "cpu":
    p.error("--compare-kfac-jax runs on the CPU (its venv has jax's CPU wheels)")
  device, machine = timing.device_and_machine(args.device)
  results, record = [], {"machine": machine, "sizes": []}
  for model, width, batch in sizes:
    print(f"{model}: width {width}, batch {batch}", flush=True)
    with jax.default_device(device):
      results.append(run_size(model, width, batch, args.rounds, args.steps, args.trained_steps,
                              device, args.compare_kfac_jax and model == "mlp"))
    print(f"\n{size_table(results[-1])}\n", flush=True)
    record["sizes"] = results
    # Written after every size: an interrupted run keeps the sizes it finished.
    timing.write_record(args.out, f"curvature_cost_{args.device}.json", record)
  mlps = [s for s in sizes if s[0] == "mlp"]
  if args.compare_kfac_jax and mlps:
    record["kfac_jax"] = run_kfac_jax(mlps, args.rounds, args.steps, args.trained_steps)
    print(f"\n{anchor_table(results, record['kfac_jax'])}\n")
    print(f"kfac-jax: {record['kfac_jax']['machine']}")
    timing.write_record(args.out, f"curvature_cost_{args.device}.json", record)
  print(machine)
  return 0


if __name__ == "__main__":
  sys.exit(main())
