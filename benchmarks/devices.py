"""Step time of data-parallel DGNOpt on 1 vs N devices, one process, one run.

    python benchmarks/devices.py                          # 1 vs 8 CPU devices
    python benchmarks/devices.py --devices 4 --models mlp
    python benchmarks/devices.py --platform gpu           # 1 vs all GPUs

On CPU the host is split into ``--devices`` XLA devices
(``--xla_force_host_platform_device_count``), which share the same cores: the
figures say what the partitioning and the cross-device reductions cost, not
a speed-up. Every optimizer's train step is compiled with explicit shardings
(params and state replicated, the batch split over the mesh's data axis;
:mod:`dgnopt_jax.sharding`), timed in interleaved rounds (median over rounds
of the mean step time) on a mesh of one device and on a mesh of all devices,
from the same params and batch. After the timed rounds the script runs the
same ``--check-steps`` steps on both meshes and reports the largest relative
difference of the params: the trained params must not depend on the number
of devices.

Prints a table (step time on 1 and N devices, their ratio, the params
difference) and writes the figures as JSON.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--models", default="mlp,resnet")
  p.add_argument("--optimizers", default="sgd,adam,fne-sgd,gr-sgd,fne-adam,gr-adam,"
                 "fne-kfac,gr-kfac")
  p.add_argument("--devices", type=int, default=8, help="CPU devices to split the host into")
  p.add_argument("--platform", default="cpu", choices=("cpu", "gpu"))
  p.add_argument("--batch", type=int, default=128)
  p.add_argument("--rounds", type=int, default=7)
  p.add_argument("--steps", type=int, default=5, help="steps per round")
  p.add_argument("--check-steps", type=int, default=5)
  p.add_argument("--out", default=None, help="JSON path (default runs/benchmarks/...)")
  return p.parse_args(argv)


def main(argv=None) -> int:
  args = parse_args(argv)
  if args.platform == "cpu":  # before JAX starts its backends
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               f" --xla_force_host_platform_device_count={args.devices}")
    os.environ["JAX_PLATFORMS"] = "cpu"

  import jax
  import numpy as np

  import dgnopt_jax as dgnopt
  from dgnopt_jax import datasets
  from dgnopt_jax import sharding
  import timing
  from step_time import time_rounds

  devices = jax.devices(args.platform)
  meshes = {1: sharding.make_mesh(devices[:1]), len(devices): sharding.make_mesh(devices)}
  rows = []
  for model in args.models.split(","):
    data = datasets.load("digits", images=model in dgnopt.games.IMAGE_NETWORKS)
    game = dgnopt.games.network_from_name(model, data.x_train.shape[1:], data.num_classes)
    host_params = jax.device_get(game.init(jax.random.PRNGKey(0)))
    rng = np.random.default_rng(0)
    batches = [(np.asarray(data.x_train[idx], np.float32), np.asarray(data.y_train[idx]))
               for idx in (rng.choice(len(data.x_train), args.batch, replace=False)
                           for _ in range(args.check_steps))]
    print(f"{model}: batch {args.batch}, 1 vs {len(devices)} devices", flush=True)
    for name in [o for o in args.optimizers.split(",") if o]:
      optimizer = dgnopt.optimizer_from_name(name, game)
      init, step = optimizer.tx.init, optimizer.step
      steps, finals = {}, {}
      for count, mesh in meshes.items():
        p_sh = sharding.params_sharding(host_params, mesh)
        s_sh = sharding.state_sharding(init, host_params, p_sh, mesh)
        b_sh = sharding.batch_sharding(mesh)
        fn = jax.jit(step, in_shardings=(p_sh, s_sh, b_sh, b_sh),
                     out_shardings=(p_sh, s_sh, sharding.replicated(mesh)))
        params = jax.device_put(host_params, p_sh)
        state = jax.jit(init, out_shardings=s_sh)(params)
        x, y = sharding.shard_batch(batches[0], mesh)
        steps[count] = (fn, state, params, x, y)
        p, s = params, state
        for xb, yb in batches:
          p, s, _ = fn(p, s, *sharding.shard_batch((xb, yb), mesh))
        finals[count] = jax.device_get(p)
      times = {}
      for count, (fn, state, params, x, y) in steps.items():
        times[count] = time_rounds({name: (fn, params, state)}, x, y, args.rounds,
                                   args.steps)[name]
      one, many = finals[1], finals[len(devices)]
      diff = max(float(np.linalg.norm(np.asarray(a, np.float64) - b) /
                       max(np.linalg.norm(np.asarray(a, np.float64)), 1e-30))
                 for a, b in zip(jax.tree.leaves(one), jax.tree.leaves(many)))
      rows.append({"model": model, "optimizer": name, "batch": args.batch,
                   "step_s_1": times[1], f"step_s_{len(devices)}": times[len(devices)],
                   "ratio": times[len(devices)] / times[1], "params_rel_diff": diff})
      print(f"  {name}: {times[1] * 1e3:.2f} ms on 1, {times[len(devices)] * 1e3:.2f} ms "
            f"on {len(devices)}, params differ by {diff:.1e}", flush=True)

  n = len(devices)
  machine = (f"{devices[0].device_kind} ({args.platform}), {n} devices, {os.cpu_count()} "
             f"host cores, {platform.machine()}, jax {jax.__version__}")
  lines = [f"| model | optimizer | step 1 device (ms) | step {n} devices (ms) | "
           f"{n} / 1 | params rel. diff after {args.check_steps} steps |",
           "|---|---|---|---|---|---|"]
  for r in rows:
    lines.append(f"| {r['model']} | {r['optimizer']} | {r['step_s_1'] * 1e3:.2f} | "
                 f"{r[f'step_s_{n}'] * 1e3:.2f} | {r['ratio']:.2f} | "
                 f"{r['params_rel_diff']:.1e} |")
  print(f"\n{machine}\n\n" + "\n".join(lines))
  timing.write_record(args.out, f"devices_{args.platform}.json", {"machine": machine, "rows": rows})
  return 0


if __name__ == "__main__":
  sys.exit(main())
