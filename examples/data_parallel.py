"""Data-parallel DGNOpt on a device mesh, on one host or many.

    # one host, its CPU split into 8 devices (any machine can try this)
    python examples/data_parallel.py --cpu-devices 8

    # one host, all its GPUs / TPU cores; kernels also split over 2 devices
    python examples/data_parallel.py --model-parallel 2

    # several hosts: the same command on every host, each with its own id
    python examples/data_parallel.py --coordinator host0:1234 --num-processes 2 --process-id 0
    python examples/data_parallel.py --coordinator host0:1234 --num-processes 2 --process-id 1

    # on a cluster whose environment jax.distributed detects (SLURM, Cloud TPU)
    python examples/data_parallel.py --distributed

The recipe (docs/SHARDING.md has the details):

1. ``jax.distributed.initialize(...)`` first on every host (multi-host only);
2. a mesh over ``jax.devices()`` (all devices of all hosts);
3. params and optimizer state placed with their shardings
   (:func:`dgnopt_jax.sharding.params_sharding`, :func:`state_sharding`);
4. every host reads its own slice of each global batch and
   :func:`dgnopt_jax.sharding.shard_batch` assembles the global array;
5. one ``jax.jit`` train step with those shardings in and out.

The step computes global-batch statistics whatever the number of devices,
so the trained params do not depend on it (up to floating-point rounding).
"""

from __future__ import annotations

import argparse
import os
import sys
import time


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--optimizer", default="gr-kfac",
                 help="a name [<solver>-]<curvature>[/N][@lr] of "
                      "dgnopt_jax.optimizer_from_name, e.g. fne-adam, gr-kfac/5@0.05, adam")
  p.add_argument("--lr", type=float, default=None,
                 help="learning rate of a name without @lr (default: the curvature's, "
                      "dgnopt_jax.DEFAULT_LEARNING_RATES)")
  p.add_argument("--steps", type=int, default=200)
  p.add_argument("--batch-size", type=int, default=128, help="global batch size")
  p.add_argument("--model-parallel", type=int, default=1,
                 help="devices each kernel is split over (the mesh's model axis)")
  p.add_argument("--cpu-devices", type=int, default=None,
                 help="split this host's CPU into N devices (sets XLA_FLAGS)")
  p.add_argument("--coordinator", default=None, help="host:port of process 0")
  p.add_argument("--num-processes", type=int, default=None)
  p.add_argument("--process-id", type=int, default=None)
  p.add_argument("--distributed", action="store_true",
                 help="call jax.distributed.initialize() with the cluster's defaults")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--save", default=None, help="write the trained params here (host 0)")
  return p.parse_args(argv)


def make_game():
  """DIGITS classifier: 64 -> 128 -> 128 -> 10, tanh."""
  import dgnopt_jax as dgnopt
  G = dgnopt.games
  return G.sequential([G.Dense(128, "tanh"), G.Dense(128, "tanh"), G.Dense(10)], (64,))


def main(argv=None) -> int:
  args = parse_args(argv)
  if args.cpu_devices:  # must be set before JAX starts its backends
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               f" --xla_force_host_platform_device_count={args.cpu_devices}")
    os.environ.setdefault("JAX_PLATFORMS", "cpu")

  import jax
  import numpy as np
  from jax.experimental import multihost_utils

  import dgnopt_jax as dgnopt
  from dgnopt_jax import datasets
  from dgnopt_jax import sharding

  if args.coordinator or args.distributed:
    jax.distributed.initialize(args.coordinator, args.num_processes, args.process_id)
  host, hosts = jax.process_index(), jax.process_count()
  say = print if host == 0 else (lambda *a, **k: None)

  mesh = sharding.make_mesh(model=args.model_parallel)
  say(f"{hosts} host(s), {jax.device_count()} {jax.devices()[0].platform} devices, "
      f"mesh {dict(mesh.shape)}")
  if args.batch_size % mesh.shape[sharding.DATA_AXIS] or args.batch_size % hosts:
    raise SystemExit(f"--batch-size {args.batch_size} must be a multiple of the data axis "
                     f"({mesh.shape[sharding.DATA_AXIS]}) and of the number of hosts")

  data = datasets.load("digits")
  game = make_game()
  optimizer = dgnopt.optimizer_from_name(args.optimizer, game, args.lr, vxx_reg=1e-4)
  tx = optimizer.tx

  # Shardings from shapes alone: nothing is materialised on one device first.
  abstract = jax.eval_shape(game.init, jax.random.PRNGKey(args.seed))
  model_axis = sharding.MODEL_AXIS if args.model_parallel > 1 else None
  params_sh = sharding.params_sharding(abstract, mesh, model_axis=model_axis, min_size=4096)
  state_sh = sharding.state_sharding(tx.init, abstract, params_sh, mesh)
  batch_sh = sharding.batch_sharding(mesh)
  params = jax.jit(game.init, out_shardings=params_sh)(jax.random.PRNGKey(args.seed))
  state = jax.jit(tx.init, out_shardings=state_sh)(params)

  train_step = jax.jit(optimizer.step, in_shardings=(params_sh, state_sh, batch_sh, batch_sh),
                       out_shardings=(params_sh, state_sh, sharding.replicated(mesh)),
                       donate_argnums=(0, 1))

  # Every host draws the same global batch order and keeps its own rows.
  local = args.batch_size // hosts
  stream = datasets.batches(data.x_train, data.y_train, args.batch_size, seed=args.seed)
  times = []
  for i in range(1, args.steps + 1):
    x, y = next(stream)
    rows = slice(host * local, (host + 1) * local)
    batch = sharding.shard_batch((x[rows], y[rows]), mesh)
    start = time.perf_counter()
    params, state, loss = train_step(params, state, *batch)
    loss = float(loss)
    times.append(time.perf_counter() - start)
    if i % max(args.steps // 10, 1) == 0 or i == args.steps:
      say(f"step {i:5d}  loss {loss:.4f}", flush=True)

  full = multihost_utils.process_allgather(params, tiled=True)
  if args.save and host == 0:
    dgnopt.checkpoint.save(args.save, full)
  logits = jax.jit(game.apply)(full, data.x_test)
  accuracy = float(np.mean(np.argmax(np.asarray(logits), -1) == data.y_test))
  step_ms = 1e3 * float(np.median(times[1:] if len(times) > 1 else times))
  say(f"\n| optimizer | devices | mesh | final loss | test accuracy | step (ms) |\n"
      f"|---|---|---|---|---|---|\n"
      f"| {args.optimizer} | {jax.device_count()} | {dict(mesh.shape)} | {loss:.4f} | "
      f"{100 * accuracy:.2f}% | {step_ms:.1f} |")
  return 0


if __name__ == "__main__":
  sys.exit(main())
