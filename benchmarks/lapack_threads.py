"""Kronecker curvatures' step time with the host LAPACK on one thread vs its default, side by side.

    python benchmarks/lapack_threads.py                   # residual CNN, gr-kfac and fne-ekfac
    python benchmarks/lapack_threads.py --models mlp,resnet --rounds 21

KFAC/EKFAC refresh their factors' eigendecompositions every 10 steps with
``jnp.linalg.eigh``, a call into the host LAPACK on XLA's CPU backend, whose
OpenBLAS worker threads keep spinning after the call
(:func:`dgnopt_jax.limit_lapack_threads`). Every optimizer's step is compiled
once and timed in interleaved rounds, each round running it with LAPACK
limited to ``--threads`` and with OpenBLAS's own default (in alternating
order, so that neither setting always runs second). Each timed run restarts
from the initial state and runs ``--steps`` steps after one untimed step, so
it includes the refreshes of the default period. Prints the median step time
of both settings and their ratio; writes JSON.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import jax

import dgnopt_jax as dgnopt

import step_time
import timing


def time_settings(compiled: dict, params, x, y, rounds: int, per_round: int,
                  threads: int) -> dict:
  """``(optimizer, setting) -> median seconds per step``, settings ``default`` and ``limited``."""
  cases = [(name, setting) for name in compiled for setting in ("default", "limited")]
  samples = {case: [] for case in cases}
  for r in range(rounds):
    for name, setting in (cases if r % 2 == 0 else cases[::-1]):
      step, state = compiled[name]
      limit = dgnopt.limit_lapack_threads(threads) if setting == "limited" else None
      try:
        p, s, loss = step(params, state, x, y)
        jax.block_until_ready(loss)
        start = time.perf_counter()
        for _ in range(per_round):
          p, s, loss = step(p, s, x, y)
          jax.block_until_ready(loss)
        samples[(name, setting)].append((time.perf_counter() - start) / per_round)
      finally:
        if limit is not None:
          limit.restore_original_limits()
  return {case: statistics.median(v) for case, v in samples.items()}


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--models", default="resnet", help="comma-separated: mlp, cnn, resnet, inception")
  p.add_argument("--optimizers", default="gr-kfac,fne-ekfac")
  p.add_argument("--threads", type=int, default=1, help="LAPACK threads of the limited setting")
  p.add_argument("--batch", type=int, default=128)
  p.add_argument("--rounds", type=int, default=13)
  p.add_argument("--steps", type=int, default=10, help="timed steps per round")
  p.add_argument("--out", default=None, help="JSON path (default runs/benchmarks/...)")
  args = p.parse_args(argv)
  if jax.default_backend() != "cpu":
    raise SystemExit("the host LAPACK runs the eigendecompositions on the CPU backend only")
  rows = []
  for model in args.models.split(","):
    game, params, x, y = step_time.problem(model, args.batch, 64)
    compiled = {}
    for name in args.optimizers.split(","):
      step, state, _, _ = step_time.compiled_step(name, game, params, x, y)
      compiled[name] = (step, state)
    print(f"{model}: {args.rounds} rounds of {args.steps} steps", flush=True)
    times = time_settings(compiled, params, x, y, args.rounds, args.steps, args.threads)
    for name in compiled:
      default, limited = times[(name, "default")], times[(name, "limited")]
      rows.append({"model": model, "optimizer": name, "default_s": default,
                   "limited_s": limited, "threads": args.threads})
  lines = [f"| model | optimizer | default (ms) | {args.threads} LAPACK thread(s) (ms) "
           "| limited / default |", "|---|---|---|---|---|"]
  for r in rows:
    lines.append(f"| {r['model']} | {r['optimizer']} | {r['default_s'] * 1e3:.2f} | "
                 f"{r['limited_s'] * 1e3:.2f} | {r['limited_s'] / r['default_s']:.3f} |")
  _, machine = timing.device_and_machine("cpu")
  print(f"\n{machine}\n\n" + "\n".join(lines))
  timing.write_record(args.out, "lapack_threads.json", {"machine": machine, "rows": rows})
  return 0


if __name__ == "__main__":
  sys.exit(main())
