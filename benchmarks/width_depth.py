"""Step time against width and depth: DGNOpt beside optax on DIGITS MLPs, one process, one run.

    python benchmarks/width_depth.py [--widths 16,64,256] [--depths 2,8,16]
        [--optimizers sgd,adam,fne-sgd,gr-sgd,fne-adam,gr-kfac] [--rounds 9] [--repeats 5]

MLPs of tanh layers and a linear head on DIGITS (8x8 images flattened), batch
128: one series varies the width at depth 4, the other the depth (hidden
layers) at width 32. Every (network, optimizer) step is compiled and warmed
up first, then all are timed in interleaved rounds (one untimed step, then
--repeats timed steps with block_until_ready, per round); the per-step time
is the median over rounds. Prints, per series, each optimizer's step time
relative to optax.sgd on the same network (and fne/gr with Adam relative to
optax.adam), and writes JSON. The solvers' work per step is a fixed number of
passes over the network, so these ratios should not grow with width or depth,
except where a curvature's own cost grows faster than the network's (KFAC's
eigendecompositions, cubic in the width).
"""

from __future__ import annotations

import argparse
import platform
import sys

import jax
import numpy as np

import dgnopt_jax as dgnopt
from dgnopt_jax import datasets
from dgnopt_jax import games as G

import timing


def mlp(width: int, depth: int, data: datasets.Dataset) -> G.Game:
  layers = [G.Dense(width, "tanh") for _ in range(depth)] + [G.Dense(data.num_classes)]
  return G.sequential(layers, data.x_train.shape[1:])


def table(series: str, configs: list, optimizers: list, seconds: dict) -> str:
  head = "| optimizer | " + " | ".join(f"{series} {c}" for c in configs) + " |"
  lines = [head, "|" + "---|" * (len(configs) + 1)]
  for name in optimizers:
    cells = []
    for c in configs:
      t = seconds[c, name]
      if name in ("sgd", "adam"):
        cells.append(f"{1e3 * t:.2f} ms" if name == "sgd" else f"{t / seconds[c, 'sgd']:.2f}")
      elif name.endswith("-adam") and (c, "adam") in seconds:
        cells.append(f"{t / seconds[c, 'adam']:.2f} (adam)")
      else:
        cells.append(f"{t / seconds[c, 'sgd']:.2f}")
    lines.append(f"| {name} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--widths", default="16,64,256")
  p.add_argument("--depths", default="2,8,16")
  p.add_argument("--optimizers", default="sgd,adam,fne-sgd,gr-sgd,fne-adam,gr-kfac")
  p.add_argument("--batch", type=int, default=128)
  p.add_argument("--rounds", type=int, default=9)
  p.add_argument("--repeats", type=int, default=5, help="timed steps per round")
  p.add_argument("--out", default=None)
  args = p.parse_args(argv)
  optimizers = args.optimizers.split(",")
  if "sgd" not in optimizers:
    p.error("--optimizers must include sgd (the reference of every ratio)")
  widths = [int(w) for w in args.widths.split(",")]
  depths = [int(d) for d in args.depths.split(",")]
  data = datasets.load("digits")
  idx = np.random.default_rng(0).choice(len(data.x_train), args.batch,
                                        replace=args.batch > len(data.x_train))
  x, y = np.asarray(data.x_train[idx], np.float32), np.asarray(data.y_train[idx])
  networks = {("width", w): mlp(w, 4, data) for w in widths}
  networks.update({("depth", d): mlp(32, d, data) for d in depths})
  cases = {}
  for key, game in networks.items():
    params = game.init(jax.random.PRNGKey(0))
    for name in optimizers:
      optimizer = dgnopt.optimizer_from_name(name, game)
      cases[key, name] = (jax.jit(optimizer.step), params, optimizer.tx.init(params), x, y)
    print(f"  built {key[0]} {key[1]}", flush=True)
  timings = timing.interleaved_step_times(cases, args.rounds, args.repeats)
  print(f"\njax {jax.__version__} on {jax.default_backend()} "
        f"({platform.processor() or platform.machine()}), batch {args.batch}, median over "
        f"{args.rounds} interleaved rounds of {args.repeats} steps; ratios to optax.sgd "
        f"(optax.adam where marked); sgd's row: its step time\n")
  for series, configs in (("width", widths), ("depth", depths)):
    seconds = {(c, name): timings[(series, c), name] for c in configs for name in optimizers}
    print(f"MLP {'depth 4' if series == 'width' else 'width 32'}, by {series}:\n")
    print(table(series, configs, optimizers, seconds) + "\n")
  timing.write_record(args.out, f"width_depth_{jax.default_backend()}.json", {
      "machine": platform.platform(),
      "seconds": [{"series": k[0][0], "value": k[0][1], "optimizer": k[1], "step_s": v}
                  for k, v in timings.items()]})
  return 0


if __name__ == "__main__":
  sys.exit(main())
