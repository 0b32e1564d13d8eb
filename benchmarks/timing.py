"""Step times measured side by side: interleaved rounds, median over rounds.

Shared by the benchmark scripts (imported as a sibling module when they run
as ``python benchmarks/<script>.py``), with the device lookup and the JSON
record they all write.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time

import jax

import dgnopt_jax as dgnopt


def interleaved_step_times(cases: dict, rounds: int, repeats: int,
                           warm_each_round: bool = True, lapack_threads: int | None = 1,
                           copy_start: bool = False) -> dict:
  """Median over interleaved rounds of each case's mean step time (seconds).

  Args:
    cases: ``key -> (step, params, state, x, y)`` with ``step(params, state,
      x, y)`` returning ``(params, state, ...)``. Every case is compiled and
      warmed up first; each round then runs every case once, restarting it
      from its own ``params`` and ``state``, so that a slow spell of the
      machine falls on all of them.
    rounds: how many rounds.
    repeats: timed steps per case and round (``block_until_ready`` after each).
    warm_each_round: run one untimed step before each case's timed ones, so
      that a small program does not start with the caches the previous,
      larger one left cold.
    lapack_threads: on a CPU, the host LAPACK's threads while timing
      (:func:`dgnopt_jax.limit_lapack_threads`, as the main job sets them;
      only the Kronecker curvatures' eigendecompositions call it); None
      leaves them as they are.
    copy_start: hand each case a copy of its ``params`` and ``state`` (made
      before the timed steps), for steps that donate their arguments
      (kfac-jax's ``Optimizer.step``): a donated start could not be
      restarted from.

  Returns:
    ``key -> seconds per step``.
  """
  limit = None
  if lapack_threads and jax.default_backend() == "cpu":
    limit = dgnopt.limit_lapack_threads(lapack_threads)
  try:
    return _median_times(cases, rounds, repeats, warm_each_round, copy_start)
  finally:
    if limit is not None:
      limit.restore_original_limits()


def _copy_arrays(tree):
  """``tree`` with every array copied (other leaves, such as Python ints, kept)."""
  copied = jax.tree.map(lambda l: l.copy() if isinstance(l, jax.Array) else l, tree)
  return jax.block_until_ready(copied)


def _median_times(cases: dict, rounds: int, repeats: int, warm_each_round: bool,
                  copy_start: bool) -> dict:
  start_of = _copy_arrays if copy_start else (lambda tree: tree)
  for step, params, state, x, y in cases.values():
    jax.block_until_ready(step(*start_of((params, state)), x, y))
  samples = {key: [] for key in cases}
  for _ in range(rounds):
    for key, (step, params, state, x, y) in cases.items():
      p, s = start_of((params, state))
      if warm_each_round:
        out = step(p, s, x, y)
        jax.block_until_ready(out)
        p, s = out[0], out[1]
      start = time.perf_counter()
      for _ in range(repeats):
        out = step(p, s, x, y)
        jax.block_until_ready(out)
        p, s = out[0], out[1]
      samples[key].append((time.perf_counter() - start) / repeats)
  return {key: statistics.median(v) for key, v in samples.items()}


def device_and_machine(kind: str):
  """(first device of ``kind``, a one-line description of the machine); exits if none."""
  try:
    device = jax.devices(kind)[0]
  except RuntimeError as e:
    raise SystemExit(f"--device {kind}: no such device here ({e})")
  machine = (f"{device.device_kind} ({kind}), {os.cpu_count()} host cores, "
             f"{platform.machine()}, jax {jax.__version__}")
  return device, machine


def write_record(out: str | None, default_name: str, record: dict) -> str:
  """Writes ``record`` and the command line as JSON to ``out`` (default
  ``runs/benchmarks/<default_name>``), prints and returns the path."""
  out = out or os.path.join("runs", "benchmarks", default_name)
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  with open(out, "w") as f:
    json.dump({"command": " ".join(sys.argv), **record}, f, indent=1)
  print(f"\nwrote {out}")
  return out
