"""Checkpoints and resume, the non-finite policy, dtypes kept through the update."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import dgnopt_jax as dgnopt
import helpers as h

G = dgnopt.games


def _game():
  # A shared-statistics parallel stage and plain dense layers: every kind of
  # Kronecker state appears in the optimizer state.
  return G.sequential([G.Dense(6, "tanh"), G.Parallel(G.Dense(5), G.Dense(5)),
                       G.Parallel(G.Dense(4, "tanh"), G.Dense(4, "relu")), G.Dense(3)], (4,))


def _batches(n):
  rng = np.random.default_rng(0)
  return [(jnp.asarray(rng.normal(size=(8, 4)), jnp.float32), jnp.asarray(rng.integers(0, 3, 8)))
          for _ in range(n)]


def _train(tx, params, state, batches):
  for b in batches:
    updates, state = h.step(tx, params, b, state)  # compiled once per transformation
    params = optax.apply_updates(params, updates)
  return params, state


@pytest.mark.parametrize("curvature", ["ekfac", pytest.param("adam", marks=pytest.mark.slow)])
def test_restored_run_continues_bit_for_bit(tmp_path, curvature):
  game = _game()
  params = game.init(jax.random.PRNGKey(0))
  tx = optax.chain(dgnopt.gr(game, 0.05 if curvature == "ekfac" else 1e-3, curvature),
                   optax.clip_by_global_norm(10.0))
  batches = _batches(6)
  want_params, want_state = _train(tx, params, tx.init(params), batches)

  half_params, half_state = _train(tx, params, tx.init(params), batches[:3])
  path = tmp_path / "run" / "step3.msgpack"
  dgnopt.checkpoint.save(path, {"params": half_params, "opt_state": half_state, "step": 3})
  fresh = game.init(jax.random.PRNGKey(1))
  restored = dgnopt.checkpoint.restore(
      path, {"params": fresh, "opt_state": tx.init(fresh), "step": 0})
  assert restored["step"] == 3
  got_params, got_state = _train(tx, restored["params"], restored["opt_state"], batches[3:])

  assert jax.tree.structure(got_state) == jax.tree.structure(want_state)
  for a, b in zip(jax.tree.leaves((got_params, got_state)), jax.tree.leaves((want_params,
                                                                            want_state))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_restore_into_a_mismatched_target_names_the_leaf(tmp_path):
  game = _game()
  params = game.init(jax.random.PRNGKey(0))
  path = tmp_path / "p.msgpack"
  dgnopt.checkpoint.save(path, params)
  other = G.sequential([G.Dense(7, "tanh"), G.Parallel(G.Dense(5), G.Dense(5)),
                        G.Parallel(G.Dense(4, "tanh"), G.Dense(4, "relu")), G.Dense(3)], (4,))
  with pytest.raises(ValueError, match=r"dense_0.*the target has float32\[7\], the checkpoint "
                     r"has float32\[6\]"):
    dgnopt.checkpoint.restore(path, other.init(jax.random.PRNGKey(0)))
  with pytest.raises(FileNotFoundError):
    dgnopt.checkpoint.restore(tmp_path / "missing.msgpack", params)


def test_nonfinite_raise_policy():
  game = h.tanh_mlp()
  params = game.init(jax.random.PRNGKey(0))
  tx = dgnopt.fne(game, 0.1, nonfinite="raise")
  x, y = h.classification_batch((4,), 4)
  bad = (x.at[0, 0].set(jnp.nan), y)
  step = jax.jit(lambda p, s, b: tx.update(None, s, p, batch=b))
  updates, _ = step(params, tx.init(params), (x, y))  # a finite step goes through
  jax.block_until_ready(updates)
  with pytest.raises(Exception, match="not finite"):
    jax.block_until_ready(step(params, tx.init(params), bad))
  with pytest.raises(ValueError, match="nonfinite"):
    dgnopt.fne(game, 0.1, nonfinite="ignore")


def test_step_that_would_overflow_the_params_is_skipped(monkeypatch):
  """Finite updates whose sum with the params overflows: skipped, params unchanged."""
  from dgnopt_jax._src import bellman
  game = h.tanh_mlp()
  big = 0.6 * float(jnp.finfo(jnp.float32).max)
  params = jax.tree.map(lambda p: p.astype(jnp.float32), game.init(jax.random.PRNGKey(0)))
  # Equal huge output biases: the logits and the loss stay finite.
  params["dense_3"]["bias"] = jnp.full_like(params["dense_3"]["bias"], big)
  x, y = h.classification_batch((4,), 4)
  assert bool(jnp.isfinite(game.loss_value(params, x.astype(jnp.float32), y)))
  real = bellman.stage_rollout

  def overflowing(*args, **kwargs):  # every change finite but huge
    x_next, deltas = real(*args, **kwargs)
    return x_next, jax.tree.map(lambda d: jnp.full_like(d, big), deltas)

  monkeypatch.setattr(bellman, "stage_rollout", overflowing)
  tx = dgnopt.fne(game, 0.1)
  step = jax.jit(lambda p, s, b: tx.update(None, s, p, batch=b))
  updates, state = step(params, tx.init(params), (x.astype(jnp.float32), y))
  assert int(state.skipped) == 1 and int(state.count) == 0
  assert all(bool(jnp.all(u == 0)) for u in jax.tree.leaves(updates))


@pytest.mark.parametrize("dtype,curvature", [
    pytest.param(d, c, marks=() if (d, c) in {(jnp.bfloat16, "kfac"), (jnp.float32, "identity")}
                 else pytest.mark.slow)
    for d in (jnp.bfloat16, jnp.float32, jnp.float64) for c in ("identity", "kfac")])
def test_params_keep_their_dtype(dtype, curvature):
  game = h.tanh_mlp()
  params = jax.tree.map(lambda p: p.astype(dtype), game.init(jax.random.PRNGKey(0)))
  tx = dgnopt.fne(game, 0.1, curvature)
  x, y = h.classification_batch((4,), 4)
  state = tx.init(params)
  step = jax.jit(lambda p, s, b: tx.update(None, s, p, batch=b))
  for _ in range(2):
    updates, state = step(params, state, (x.astype(dtype), y))
    params = optax.apply_updates(params, updates)
  assert all(u.dtype == dtype for u in jax.tree.leaves(updates))
  assert all(p.dtype == dtype for p in jax.tree.leaves(params))
  assert all(bool(jnp.all(jnp.isfinite(p))) for p in jax.tree.leaves(params))


@pytest.mark.parametrize("label", [7, -1])
def test_labels_out_of_range(label):
  game = h.tanh_mlp()
  params = game.init(jax.random.PRNGKey(0))
  x, y = h.classification_batch((4,), 4)
  batch = (x, y.at[1].set(label))
  tx = dgnopt.fne(game, 0.1)
  # Concrete labels: a clear error before any work.
  with pytest.raises(ValueError, match=f"class label {label} is outside \\[0, 3\\)"):
    tx.update(None, tx.init(params), params, batch=batch)
  # Inside jit the labels are not known: the loss is NaN and the step skipped.
  updates, state = jax.jit(lambda p, s, b: tx.update(None, s, p, batch=b))(
      params, tx.init(params), batch)
  assert int(state.skipped) == 1
  assert all(bool(jnp.all(u == 0)) for u in jax.tree.leaves(updates))
