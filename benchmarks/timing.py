"""Step times measured side by side: interleaved rounds, median over rounds.

Shared by the benchmark scripts (imported as a sibling module when they run
as ``python benchmarks/<script>.py``).
"""

from __future__ import annotations

import statistics
import time

import jax


def interleaved_step_times(cases: dict, rounds: int, repeats: int,
                           warm_each_round: bool = True) -> dict:
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

  Returns:
    ``key -> seconds per step``.
  """
  for step, params, state, x, y in cases.values():
    jax.block_until_ready(step(params, state, x, y))
  samples = {key: [] for key in cases}
  for _ in range(rounds):
    for key, (step, params, state, x, y) in cases.items():
      p, s = params, state
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
