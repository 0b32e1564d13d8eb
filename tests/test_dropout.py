"""Dropout in train mode in traced games: each sample's random numbers come from the batch.

``games.per_sample_rngs(model.apply)`` evaluates each sample alone with a key
folded from its seed in the batch, so the traced game computes the same
network at every batch size the solver evaluates its stages on. The masks
are drawn from the input alone and cross the stage cuts as 0/1 floats (an
integer state as its two 16-bit halves). Checked against independent
computations: the model applied sample by sample with the same keys,
optax on ``jax.grad`` of the same loss, and the dense reference.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import dgnopt_jax as dgnopt
import helpers as h

G = dgnopt.games


class DropoutMLP(nn.Module):
  """Dropout between the second and the last layer: its mask crosses two stage cuts."""

  @nn.compact
  def __call__(self, x, train: bool = True):
    x = nn.tanh(nn.Dense(5)(x))
    x = nn.tanh(nn.Dense(5)(x))
    x = nn.Dropout(0.5, deterministic=not train)(x)
    return nn.Dense(3)(x)


MODEL = DropoutMLP()


def setup(batch=6):
  x, y = h.classification_batch((4,), batch)
  variables = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64),
                           MODEL.init(jax.random.PRNGKey(0), x, train=False))
  apply_fn = G.per_sample_rngs(MODEL.apply)
  return apply_fn, variables, x, y


def seeds(step, batch=6):
  return jnp.arange(batch, dtype=jnp.int32) + step * batch


def loss(apply_fn):
  return lambda p, inputs, y: optax.softmax_cross_entropy_with_integer_labels(
      apply_fn(p, inputs), y).mean()


def test_apply_equals_the_model_sample_by_sample():
  apply_fn, variables, x, _ = setup()
  game = G.from_function(apply_fn, variables, (x, seeds(0)))
  # Each sample's Dense under the vmap multiplies a (B, 1, K) input: token-row players.
  assert [p.layer for p in game.players] == [G.Dense(5, None, rows=True),
                                             G.Dense(5, None, rows=True),
                                             G.Dense(3, None, rows=True)]
  out = game.apply(variables, (x, seeds(0)))
  base = jax.random.PRNGKey(0)
  for i in range(x.shape[0]):
    key = jax.random.fold_in(jax.random.fold_in(base, 0), i)
    np.testing.assert_allclose(out[i], MODEL.apply(variables, x[i:i + 1],
                                                   rngs={"dropout": key})[0], atol=1e-14)
  # Other seeds draw other masks; the sample's output does not depend on the batch.
  assert np.max(np.abs(out - game.apply(variables, (x, seeds(1))))) > 1e-3
  np.testing.assert_allclose(game.apply(variables, (x[:2], seeds(0)[:2])), out[:2], atol=1e-14)


def test_open_loop_equals_optax():
  apply_fn, variables, x, y = setup()
  game = G.from_function(apply_fn, variables, (x, seeds(0)))
  data = [((x, seeds(step)), y) for step in range(4)]
  h.assert_open_loop_equals_optax(game, variables, loss(apply_fn), data)


@pytest.mark.parametrize("principle,curvature", [("fne", "identity"), ("gr", "kfac")])
def test_steps_equal_dense_reference(principle, curvature):
  apply_fn, variables, x, y = setup(4)
  game = G.from_function(apply_fn, variables, (x, seeds(0, 4)))
  make = dgnopt.gr if principle == "gr" else dgnopt.fne
  tx = make(game, 0.1, curvature, damping=0.5, vxx_reg=1e-2)
  h.assert_steps_match_reference(tx, game, variables, ((x, seeds(3, 4)), y), 2,
                                 learning_rate=0.1, curvature=curvature, damping=0.5,
                                 vxx_reg=1e-2, principle=principle)


def test_integer_states_cross_stages_exactly():
  """An integer index from the ids, used after two layers, crosses the cuts exactly."""

  def apply_fn(params, ids):
    h1 = jnp.tanh(params["a"][ids])
    h2 = jnp.tanh(h1 @ params["b"])
    picked = jnp.take_along_axis(h2, (ids % 65537 % 3)[:, None], axis=1)
    return (h2 + picked * (ids[:, None] > 2 ** 16)) @ params["c"]

  rng = np.random.default_rng(0)
  params = {"a": jnp.asarray(rng.normal(size=(2 ** 17, 2))),
            "b": jnp.asarray(rng.normal(size=(2, 3))), "c": jnp.asarray(rng.normal(size=(3, 2)))}
  ids = jnp.asarray([0, 1, 2 ** 17 - 1, 2 ** 16 + 5, 3], jnp.int32)
  game = G.from_function(apply_fn, params, ids)
  assert len(game.stages) == 3
  states = [ids.astype(jnp.float32)]
  for stage in game.stages:
    states.append(stage.fn(states[-1], tuple(params[p.path[0]] for p in stage.players)))
  assert all(jnp.issubdtype(jnp.result_type(a), jnp.floating)
             for s in states[1:] for a in jax.tree.leaves(s))
  np.testing.assert_allclose(states[-1], apply_fn(params, ids), rtol=1e-12)
