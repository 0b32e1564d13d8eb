"""Batch statistics in traced games: train-mode BatchNorm and other sums over the batch.

``games.from_function`` cuts a parameter-free statistics stage around the
sums over the batch axis (``F_stats(x) = (x, sg(mean), sg(var))``, one copy
per sample, its ``gradient_fn`` without the stop-gradient) and evaluates the
stage that reads the copies sample by sample (``games.from_flax``'s
``nn.BatchNorm``; its updates equal a hand-written game's in
tests/test_from_flax.py). Here: the statistics stage's values and
derivatives, Flax's mutated collections and ``update_batch_stats``, a centring ``x - x.mean(0)``
trained as SGD on ``jax.grad``, and the couplings and random draws that stay
errors. Forward passes, open-loop steps, FNE/GR steps against the dense
reference and compilation of the BatchNorm models of the zoo (an MLP, a CNN,
``models.resnet18``): tests/test_model_zoo.py.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import dgnopt_jax as dgnopt
from dgnopt_jax import models
import helpers as h
import zoo

G = dgnopt.games


def mutable_apply(module):
  """Flax's train-mode apply, returning ``(outputs, {"batch_stats": ...})``."""
  return lambda v, x: module.apply(v, x, train=True, mutable=["batch_stats"])


def test_statistics_stage_values_and_derivatives():
  apply_fn, params, x, _ = zoo.case("batch_norm_mlp", batch=4)
  game = G.from_function(apply_fn, params, x)
  assert [(s.name, s.gradient_fn is not None) for s in game.stages] == [
      ("params/Dense_0", False), ("statistics", True), ("params/BatchNorm_0", False),
      ("params/Dense_1", False)]
  dense, stats = game.stages[:2]
  h_ = dense.fn(x, (G.get_path(params, ("params", "Dense_0")),))
  hidden, mean, var = stats.fn(h_, ())
  # Flax's statistics (mean, mean of squares minus the squared mean), one copy per sample.
  np.testing.assert_array_equal(hidden, h_)
  np.testing.assert_allclose(mean.reshape(4, -1), jnp.broadcast_to(h_.mean(0), (4, 4)),
                             rtol=1e-12)
  np.testing.assert_allclose(var.reshape(4, -1), jnp.broadcast_to(h_.var(0), (4, 4)),
                             rtol=1e-10)
  # fn holds the statistics fixed (per-sample Jacobians); gradient_fn goes through them.
  held = jax.jacobian(lambda z: stats.fn(z, ())[1])(h_)
  exact = jax.jacobian(lambda z: stats.gradient_fn(z, ())[1])(h_)
  assert float(jnp.max(jnp.abs(held))) == 0.0
  # d mean_i[c] / d h_j[c] = 1/B for every copy i and sample j.
  np.testing.assert_allclose(exact.reshape(4, 4, 4, 4)[:, 2, 1, 2], np.full(4, 0.25))
  # The normalisation reads each sample's own copy: perturbing sample 0's copy moves sample 0.
  bn = game.stages[2]
  theta = (G.get_path(params, ("params", "BatchNorm_0")),)
  out = bn.fn((hidden, mean, var), theta)
  moved = bn.fn((hidden, mean.at[0].add(0.1), var), theta)
  assert float(jnp.max(jnp.abs(moved[1:] - out[1:]))) == 0.0
  assert float(jnp.max(jnp.abs(moved[0] - out[0]))) > 0.0


def test_mutable_apply_and_running_averages():
  """``model.apply(..., mutable=["batch_stats"])``: the game's output is the model's, the
  "params" collection holds the players, and update_batch_stats gives Flax's running averages."""
  module = zoo.BatchNormMLP()
  _, params, x, _ = zoo.case("batch_norm_mlp", batch=3)
  apply_fn = mutable_apply(module)
  game = G.from_function(apply_fn, params, x)
  assert all(p.path[0] == "params" for p in game.players)
  outputs, collections = apply_fn(params, x)
  np.testing.assert_allclose(game.apply(params, x), outputs, rtol=1e-12, atol=1e-12)
  updated = G.update_batch_stats(game, params, x)
  h.assert_trees_close(updated, {**params, **collections}, 1e-12)
  assert not np.allclose(updated["batch_stats"]["BatchNorm_0"]["mean"],
                         params["batch_stats"]["BatchNorm_0"]["mean"])
  # jit-compiled, as in a training step.
  h.assert_trees_close(jax.jit(lambda p, x: G.update_batch_stats(game, p, x))(params, x),
                       updated, 1e-12)
  # A game whose apply_fn returns the outputs alone has nothing to update.
  outputs_only = G.from_function(lambda v, x: apply_fn(v, x)[0], params, x)
  assert G.update_batch_stats(outputs_only, params, x) is params


