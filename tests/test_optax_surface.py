"""The optax surface: chain, jit, Flax params, extra arguments, dtypes, state stability."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

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


def test_dtype_and_state_structure_are_stable():
  _, game, params, x, y = flax_setup(jnp.float32)
  tx = dgnopt.fne(game, 0.1, "rmsprop")
  state = tx.init(params)
  structure = jax.tree.structure(state)
  shapes = [(l.shape, l.dtype) for l in jax.tree.leaves(state)]
  step = jax.jit(lambda p, s: tx.update(None, s, p, batch=(x, y)))
  for _ in range(3):
    updates, state = step(params, state)
    params = optax.apply_updates(params, updates)
  assert jax.tree.structure(state) == structure
  assert [(l.shape, l.dtype) for l in jax.tree.leaves(state)] == shapes
  assert all(l.dtype == jnp.float32 for l in jax.tree.leaves(params))
  assert int(state.count) == 3 and int(state.skipped) == 0


def test_state_init_on_shape_structs():
  game = h.tanh_mlp()
  params = h.perturbed_params(game)
  tx = dgnopt.fne(game, 0.1, "adam")
  abstract = jax.eval_shape(tx.init, jax.tree.map(
      lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), params))
  concrete = tx.init(params)
  assert jax.tree.structure(abstract) == jax.tree.structure(concrete)
