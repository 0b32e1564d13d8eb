"""Fictitious players (DGNOpt §5.2, eq. 16): split, collapse, and the cooperative step.

The independent computations: the original game (its own stage functions and
solver routes), ``jax.grad`` of the original loss, and the dense reference on
the split game. With the equal split every player of a layer sees the same
``P_theta`` and ``P_theta_x``, so DGNOpt eq. 22-25 can be solved by hand:

* identity curvature (no cross curvature, P_uv = 0, ``P_theta_n_theta_n = I/eta``):
  ``k_n = eta P_theta``, ``K_n = eta P_theta_x``; the layer moves by
  ``sum_n = N eta (...)`` and eq. 25's ``W_x = P_x - P_x_theta sum_n k_n``
  is the original game's at learning rate ``N eta``, so every player's update
  is the original game's update at ``N eta``, divided by N;
* cooperative KFAC with shared statistics: the joint matrix is
  ``J_N (x) K + damping I`` with the original player's ``K``, so every
  player's update is ``(N K + damping)^-1`` on the common vector: the original
  game's update at damping ``damping / N``, divided by N.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import dgnopt_jax as dgnopt
from dgnopt_jax import datasets
import helpers as h

G = dgnopt.games


def small_mlp(wd=0.01):
  return h.tanh_mlp(widths=(4,), wd=wd)


def run_steps(tx, params, batch, steps):
  state, out = None, []
  for _ in range(steps):
    updates, state = h.step(tx, params, batch, state)
    out.append(updates)
    params = optax.apply_updates(params, updates)
  return out


# ----------------------------------------------------------------------------
# Split, collapse, forward.
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("num_players", [1, 2, 3, 4])
def test_collapse_of_split_is_exactly_the_params(num_players):
  game = small_mlp()
  params = h.perturbed_params(game, seed=3)
  split = G.split_params(params, game, num_players)
  for p in game.players:
    parts = G.get_path(split, p.path)
    assert isinstance(parts, tuple) and len(parts) == num_players
    for part in parts:  # theta_n = theta / N up to the last player's rounding
      h.assert_trees_close(part, jax.tree.map(lambda a: a / num_players,
                                              G.get_path(params, p.path)), 1e-15)
  back = G.collapse_params(split, game)
  assert jax.tree.structure(back) == jax.tree.structure(params)
  for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(params)):
    np.testing.assert_array_equal(a, b)
  # Paths as strings work too, and the input is not modified.
  again = G.collapse_params(G.split_params(params, ["dense_0", "dense_1"], num_players),
                            ["dense_0", ("dense_1",)])
  for a, b in zip(jax.tree.leaves(again), jax.tree.leaves(params)):
    np.testing.assert_array_equal(a, b)
  assert isinstance(params["dense_0"], dict)


@pytest.mark.parametrize("make_game,shape", [
    (small_mlp, (4,)), (h.relu_cnn, (4, 4, 1)), (h.two_player_game, (3,))])
def test_split_network_is_the_sum_of_its_players(make_game, shape):
  game = make_game()
  params = (h.two_player_params() if make_game is h.two_player_game
            else h.perturbed_params(game, seed=1))
  x, y = h.classification_batch(shape, 4)
  fg = G.fictitious(game, 2)
  # Any split with the right sum, not only the equal one: the forward pass of
  # the split game is the original network on the sum of the players.
  rng = np.random.default_rng(0)
  noise = jax.tree.map(lambda a: jnp.asarray(rng.normal(size=a.shape)), params)
  split = G.split_params(params, game, 2)
  for p in game.players:
    d = G.get_path(noise, p.path)
    a, b = G.get_path(split, p.path)
    node = split
    for key in p.path[:-1]:
      node = node[key]
    node[p.path[-1]] = (jax.tree.map(jnp.add, a, d), jax.tree.map(jnp.subtract, b, d))
  collapsed = G.collapse_params(split, game)
  assert h.max_relative_error(collapsed, params) < 1e-14
  # Stage costs: N * wd / 2 |theta_n|^2 per player sums to wd / 2 |theta|^2 at
  # the equal split.
  equal = G.split_params(params, game, 2)
  ours = jax.jit(lambda s, e: (fg.apply(s, x), fg.loss_value(e, x, y)))(split, equal)
  theirs = jax.jit(lambda c, p: (game.apply(c, x), game.loss_value(p, x, y)))(collapsed, params)
  h.assert_trees_close(ours[0], theirs[0], 1e-12)
  np.testing.assert_allclose(ours[1], theirs[1], rtol=1e-13)


def test_layer_stages_share_statistics_and_keep_the_layer():
  game = h.relu_cnn()
  fg = G.fictitious(game, 3)
  assert len(fg.stages) == len(game.stages)
  for s, f in zip(game.stages, fg.stages):
    assert f.num_players == 3 * s.num_players
    if s.players:
      assert f.shared_statistics
      assert [p.path for p in f.players] == [s.players[0].path + (n,) for n in range(3)]
      assert all(p.layer == s.players[0].layer for p in f.players)
  shapes = jax.eval_shape(fg.init, jax.random.PRNGKey(0))
  want = jax.eval_shape(lambda k: G.split_params(game.init(k), game, 3), jax.random.PRNGKey(0))
  assert jax.tree.structure(shapes) == jax.tree.structure(want)
  assert [a.shape for a in jax.tree.leaves(shapes)] == [a.shape for a in jax.tree.leaves(want)]
  # Blocks with several players (or plain functions) sum the actions, no layer.
  coop = G.fictitious(h.two_player_game(), 2).stages[1]
  assert not coop.shared_statistics
  assert [p.name for p in coop.players] == ["u/0", "u/1", "v/0", "v/1"]
  assert all(p.layer is None and p.weight_decay == 0.1 for p in coop.players)


def test_errors():
  game = small_mlp()
  params = h.perturbed_params(game)
  with pytest.raises(ValueError, match="num_players"):
    G.fictitious(game, 0)
  with pytest.raises(ValueError, match="num_players"):
    G.split_params(params, game, 1.5)
  with pytest.raises(ValueError, match="not split into fictitious players"):
    G.collapse_params(params, game)
  with pytest.raises(ValueError, match="not split into fictitious players"):
    G.collapse_params(G.split_params(params, game, 2), G.fictitious(game, 2))
  with pytest.raises(ValueError, match="dense_9"):
    G.split_params(params, ["dense_9"], 2)
  with pytest.raises(TypeError, match="Game"):
    G.fictitious([game], 2)


# ----------------------------------------------------------------------------
# Updates: N = 1, closed forms for N = 2, dense reference.
# ----------------------------------------------------------------------------


# One small game, params and batch for the update tests; the original game's
# updates are computed once per setting and shared by the N = 1 and N = 2 checks.
SMALL = small_mlp()
SMALL_PARAMS = h.perturbed_params(SMALL)
SMALL_BATCH = h.classification_batch((4,), 5)
STEPS = 3


@functools.lru_cache(maxsize=None)
def original_updates(method, curvature, learning_rate, damping):
  tx = getattr(dgnopt, method)(SMALL, learning_rate, curvature, damping=damping, vxx_reg=1e-2)
  return run_steps(tx, SMALL_PARAMS, SMALL_BATCH, STEPS)


def split_updates(method, curvature, learning_rate, damping, num_players):
  tx = getattr(dgnopt, method)(G.fictitious(SMALL, num_players), learning_rate, curvature,
                               damping=damping, vxx_reg=1e-2)
  return run_steps(tx, G.split_params(SMALL_PARAMS, SMALL, num_players), SMALL_BATCH, STEPS)


def original_settings(curvature, num_players, learning_rate, damping):
  """The original game's (learning rate, damping) that the split game's step reproduces."""
  if curvature in ("kfac", "ekfac", "dense"):  # joint J_N (x) C: damping / N
    return learning_rate, damping / num_players
  return num_players * learning_rate, damping  # per-player solves: learning rate * N


@pytest.mark.parametrize("method,curvature,lr,damping", [
    ("fne", "identity", 0.4, 0.0), ("gr", "kfac", 0.2, 0.05),
    pytest.param("gr", "identity", 0.4, 0.0, marks=pytest.mark.slow),
    pytest.param("fne", "kfac", 0.2, 0.05, marks=pytest.mark.slow)])
def test_one_player_gives_the_original_updates(method, curvature, lr, damping):
  ours = split_updates(method, curvature, lr, damping, 1)
  theirs = original_updates(method, curvature, lr, damping)
  for u, v in zip(ours, theirs):
    h.assert_trees_close(G.collapse_params(u, SMALL), v, 1e-12)


def assert_players_take_a_share(ours, theirs, game, num_players):
  """Every fictitious player's update is the original player's update / N."""
  for u, v in zip(ours, theirs):
    assert min(float(jnp.max(jnp.abs(a))) for a in jax.tree.leaves(v)) > 1e-4
    for p in game.players:
      parts = G.get_path(u, p.path)
      assert len(parts) == num_players
      for part in parts:
        h.assert_trees_close(part, jax.tree.map(lambda a: a / num_players,
                                                G.get_path(v, p.path)), 1e-11)


@pytest.mark.parametrize("curvature,damping", [("identity", 0.0), ("kfac", 0.1)])
def test_two_players_gr_step_in_closed_form(curvature, damping):
  ours = split_updates("gr", curvature, 0.2, damping, 2)
  theirs = original_updates("gr", curvature, *original_settings(curvature, 2, 0.2, damping))
  assert_players_take_a_share(ours, theirs, SMALL, 2)


def check_closed_form(game, params, shape, curvature, num_players=2, steps=2):
  batch = h.classification_batch(shape, 5)
  lr, damping = 0.2, (0.0 if curvature == "identity" else 0.1)
  fg = G.fictitious(game, num_players)
  ours = run_steps(dgnopt.gr(fg, lr, curvature, damping=damping, vxx_reg=1e-2),
                   G.split_params(params, game, num_players), batch, steps)
  orig_lr, orig_damping = original_settings(curvature, num_players, lr, damping)
  theirs = run_steps(dgnopt.gr(game, orig_lr, curvature, damping=orig_damping, vxx_reg=1e-2),
                     params, batch, steps)
  assert_players_take_a_share(ours, theirs, game, num_players)


def test_two_players_open_loop_gr_is_the_gradient_of_the_original_loss():
  # Without feedback (P_theta_x := 0) and with the identity curvature, eq. 22
  # gives each player -eta P_theta_n = -eta (F^T W' + N wd theta_n), which at
  # the equal split is -eta grad_theta of the original loss (weight decay included).
  x, y = SMALL_BATCH
  fg = G.fictitious(SMALL, 2)
  updates, _ = h.step(dgnopt.gr(fg, 0.3, feedback=False), G.split_params(SMALL_PARAMS, SMALL, 2),
                      (x, y))
  grad = jax.jit(jax.grad(SMALL.loss_value))(SMALL_PARAMS, x, y)
  assert min(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(grad)) > 1e-4
  for p in SMALL.players:
    for part in G.get_path(updates, p.path):
      h.assert_trees_close(part, jax.tree.map(lambda g: -0.3 * g, G.get_path(grad, p.path)),
                           1e-12)


@pytest.mark.slow
@pytest.mark.parametrize("curvature,lr", [("kfac", 0.3), ("identity", 0.3), ("dense", 0.5)])
def test_two_players_gr_equals_dense_reference(curvature, lr):
  game = small_mlp()
  fg = G.fictitious(game, 2)
  split = G.split_params(h.perturbed_params(game), game, 2)
  batch = h.classification_batch((4,), 4)
  tx = dgnopt.gr(fg, lr, curvature, vxx_reg=1e-2)
  state, ref_state = tx.init(split), None
  for _ in range(2):
    updates, state = h.step(tx, split, batch, state)
    ref, ref_state = h.reference_step(fg, split, batch, ref_state, learning_rate=lr,
                                      curvature=curvature, vxx_reg=1e-2, principle="gr")
    h.assert_trees_close(updates, ref, 1e-8)
    split = optax.apply_updates(split, updates)


@pytest.mark.slow
@pytest.mark.parametrize("curvature", ["identity", "kfac", "dense"])
def test_two_players_closed_form_on_a_cnn(curvature):
  game = h.relu_cnn()
  check_closed_form(game, h.perturbed_params(game), (4, 4, 1), curvature, steps=2)


@pytest.mark.slow
@pytest.mark.parametrize("curvature", ["identity", "dense"])
def test_closed_form_on_a_block_with_two_players(curvature):
  # Stages that are not ready-made layers sum the actions inside their function.
  check_closed_form(h.two_player_game(), h.two_player_params(), (3,), curvature)


@pytest.mark.slow
@pytest.mark.parametrize("curvature", ["rmsprop", "adam", "ekfac", "dense"])
def test_two_players_closed_form_for_other_curvatures(curvature):
  check_closed_form(SMALL, SMALL_PARAMS, (4,), curvature)


@pytest.mark.slow
@pytest.mark.parametrize("curvature", ["identity", "kfac"])
def test_four_players_closed_form(curvature):
  check_closed_form(SMALL, SMALL_PARAMS, (4,), curvature, num_players=4)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["fne", "gr"])
def test_one_player_gives_the_original_updates_on_a_cnn(method):
  game = h.relu_cnn()
  params = h.perturbed_params(game)
  batch = h.classification_batch((4, 4, 1), 3)
  make = getattr(dgnopt, method)
  kw = dict(learning_rate=0.3, curvature="kfac", vxx_reg=1e-2)
  ours = run_steps(make(G.fictitious(game, 1), **kw), G.split_params(params, game, 1), batch, 2)
  theirs = run_steps(make(game, **kw), params, batch, 2)
  for u, v in zip(ours, theirs):
    h.assert_trees_close(G.collapse_params(u, game), v, 1e-12)


# ----------------------------------------------------------------------------
# Training.
# ----------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def digits():
  return datasets.load("digits", dtype=np.float64)


@pytest.mark.parametrize("curvature", [
    "identity", pytest.param("kfac", marks=pytest.mark.slow)])
def test_two_players_train_a_digits_mlp(curvature):
  data = digits()
  game = G.sequential([G.Dense(16, "tanh"), G.Dense(10)], (64,), weight_decay=1e-4)
  fg = G.fictitious(game, 2)
  params = G.split_params(h.perturbed_params(game, seed=0, scale=0.0), game, 2)
  tx = dgnopt.gr(fg, 0.1, curvature, vxx_reg=1e-3)
  state = tx.init(params)

  @jax.jit
  def train_step(params, state, x, y):
    updates, state = tx.update(None, state, params, batch=(x, y))
    return optax.apply_updates(params, updates), state

  x, y = data.x_train, data.y_train
  before = float(fg.loss_value(params, x, y))
  stream = datasets.batches(x, y, 32, seed=0)
  for _ in range(40):
    params, state = train_step(params, state, *next(stream))
  after = float(fg.loss_value(params, x, y))
  assert int(state.skipped) == 0
  assert after < 0.5 * before, (before, after)
  # The collapsed network is the trained one: same loss (weight decay included).
  collapsed = G.collapse_params(params, game)
  np.testing.assert_allclose(game.loss_value(collapsed, x, y), after, rtol=1e-12)
  accuracy = np.mean(np.argmax(game.apply(collapsed, data.x_test), -1) == data.y_test)
  assert accuracy > 0.8
