"""DGNOpt Theorem 6 / Lemma 10: without feedback the game solvers are the familiar optimizers."""

import jax
import optax
import pytest

import dgnopt_jax as dgnopt
import helpers as h


def optax_run(opt, game, params, batches):
  state = opt.init(params)
  out = []
  for x, y in batches:
    grads = jax.grad(game.loss_value)(params, x, y)
    updates, state = opt.update(grads, state, params)
    out.append(updates)
    params = optax.apply_updates(params, updates)
  return out


def game_run(tx, params, batches):
  state = tx.init(params)
  out = []
  for batch in batches:
    updates, state = h.step(tx, params, batch, state)
    out.append(updates)
    params = optax.apply_updates(params, updates)
  return out


def batches(shape, n=3, size=6):
  return [h.classification_batch(shape, size, seed=10 + i) for i in range(n)]


@pytest.mark.parametrize("make_game,shape", [(lambda: h.tanh_mlp(wd=1e-2), (4,)),
                                             (h.relu_cnn, (4, 4, 1))])
def test_fne_without_feedback_is_sgd(make_game, shape):
  # (Q_theta_x, Q_theta_theta) := (0, I): the FNE update is plain SGD (Lemma 10).
  game = make_game()
  params = h.perturbed_params(game)
  data = batches(shape)
  ours = game_run(dgnopt.olne(game, 0.1, "identity"), params, data)
  theirs = optax_run(optax.sgd(0.1), game, params, data)
  for a, b in zip(ours, theirs):
    h.assert_trees_close(a, b, 1e-12)


def test_two_player_stage_without_feedback_is_sgd():
  game = h.two_player_game()
  params = h.two_player_params()
  data = batches((3,))
  ours = game_run(dgnopt.olne(game, 0.2), params, data)
  theirs = optax_run(optax.sgd(0.2), game, params, data)
  for a, b in zip(ours, theirs):
    h.assert_trees_close(a, b, 1e-12)


def test_olne_rmsprop_is_optax_rmsprop():
  game = h.tanh_mlp(wd=1e-3)
  params = h.perturbed_params(game)
  data = batches((4,), n=4)
  for kwargs in ({}, {"eps_in_sqrt": False, "decay": 0.8}):
    ours = game_run(dgnopt.olne(game, 1e-2, dgnopt.curvature.rmsprop(**kwargs)), params, data)
    theirs = optax_run(optax.rmsprop(1e-2, **kwargs), game, params, data)
    for a, b in zip(ours, theirs):
      h.assert_trees_close(a, b, 1e-12)


def test_olne_adam_is_optax_adam():
  game = h.relu_cnn()
  params = h.perturbed_params(game)
  data = batches((4, 4, 1), n=4)
  ours = game_run(dgnopt.olne(game, 3e-3, dgnopt.curvature.adam(b1=0.8, eps_root=1e-9)),
                  params, data)
  theirs = optax_run(optax.adam(3e-3, b1=0.8, eps_root=1e-9), game, params, data)
  for a, b in zip(ours, theirs):
    h.assert_trees_close(a, b, 1e-12)


def test_schedules_match_optax():
  game = h.tanh_mlp()
  params = h.perturbed_params(game)
  data = batches((4,), n=4)
  schedule = optax.exponential_decay(0.3, transition_steps=1, decay_rate=0.5)
  ours = game_run(dgnopt.olne(game, schedule), params, data)
  theirs = optax_run(optax.sgd(schedule), game, params, data)
  for a, b in zip(ours, theirs):
    h.assert_trees_close(a, b, 1e-12)
