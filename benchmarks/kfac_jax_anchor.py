"""kfac-jax's K-FAC beside its own optax.sgd on the DIGITS MLP: an outside anchor for KFAC's cost.

    benchmarks/.venv-kfac-jax/bin/python benchmarks/kfac_jax_anchor.py --sizes 64:128,256:512

Run by ``curvature_cost.py --compare-kfac-jax`` in the virtual environment it
makes (kfac-jax 0.0.8 needs jax <= 0.7), with the repository on PYTHONPATH
(the DIGITS loader and the interleaved timer are this project's). Prints the
figures as JSON on stdout, progress on stderr.

The network is the MLP of ``curvature_cost.py``: 4 x Dense(width, tanh) +
Dense(10) on DIGITS's 64 standardised features, softmax cross-entropy (the
loss registered with ``kfac_jax.register_softmax_cross_entropy_loss``; the
layers found by kfac-jax's automatic registration). Cases:

* ``optax.sgd``: learning rate 0.1, a jit-compiled ``value_and_grad`` step;
* ``kfac/5`` and ``kfac/1``: ``kfac_jax.Optimizer`` with a fixed learning
  rate 0.03, no momentum, damping 0.1, ``inverse_update_period=10`` and
  ``curvature_update_period`` 5 or 1, its other settings as they come
  (``ggn_curvature_prop`` estimation, factored-damping inverses), no burn-in
  steps (the 30 trained steps take their place), stepped through ``.step``
  with ``global_step_int`` (the step count as a Python int, carried in the
  timed case's state beside the optimizer state) so that it decides on the
  host, not with a device read, whether a step updates the curvature.

Protocol, as ``curvature_cost.py``: every case compiled and warmed up, then
``--trained-steps`` steps on other batches (the same list for every case),
then ``--rounds`` interleaved rounds of ``--steps`` steps each
(``timing.interleaved_step_times``, host LAPACK on one thread), every round
restarting from a copy of the trained params and state made outside the
timing (kfac-jax's step donates its params and state); median over rounds.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import sys

import jax
import jax.numpy as jnp
import kfac_jax
import numpy as np
import optax

from dgnopt_jax import datasets

import timing

LR_SGD, LR_KFAC, DAMPING = 0.1, 0.03, 0.1
INVERSE_UPDATE_PERIOD = 10
CURVATURE_UPDATE_PERIODS = (5, 1)
DEPTH = 4


def init_mlp(key: jax.Array, width: int, inputs: int, classes: int) -> dict:
  """LeCun-normal kernels, zero biases: ``{"layer_<i>": {"kernel", "bias"}}``."""
  sizes = [inputs] + [width] * DEPTH + [classes]
  params = {}
  for i, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:])):
    key, sub = jax.random.split(key)
    params[f"layer_{i}"] = {
        "kernel": jax.random.normal(sub, (fan_in, fan_out), jnp.float32) / np.sqrt(fan_in),
        "bias": jnp.zeros((fan_out,), jnp.float32)}
  return params


def logits_of(params: dict, x: jax.Array) -> jax.Array:
  names = sorted(params, key=lambda n: int(n.split("_")[1]))
  for name in names[:-1]:
    x = jnp.tanh(x @ params[name]["kernel"] + params[name]["bias"])
  return x @ params[names[-1]]["kernel"] + params[names[-1]]["bias"]


def loss(params: dict, batch: tuple) -> jax.Array:
  x, y = batch
  logits = logits_of(params, x)
  kfac_jax.register_softmax_cross_entropy_loss(logits, y)
  return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, y))


def sgd_case(params: dict):
  """(step, state) of optax.sgd; the step maps (params, state, x, y) to (params, state, loss)."""
  tx = optax.sgd(LR_SGD)

  @jax.jit
  def step(params, state, x, y):
    value, grads = jax.value_and_grad(loss)(params, (x, y))
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state, value

  return step, tx.init(params)


def kfac_case(params: dict, x: jax.Array, y: jax.Array, curvature_update_period: int):
  """(step, (optimizer state, 0)) of kfac_jax.Optimizer; the step count travels in the state."""
  optimizer = kfac_jax.Optimizer(
      value_and_grad_func=jax.value_and_grad(loss),
      l2_reg=0.0,
      use_adaptive_learning_rate=False,
      use_adaptive_momentum=False,
      use_adaptive_damping=False,
      num_burnin_steps=0,
      curvature_update_period=curvature_update_period,
      inverse_update_period=INVERSE_UPDATE_PERIOD,
      multi_device=False,
  )
  rng = jax.random.PRNGKey(1)
  learning_rate, momentum, damping = (jnp.asarray(v, jnp.float32) for v in (LR_KFAC, 0.0, DAMPING))

  def step(params, state, x, y):
    optimizer_state, count = state
    params, optimizer_state, stats = optimizer.step(
        params, optimizer_state, rng, batch=(x, y), learning_rate=learning_rate,
        momentum=momentum, damping=damping, global_step_int=count)
    return params, (optimizer_state, count + 1), stats["loss"]

  return step, (optimizer.init(params, rng, (x, y)), 0)


def copy(tree):
  return jax.tree.map(lambda l: l.copy() if isinstance(l, jax.Array) else l, tree)


def run_size(width: int, batch: int, rounds: int, per_round: int, trained_steps: int) -> dict:
  data = datasets.load("digits")
  rng = np.random.default_rng(0)
  idx = rng.choice(len(data.x_train), batch, replace=batch > len(data.x_train))
  x, y = jnp.asarray(data.x_train[idx], jnp.float32), jnp.asarray(data.y_train[idx])
  others = datasets.batches(data.x_train, data.y_train, batch, seed=1)
  first = [(jnp.asarray(bx, jnp.float32), jnp.asarray(by))
           for bx, by in itertools.islice(others, trained_steps)]
  params = init_mlp(jax.random.PRNGKey(0), width, data.x_train.shape[1], data.num_classes)
  built = {"optax.sgd": sgd_case(params)}
  for period in CURVATURE_UPDATE_PERIODS:
    built[f"kfac/{period}"] = kfac_case(params, x, y, period)
  cases = {}
  for name, (step, state) in built.items():
    p, s = copy(params), state
    for bx, by in first:  # compiles (both of kfac-jax's variants) on the way
      p, s = step(p, s, bx, by)[:2]
    cases[name] = (step,) + jax.block_until_ready((p, s)) + (x, y)
    print(f"  kfac-jax anchor {width}:{batch}: {name} trained {trained_steps} steps",
          file=sys.stderr, flush=True)
  seconds = timing.interleaved_step_times(cases, rounds, per_round, warm_each_round=False,
                                          copy_start=True)
  return {"width": width, "batch": batch, "seconds": seconds}


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--sizes", default="64:128,256:512", help="comma-separated width:batch")
  p.add_argument("--rounds", type=int, default=9)
  p.add_argument("--steps", type=int, default=10, help="timed steps per round")
  p.add_argument("--trained-steps", type=int, default=30)
  args = p.parse_args(argv)
  if args.trained_steps < max(CURVATURE_UPDATE_PERIODS):
    p.error(f"--trained-steps must be >= {max(CURVATURE_UPDATE_PERIODS)} (compiles and "
            "warms up both of kfac-jax's step variants)")
  out = {"machine": f"{jax.devices()[0].device_kind}, {os.cpu_count()} host cores, "
                    f"{platform.machine()}, jax {jax.__version__}, kfac-jax "
                    f"{kfac_jax.__version__}, optax {optax.__version__}",
         "sizes": {}}
  for spec in args.sizes.split(","):
    width, batch = (int(v) for v in spec.split(":"))
    out["sizes"][spec] = run_size(width, batch, args.rounds, args.steps, args.trained_steps)
  print(json.dumps(out))
  return 0


if __name__ == "__main__":
  sys.exit(main())
