"""Compile time of one train step against depth: residual networks of 4 .. 32 identical blocks.

    python benchmarks/compile_depth.py [--depths 4,8,16,32] [--optimizers sgd,fne-sgd,gr-sgd,fne-kfac]
    python benchmarks/compile_depth.py --games network,flax

The network is the main job's residual CNN on 8x8 DIGITS images (a conv stem,
N identity-shortcut residual blocks of 12 maps, pooling, a dense head). Runs
of identical stages are solved with ``lax.scan`` over stacked parameters, so
the compiled program, and its compile time, should not grow with N. For every
optimizer the script lowers and compiles the jit-compiled step (one process,
one run; fresh jit objects so nothing is cached), prints compile seconds per
depth and the ratio to the shallowest, and writes JSON.

``--games`` makes the game the ways of ``flax_networks.py``: ``network`` (the
hand-written game, the default), ``flax`` (the same network as a Flax model,
traced by ``games.from_flax``); a row per game and optimizer.
"""

from __future__ import annotations

import argparse
import sys
import time

import jax
import numpy as np

import dgnopt_jax as dgnopt
from dgnopt_jax import datasets

import flax_networks
import timing


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--depths", default="4,8,16,32")
  p.add_argument("--optimizers", default="sgd,fne-sgd,gr-sgd,fne-kfac")
  p.add_argument("--games", default="network",
                 help=f"comma-separated, from {flax_networks.GAME_KINDS}")
  p.add_argument("--batch", type=int, default=64)
  p.add_argument("--out", default=None)
  args = p.parse_args(argv)
  depths = [int(d) for d in args.depths.split(",")]
  data = datasets.load("digits", images=True)
  x = np.asarray(data.x_train[:args.batch], np.float32)
  y = np.asarray(data.y_train[:args.batch])
  rows = []
  for kind in args.games.split(","):
    for name in args.optimizers.split(","):
      seconds = {}
      for depth in depths:
        game, params = flax_networks.game_and_params(kind, "resnet", x, data.num_classes,
                                                     residual_blocks=depth)
        optimizer = dgnopt.optimizer_from_name(name, game)
        state = optimizer.tx.init(params)
        start = time.perf_counter()
        jax.jit(optimizer.step).lower(params, state, x, y).compile()
        seconds[depth] = time.perf_counter() - start
        print(f"  {kind} game, {name}, {depth} blocks: {seconds[depth]:.1f} s", flush=True)
      rows.append({"game": kind, "optimizer": name, "compile_s": seconds,
                   "deepest_vs_shallowest": seconds[depths[-1]] / seconds[depths[0]]})
  head = ("| game | optimizer | " + " | ".join(f"{d} blocks (s)" for d in depths) +
          f" | {depths[-1]} / {depths[0]} |")
  lines = [head, "|" + "---|" * (len(depths) + 3)]
  for r in rows:
    lines.append(f"| {r['game']} | {r['optimizer']} | " +
                 " | ".join(f"{r['compile_s'][d]:.1f}" for d in depths) +
                 f" | {r['deepest_vs_shallowest']:.2f} |")
  print(f"\njax {jax.__version__}, {jax.default_backend()}, batch {args.batch}\n")
  print("\n".join(lines))
  timing.write_record(args.out, f"compile_depth_{jax.default_backend()}.json", {"rows": rows})
  return 0


if __name__ == "__main__":
  sys.exit(main())
