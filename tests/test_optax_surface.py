"""The optax surface: chain, jit, Flax params, extra arguments, dtypes, state stability."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import dgnopt_jax as dgnopt
import helpers as h

G = dgnopt.games


class FlaxMLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.tanh(nn.Dense(8)(x))
    x = nn.tanh(nn.Dense(8)(x))
    return nn.Dense(3)(x)


def flax_setup(dtype=jnp.float32):
  model = FlaxMLP()
  x, y = h.classification_batch((4,), 16)
  x = x.astype(dtype)
  params = model.init(jax.random.PRNGKey(0), x)
  params = jax.tree.map(lambda a: a.astype(dtype), params)
  game = G.sequential([G.Dense(8, "tanh"), G.Dense(8, "tanh"), G.Dense(3)], (4,),
                      paths=[("params", f"Dense_{i}") for i in range(3)], dtype=dtype)
  return model, game, params, x, y


def test_flax_params_in_a_jitted_chain():
  model, game, params, x, y = flax_setup()
  np.testing.assert_allclose(game.apply(params, x), model.apply(params, x), rtol=1e-6)
  tx = optax.chain(dgnopt.fne(game, 0.02, "adam", vxx_reg=1e-4))
  state = tx.init(params)

  @jax.jit
  def train_step(params, state, batch):
    updates, state = tx.update(None, state, params, batch=batch)
    return optax.apply_updates(params, updates), state

  loss0 = float(game.loss_value(params, x, y))
  for _ in range(30):
    params, state = train_step(params, state, (x, y))
  assert float(game.loss_value(params, x, y)) < 0.5 * loss0
  # The params are still the Flax model's.
  assert model.apply(params, x).shape == (16, 3)


def test_unknown_extra_arguments_are_ignored_without_recompiling():
  game = h.tanh_mlp()
  params = h.perturbed_params(game)
  batch = h.classification_batch((4,), 5)
  tx = dgnopt.fne(game, 0.1)
  state = tx.init(params)
  traces = []

  @jax.jit
  def f(params, state, batch, extra):
    traces.append(1)
    return tx.update(None, state, params, batch=batch, extra_thing=extra)

  a = f(params, state, batch, 1.0)
  b = f(params, state, batch, 2.0)
  assert len(traces) == 1
  h.assert_trees_close(a[0], b[0], 1e-15)


@pytest.mark.parametrize("make,curvature", [
    (dgnopt.fne, c) for c in ("identity", "rmsprop", "adam", "kfac", "ekfac", "dense")] + [
    (dgnopt.gr, "kfac")])
def test_state_structure_shapes_and_dtypes_are_stable(make, curvature):
  # float32 params under jax_enable_x64 (where a stray float64 would show):
  # three steps, the middle one skipped, through one compiled step; a state
  # whose structure, shape or dtype changed would retrace it.
  _, game, params, x, y = flax_setup(jnp.float32)
  kwargs = {"inverse_every": 2} if curvature in ("kfac", "ekfac") else {}
  curv = getattr(dgnopt.curvature, curvature)(**kwargs)
  tx = make(game, 0.05, curv)
  state = tx.init(params)
  structure = jax.tree.structure(state)
  avals = [(l.shape, l.dtype) for l in jax.tree.leaves(state)]
  traces = []

  @jax.jit
  def step(params, state, batch):
    traces.append(1)
    updates, state = tx.update(None, state, params, batch=batch)
    return optax.apply_updates(params, updates), state

  bad_x = x.at[0, 0].set(jnp.nan)
  for batch in [(x, y), (bad_x, y), (x, y)]:
    params, state = step(params, state, batch)
  assert len(traces) == 1
  assert jax.tree.structure(state) == structure
  assert [(l.shape, l.dtype) for l in jax.tree.leaves(state)] == avals
  assert all(l.dtype == jnp.float32 for l in jax.tree.leaves(params))
  assert int(state.count) == 2 and int(state.skipped) == 1


def test_learning_rate_and_damping_schedules_inside_jit():
  # A scheduled step k equals a step of a transformation built with the
  # schedule's value at k as a constant, from the same params and state.
  game = h.tanh_mlp()
  params = h.perturbed_params(game)
  batch = h.classification_batch((4,), 5)
  lr = optax.piecewise_constant_schedule(0.1, {1: 0.5})
  damping = optax.linear_schedule(1.0, 0.2, transition_steps=1)
  scheduled = dgnopt.fne(game, lr, damping=damping)  # M = (1 + damping) I / lr
  constant = [dgnopt.fne(game, 0.1, damping=1.0), dgnopt.fne(game, 0.05, damping=0.2)]
  state = scheduled.init(params)
  for k in range(2):
    expected, _ = h.step(constant[k], params, batch, state)
    updates, new_state = h.step(scheduled, params, batch, state)
    h.assert_trees_close(updates, expected, 1e-7)  # optax schedules evaluate in float32
    params, state = optax.apply_updates(params, updates), new_state


def test_state_init_on_shape_structs():
  game = h.tanh_mlp()
  params = h.perturbed_params(game)
  tx = dgnopt.fne(game, 0.1, "adam")
  abstract = jax.eval_shape(tx.init, jax.tree.map(
      lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), params))
  concrete = tx.init(params)
  assert jax.tree.structure(abstract) == jax.tree.structure(concrete)
