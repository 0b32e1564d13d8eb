"""Optimizers by name (``dgnopt_jax.optimizer_from_name``) against the same optimizers built by hand."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import dgnopt_jax as dgnopt
import helpers as h

STEPS = 7  # more than one statistics period and one eigenbasis refresh of the Kronecker curvatures


def test_parsed_names():
  parse, Name = dgnopt.parse_optimizer_name, dgnopt.OptimizerName
  assert parse("gr-kfac/5@0.03") == Name("gr-kfac/5@0.03", "gr", "kfac", 0.03, 5)
  assert parse("fne-sgd") == Name("fne-sgd", "fne", "identity", None, None)
  assert parse(" adam@1e-4 ") == Name("adam@1e-4", None, "adam", 1e-4, None)
  assert parse("olne-ekfac/1") == Name("olne-ekfac/1", "olne", "ekfac", None, 1)


@pytest.mark.parametrize("name,match", [
    ("", "an empty optimizer name"),
    ("adam-sgd", "unknown solver 'adam'"),
    ("fne-kfax", "unknown optimizer 'fne-kfax': unknown curvature 'kfax'"),
    ("kfac", "unknown optimizer 'kfac'"),
    ("sgd/2", "needs the kfac or ekfac"),
    ("gr-adam/3", "a statistics period \\(/3\\) needs the kfac or ekfac"),
    ("fne-kfac/0", "the statistics period after '/' must be an integer >= 1, got '0'"),
    ("fne-kfac/x", "the statistics period after '/' must be an integer >= 1, got 'x'"),
    ("fne-kfac@0", "the learning rate must be finite and > 0"),
    ("fne-kfac@inf", "the learning rate must be finite and > 0"),
    ("adam@fast", "the learning rate after '@' must be a number"),
])
def test_bad_names_say_what_is_wrong(name, match):
  with pytest.raises(ValueError, match=match):
    dgnopt.parse_optimizer_name(name)


def _problem():
  game = h.tanh_mlp()
  return game, h.perturbed_params(game), h.classification_batch((4,), 6)


def _train(step, state, params, batch):
  """Params and losses after ``STEPS`` steps of ``step(params, state, x, y)`` on one batch."""
  step, losses = jax.jit(step), []
  for _ in range(STEPS):
    params, state, loss = step(params, state, *batch)
    losses.append(float(loss))
  return params, losses


def _solver_step(tx):
  def step(params, state, x, y):
    updates, state = tx.update(None, state, params, batch=(x, y))
    return optax.apply_updates(params, updates), state, state.loss
  return step


@pytest.mark.parametrize("name,make,learning_rate,curvature,options", [
    ("fne-kfac/5@0.03", dgnopt.fne, 0.03, lambda: dgnopt.curvature.kfac(statistics_every=5), {}),
    ("gr-ekfac/2", dgnopt.gr, 0.03, lambda: dgnopt.curvature.ekfac(statistics_every=2), {}),
    ("fne-sgd", dgnopt.fne, 0.1, lambda: "identity", {"vxx_rank": "exact", "vxx_reg": 1e-3}),
    ("gr-adam@0.01", dgnopt.gr, 0.01, lambda: "adam", {"trust_region": False}),
    ("olne-rmsprop", dgnopt.olne, 1e-3, lambda: "rmsprop", {}),
    ("gr-dense", dgnopt.gr, 0.3, lambda: "dense", {"damping": 0.01}),
])
def test_solver_names_equal_the_solvers_built_by_hand(name, make, learning_rate, curvature,
                                                      options):
  game, params, batch = _problem()
  named = dgnopt.optimizer_from_name(name, game, **options)
  assert named.learning_rate == learning_rate
  tx = make(game, learning_rate, curvature(), **options)
  by_hand, by_hand_losses = _train(_solver_step(tx), tx.init(params), params, batch)
  from_name, losses = _train(named.step, named.tx.init(params), params, batch)
  np.testing.assert_allclose(losses, by_hand_losses, rtol=1e-12)
  h.assert_trees_close(from_name, by_hand, 1e-12)
  assert h.max_relative_error(from_name, params) > 1e-3  # the steps moved the params


def _optax_step(tx, game):
  """optax's own step on the gradient of the batch's mean softmax cross-entropy."""
  def batch_loss(params, x, y):
    logits = game.apply(params, x)
    return jnp.mean(optax.losses.softmax_cross_entropy_with_integer_labels(logits, y))

  def step(params, state, x, y):
    loss, grads = jax.value_and_grad(batch_loss)(params, x, y)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state, loss
  return step


@pytest.mark.parametrize("name,tx", [
    ("sgd", optax.sgd(0.1)), ("adam@0.01", optax.adam(0.01)), ("rmsprop", optax.rmsprop(1e-3))])
def test_optax_names_equal_optax(name, tx):
  game, params, batch = _problem()
  named = dgnopt.optimizer_from_name(name, game, vxx_reg=1e-3, trust_region=False)
  by_hand, by_hand_losses = _train(_optax_step(tx, game), tx.init(params), params, batch)
  from_name, losses = _train(named.step, named.tx.init(params), params, batch)
  np.testing.assert_allclose(losses, by_hand_losses, rtol=1e-12)
  h.assert_trees_close(from_name, by_hand, 1e-12)


def test_learning_rate_precedence():
  game = h.tanh_mlp()
  assert dgnopt.optimizer_from_name("fne-sgd@0.2", game, 0.5).learning_rate == 0.2
  assert dgnopt.optimizer_from_name("fne-sgd", game, 0.5).learning_rate == 0.5
  assert dgnopt.optimizer_from_name("adam", game).learning_rate == 1e-3
  assert dgnopt.optimizer_from_name("gr-kfac", game).learning_rate == 0.03


def test_open_loop_adam_by_name_is_optax_adam():
  # DGNOpt Theorem 6, through the options a list of names shares: olne leaves
  # out the rollout's trust_region and coupling_iterations.
  game, params, batch = _problem()
  named = dgnopt.optimizer_from_name("olne-adam@0.01", game, trust_region=True,
                                     coupling_iterations=3)
  tx = optax.adam(0.01)
  by_hand, _ = _train(_optax_step(tx, game), tx.init(params), params, batch)
  from_name, _ = _train(named.step, named.tx.init(params), params, batch)
  h.assert_trees_close(from_name, by_hand, 1e-8)


def test_unknown_options_and_bad_values_raise():
  game = h.tanh_mlp()
  with pytest.raises(TypeError, match="unknown solver options \\['vxx_regularisation'\\]"):
    dgnopt.optimizer_from_name("fne-sgd", game, vxx_regularisation=1e-3)
  with pytest.raises(ValueError, match="damping must be > 0"):
    dgnopt.optimizer_from_name("gr-kfac", game, damping=0.0)
  with pytest.raises(ValueError, match="unknown optimizer 'newton'"):
    dgnopt.optimizer_from_name("newton", game)