def test_centring_over_the_batch_trains_as_sgd():
  """``x - x.mean(0)`` is a batch statistic too: OLNE with the identity is SGD on jax.grad."""

  class Centred(nn.Module):
    @nn.compact
    def __call__(self, x):
      x = nn.Dense(4)(x)
      x = x - jnp.mean(x, axis=0, keepdims=True)
      return nn.Dense(3)(jnp.tanh(x))

  model = Centred()
  data = [h.classification_batch((3,), 4, seed=s) for s in (1, 2, 3)]
  params = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64),
                        model.init(jax.random.PRNGKey(0), data[0][0]))
  game = G.from_function(model.apply, params, data[0][0])
  # The centring, a stage of its own: no statistic is live where the next layer begins.
  assert [s.name for s in game.stages] == ["params/Dense_0", "statistics", "sub", "params/Dense_1"]
  loss = lambda p, x, y: jnp.mean(optax.softmax_cross_entropy_with_integer_labels(
      model.apply(p, x), y))
  tx, sgd = dgnopt.olne(game, 0.1, dgnopt.curvature.identity()), optax.sgd(0.1)
  ours = theirs = params
  state, sgd_state = tx.init(params), sgd.init(params)
  for batch in data:
    updates, state = h.step(tx, ours, batch, state)
    expected, sgd_state = sgd.update(jax.grad(loss)(theirs, *batch), sgd_state)
    h.assert_trees_close(updates, expected, 1e-10)
    ours, theirs = optax.apply_updates(ours, updates), optax.apply_updates(theirs, expected)


# ----------------------------------------------------------------------------
# Errors.
# ----------------------------------------------------------------------------


def test_softmax_over_the_batch_is_an_error():
  class BatchSoftmax(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.Dense(3)(jax.nn.softmax(nn.Dense(4, name="hidden")(x), axis=0))

  model = BatchSoftmax()
  x = jnp.ones((3, 4))
  with pytest.raises(ValueError, match=r"reduce_max at BatchSoftmax .*reduces over the batch "
                     r"axis.*a batch statistic: a reduce_sum over every batch axis"):
    G.from_function(model.apply, model.init(jax.random.PRNGKey(0), x), x)


def test_statistic_inside_a_layer_is_an_error():
  def layer(params, x):
    h_ = x @ params["w"]
    return (h_ - h_.mean(0)) * params["w"].sum()

  with pytest.raises(ValueError, match=r"reduce_sum at .* batch statistic inside the layer of w"):
    G.from_function(layer, {"w": jnp.ones((4, 3))}, jnp.ones((3, 4)))


def test_eval_mode_running_averages_are_an_error():
  module = zoo.BatchNormMLP()
  _, params, x, _ = zoo.case("batch_norm_mlp")
  with pytest.raises(ValueError, match=r"'batch_stats/BatchNorm_0/(mean|var)', outside the "
                     r"'params' collection, acts on the batch"):
    G.from_function(lambda v, x: module.apply(v, x, train=False), params, x)


class Dropped(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(3)(nn.Dropout(0.5, deterministic=False)(nn.Dense(4)(x)))


class Outer(nn.Module):
  @nn.compact
  def __call__(self, x):
    return Dropped(name="block")(x)


def test_dropout_without_an_rng_is_an_error():
  model, x = Outer(), jnp.ones((3, 4))
  variables = model.init({"params": jax.random.PRNGKey(0), "dropout": jax.random.PRNGKey(1)}, x)
  with pytest.raises(ValueError, match=r"module at 'block/Dropout_0' draws random numbers "
                     r"without an rng"):
    G.from_function(model.apply, variables, x)


def test_dropout_with_a_fixed_key_is_an_error():
  model, x = Outer(), jnp.ones((3, 4))
  variables = model.init({"params": jax.random.PRNGKey(0), "dropout": jax.random.PRNGKey(1)}, x)
  apply_fn = lambda v, x: model.apply(v, x, rngs={"dropout": jax.random.PRNGKey(2)})
  with pytest.raises(ValueError, match=r"random_bits at Outer/block/Dropout_0 .*batch"):
    G.from_function(apply_fn, variables, x)
