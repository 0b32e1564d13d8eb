"""The cooperative (GR) solver: LQ oracle, dense reference, Theorem 6 relations."""

import jax
import jax.numpy as jnp
import optax
import pytest

import dgnopt_jax as dgnopt
import helpers as h
from lq import EXACT, landing_error, problem

G = dgnopt.games


@pytest.mark.parametrize("players", [2, 3])
@pytest.mark.parametrize("stages,batch", [(3, 1), (1, 5)])
def test_gr_step_lands_on_joint_minimiser(players, stages, batch):
  game, mats, params, x0, y = problem(stages, players, batch)
  updates, _ = h.step(dgnopt.gr(game, **EXACT), params, (x0, y))
  assert landing_error(game, mats, params, updates, x0, y) < 1e-6


@pytest.mark.parametrize("players", [2, 3])
def test_batch_coupled_gr_reference_lands_on_joint_minimiser(players):
  game, mats, params, x0, y = problem(3, players, 5)
  updates, _ = dgnopt.reference.dense_step(game, params, x0, y, principle="gr",
                                           coupling="full", **EXACT)
  assert landing_error(game, mats, params, updates, x0, y) < 1e-6


def test_without_cooperation_the_step_misses_the_joint_minimiser():
  # FNE (each player alone) and GR without cross terms are not the joint
  # optimum: the oracle above needs the cooperative gains.
  game, mats, params, x0, y = problem(1, 2, 5)
  fne = h.step(dgnopt.fne(game, **EXACT), params, (x0, y))[0]
  no_cross = h.step(dgnopt.gr(game, cross_terms=False, **EXACT), params, (x0, y))[0]
  assert landing_error(game, mats, params, fne, x0, y) > 1e-3
  assert landing_error(game, mats, params, no_cross, x0, y) > 1e-3


CURVATURES = [("identity", 0.3), ("rmsprop", 1e-3), ("adam", 1e-3), ("dense", 0.5)]


@pytest.mark.parametrize("curvature,lr,cross_terms", [
    pytest.param(c, lr, x, marks=() if (i + x) % 2 else pytest.mark.slow)
    for i, (c, lr) in enumerate(CURVATURES) for x in (True, False)])
def test_gr_equals_dense_reference(curvature, lr, cross_terms):
  game = h.two_player_game()
  params = h.two_player_params()
  batch = h.classification_batch((3,), 5)
  tx = dgnopt.gr(game, lr, curvature, vxx_reg=1e-2, cross_terms=cross_terms)
  h.assert_steps_match_reference(tx, game, params, batch, 2, learning_rate=lr,
                                 curvature=curvature, vxx_reg=1e-2, principle="gr",
                                 cross_terms=cross_terms)


def test_gr_equals_dense_reference_on_a_cnn():
  game = h.relu_cnn()
  params = h.perturbed_params(game)
  batch = h.classification_batch((4, 4, 1), 3)
  updates, _ = h.step(dgnopt.gr(game, 0.5, "dense", vxx_rank="exact"), params, batch)
  ref, _ = h.reference_step(game, params, batch, learning_rate=0.5, curvature="dense",
                            vxx_rank="exact", principle="gr")
  h.assert_trees_close(updates, ref, 1e-8)


@pytest.mark.parametrize("curvature,lr", CURVATURES)
def test_single_player_stages_gr_is_fne_step_for_step(curvature, lr):
  game = h.tanh_mlp()
  params = h.perturbed_params(game)
  batch = h.classification_batch((4,), 5)
  fne, gr = dgnopt.fne(game, lr, curvature, vxx_reg=1e-2), dgnopt.gr(game, lr, curvature,
                                                                        vxx_reg=1e-2)
  s_fne, s_gr, p_fne, p_gr = fne.init(params), gr.init(params), params, params
  for _ in range(3):
    u_fne, s_fne = h.step(fne, p_fne, batch, s_fne)
    u_gr, s_gr = h.step(gr, p_gr, batch, s_gr)
    h.assert_trees_close(u_gr, u_fne, 1e-12)
    p_fne, p_gr = optax.apply_updates(p_fne, u_fne), optax.apply_updates(p_gr, u_gr)


@pytest.mark.parametrize("curvature,lr", CURVATURES)
def test_zero_cross_terms_reduce_the_cooperative_solve_to_fne(curvature, lr):
  # DGNOpt Theorem 6 (first bullet): eq. 11 with P_uv := 0 is eq. 9. On a
  # stage whose players see the same value (here the last), GR without cross
  # terms and FNE give the same update.
  coop = G.stage(lambda x, th: jnp.tanh(x @ th[0]["w"]) + x @ th[1]["w"], ["u", "v"],
                 weight_decay=0.05)
  game = G.Game((coop,), "softmax_cross_entropy")
  k = jax.random.split(jax.random.PRNGKey(3), 2)
  params = {"u": {"w": jax.random.normal(k[0], (3, 3))},
            "v": {"w": 0.5 * jax.random.normal(k[1], (3, 3))}}
  batch = h.classification_batch((3,), 4)
  gr = h.step(dgnopt.gr(game, lr, curvature, vxx_reg=1e-2, cross_terms=False), params, batch)[0]
  fne = h.step(dgnopt.fne(game, lr, curvature, vxx_reg=1e-2), params, batch)[0]
  h.assert_trees_close(gr, fne, 1e-12)
  if curvature == "dense":
    coop_ = h.step(dgnopt.gr(game, lr, curvature, vxx_reg=1e-2), params, batch)[0]
    assert h.max_relative_error(coop_, fne) > 1e-3


def test_gr_identity_without_feedback_is_sgd():
  game = h.two_player_game()
  params = h.two_player_params()
  tx, opt = dgnopt.gr(game, 0.2, feedback=False), optax.sgd(0.2)
  state, opt_state = tx.init(params), opt.init(params)
  for i in range(3):
    x, y = h.classification_batch((3,), 6, seed=20 + i)
    ours, state = h.step(tx, params, (x, y), state)
    theirs, opt_state = opt.update(jax.grad(game.loss_value)(params, x, y), opt_state, params)
    h.assert_trees_close(ours, theirs, 1e-12)
    params = optax.apply_updates(params, ours)


def test_dense_joint_curvature_refuses_a_large_stage():
  wide = G.stage(lambda x, th: x @ th[0]["w"] + x @ th[1]["w"], ["u", "v"])
  game = G.Game((wide,), "squared_error")
  params = {"u": {"w": jnp.zeros((50, 50))}, "v": {"w": jnp.zeros((50, 50))}}
  tx = dgnopt.gr(game, 0.1, dgnopt.curvature.dense(max_params=4096))
  with pytest.raises(ValueError, match="cannot handle player 'u\\+v'"):
    tx.update(None, tx.init(params), params, batch=(jnp.ones((2, 50)), jnp.ones((2, 50))))
