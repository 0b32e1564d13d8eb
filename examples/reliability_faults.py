"""Inject faults into DGNOpt training and report what happens, as a markdown table.

    python examples/reliability_faults.py                      # print the table
    python examples/reliability_faults.py --write docs/RELIABILITY.md

Every scenario trains DDPNOpt's DIGITS MLP (4 tanh layers of width 32) with a
jit-compiled ``fne`` step on real DIGITS batches of 32 and injects one fault.
The outcome column is computed, not written by hand.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import optax

import dgnopt_jax as dgnopt
from dgnopt_jax import datasets

G = dgnopt.games


def _setup(dtype=jnp.float32):
  data = datasets.load("digits")
  game = G.sequential([G.Dense(32, "tanh") for _ in range(4)] + [G.Dense(10)], (64,))
  params = jax.tree.map(lambda p: p.astype(dtype), game.init(jax.random.PRNGKey(0)))
  stream = datasets.batches(data.x_train, data.y_train, 32, seed=0)
  batches = [next(stream) for _ in range(20)]
  batches = [(jnp.asarray(x, dtype), jnp.asarray(y)) for x, y in batches]
  return game, params, batches


def _train(tx, params, batches, state=None):
  state = tx.init(params) if state is None else state
  step = jax.jit(lambda p, s, b: tx.update(None, s, p, batch=b))
  for b in batches:
    updates, state = step(params, state, b)
    params = optax.apply_updates(params, updates)
  return params, state


def _finite(tree) -> bool:
  return all(bool(jnp.all(jnp.isfinite(l))) for l in jax.tree.leaves(tree))


def _summary(params, state) -> str:
  return (f"params finite: {_finite(params)}; steps applied {int(state.count)}, "
          f"skipped {int(state.skipped)}; last loss {float(state.loss):.4g}")


def nan_in_batch():
  game, params, batches = _setup()
  x, y = batches[5]
  batches[5] = (x.at[3, 10].set(jnp.nan), y)
  return ("NaN in one input of batch 6 of 20", "fne, identity",
          _summary(*_train(dgnopt.fne(game, 0.1), params, batches)))


def inf_loss():
  game, params, batches = _setup()
  x, y = batches[5]
  batches[5] = (x.at[0].set(jnp.inf), y)
  return ("inf inputs (inf logits, inf/NaN loss) in batch 6", "fne, adam",
          _summary(*_train(dgnopt.fne(game, 1e-3, "adam"), params, batches)))


def label_out_of_range():
  game, params, batches = _setup()
  x, y = batches[5]
  batches[5] = (x, y.at[0].set(10))
  return ("label 10 for 10 classes in batch 6", "fne, identity",
          _summary(*_train(dgnopt.fne(game, 0.1), params, batches)))


def zero_curvature():
  game, params, batches = _setup()
  batches = [(x.at[:, :8].set(0.0), y) for x, y in batches]  # dead inputs: zero statistics
  tx = dgnopt.fne(game, 1e-3, dgnopt.curvature.rmsprop(eps=0.0))
  return ("zero curvature: RMSprop with eps=0 on inputs that are always 0", "fne, rmsprop",
          _summary(*_train(tx, params, batches)))


def singular_kronecker_factor():
  game, params, batches = _setup()
  batches = [(x.at[:, :8].set(0.0), y) for x, y in batches]  # A has a null space
  tx = dgnopt.fne(game, 0.01, "kfac", damping=0.0)
  return ("singular Kronecker factor (zero input columns), damping 0", "fne, kfac",
          _summary(*_train(tx, params, batches)))


def huge_learning_rate():
  game, params, batches = _setup()
  return ("learning rate 1e6", "fne, identity",
          _summary(*_train(dgnopt.fne(game, 1e6), params, batches)))


def bf16_params():
  game, params, batches = _setup(jnp.bfloat16)
  new, state = _train(dgnopt.fne(game, 0.1, "kfac"), params, batches)
  dtypes = sorted({str(l.dtype) for l in jax.tree.leaves(new)})
  return ("bfloat16 params and inputs", "fne, kfac",
          f"params dtype after 20 steps: {', '.join(dtypes)}; " + _summary(new, state))


def restore_mid_run():
  game, params, batches = _setup()
  tx = dgnopt.gr(game, 0.03, "ekfac")
  want, _ = _train(tx, params, batches)
  half, half_state = _train(tx, params, batches[:10])
  with tempfile.TemporaryDirectory() as tmp:
    path = os.path.join(tmp, "step10.msgpack")
    dgnopt.checkpoint.save(path, {"params": half, "opt_state": half_state})
    restored = dgnopt.checkpoint.restore(path, {"params": params, "opt_state": tx.init(params)})
  got, _ = _train(tx, restored["params"], batches[10:], restored["opt_state"])
  same = all(np.array_equal(np.asarray(a), np.asarray(b))
             for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)))
  return ("checkpoint at step 10, restore, continue to 20", "gr, ekfac",
          f"params identical bit for bit to the uninterrupted run: {same}")


def raise_policy():
  game, params, batches = _setup()
  x, y = batches[5]
  batches[5] = (x.at[3, 10].set(jnp.nan), y)
  try:
    jax.block_until_ready(_train(dgnopt.fne(game, 0.1, nonfinite="raise"), params, batches))
    outcome = "no error (unexpected)"
  except Exception as e:  # JAX wraps the callback's FloatingPointError
    outcome = f"raised {type(e).__name__}: ...{'not finite' if 'not finite' in str(e) else str(e)[:60]}..."
  return ("NaN in batch 6 with nonfinite='raise'", "fne, identity", outcome)


def bad_batch_shape():
  game, params, batches = _setup()
  x, y = batches[0]
  tx = dgnopt.fne(game, 0.1)
  try:
    tx.update(None, tx.init(params), params, batch=(x[:, :60], y))
    outcome = "no error (unexpected)"
  except ValueError as e:
    outcome = f"ValueError: {e}"
  return ("inputs of shape (32, 60) for a (64,) game", "fne", outcome)


SCENARIOS = [nan_in_batch, inf_loss, label_out_of_range, zero_curvature,
             singular_kronecker_factor, huge_learning_rate, bf16_params, restore_mid_run,
             raise_policy, bad_batch_shape]


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--write", default=None, help="also write the table to this markdown file")
  args = p.parse_args(argv)
  rows = []
  for scenario in SCENARIOS:
    fault, setup, outcome = scenario()
    rows.append(f"| {fault} | {setup} | {outcome.replace('|', '/')} |")
    print(rows[-1], flush=True)
  table = "\n".join(["| fault injected | optimizer | what happened |", "|---|---|---|"] + rows)
  print("\n" + table)
  if args.write:
    header = (
        "# Reliability\n\nFaults injected into training and what happened, produced by\n"
        "`python examples/reliability_faults.py --write docs/RELIABILITY.md` "
        f"(jax {jax.__version__}, {jax.default_backend()}, {platform.machine()}).\n\n"
        "Policy: a step whose loss, update or updated params are not finite is skipped "
        "(`nonfinite=\"skip\"`: zero updates, statistics unchanged, `state.skipped` "
        "incremented, `state.count` not) or raises (`nonfinite=\"raise\"`); zero or "
        "singular curvature is pseudo-inverted (no step along directions without "
        "curvature and damping); `(I − S)` is clamped before its square root; "
        "params keep their dtype. Settings that make training diverge (no damping on a "
        "singular Kronecker factor, a learning rate of 1e6) keep the params finite, "
        "but the run is lost: the Kronecker curvatures need damping > 0 (default 0.1).\n\n")
    os.makedirs(os.path.dirname(os.path.abspath(args.write)), exist_ok=True)
    with open(args.write, "w") as f:
      f.write(header + table + "\n")
    print(f"\nwrote {args.write}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
