"""The fast path equals the dense reference under the same approximations (float64, 1e-8)."""

import jax
import jax.numpy as jnp
import pytest

import dgnopt_jax as dgnopt
import helpers as h

# Learning rates small enough that S = q^T M^-1 q stays below I (no clamp), so
# that the reference (which does not clamp) describes the same step.
CURVATURES = [("identity", 0.3), ("rmsprop", 1e-3), ("adam", 1e-3), ("dense", 0.5)]


def compare(game, params, batch, curvature, lr, rank, vxx_reg, damping=None, steps=1):
  tx = dgnopt.fne(game, lr, curvature, vxx_reg=vxx_reg, vxx_rank=rank, damping=damping)
  state = tx.init(params)
  ref_state = None
  for _ in range(steps):
    updates, state = h.step(tx, params, batch, state)
    ref, ref_state = h.reference_step(
        game, params, batch, ref_state, learning_rate=lr, curvature=curvature,
        damping=damping, vxx_reg=vxx_reg, vxx_rank=rank)
    h.assert_trees_close(updates, ref, 1e-8)
    params = jax.tree.map(jnp.add, params, updates)
  return updates


# Every curvature, both ranks and both batch sizes appear in the default run;
# the full cross product runs with -m slow.
@pytest.mark.parametrize("curvature,lr,rank,batch_size",
                         [pytest.param(c, lr, r, b, marks=m) for (c, lr), r, b, m in [
                             (CURVATURES[0], "outer", 1, ()), (CURVATURES[1], "exact", 5, ()),
                             (CURVATURES[2], "outer", 5, ()), (CURVATURES[3], "exact", 1, ()),
                             (CURVATURES[0], "exact", 5, ()), (CURVATURES[3], "outer", 5, ()),
                             (CURVATURES[1], "outer", 1, pytest.mark.slow),
                             (CURVATURES[2], "exact", 1, pytest.mark.slow),
                             (CURVATURES[0], "outer", 5, pytest.mark.slow),
                             (CURVATURES[1], "exact", 1, pytest.mark.slow),
                             (CURVATURES[2], "exact", 5, pytest.mark.slow),
                             (CURVATURES[3], "exact", 5, pytest.mark.slow)]])
def test_tanh_mlp(curvature, lr, rank, batch_size):
  game = h.tanh_mlp()
  params = h.perturbed_params(game)
  batch = h.classification_batch((4,), batch_size)
  compare(game, params, batch, curvature, lr, rank, vxx_reg=1e-2)


@pytest.mark.parametrize("curvature,lr,batch_size",
                         [pytest.param(c, lr, b, marks=m) for (c, lr), b, m in [
                             (CURVATURES[0], 1, ()),
                             (CURVATURES[1], 5, pytest.mark.slow),
                             (CURVATURES[2], 1, pytest.mark.slow), (CURVATURES[3], 5, ()),
                             (CURVATURES[0], 5, pytest.mark.slow),
                             (CURVATURES[1], 1, pytest.mark.slow),
                             (CURVATURES[2], 5, pytest.mark.slow),
                             (CURVATURES[3], 1, pytest.mark.slow)]])
def test_relu_cnn(curvature, lr, batch_size):
  game = h.relu_cnn()
  params = h.perturbed_params(game)
  batch = h.classification_batch((4, 4, 1), batch_size)
  compare(game, params, batch, curvature, lr, "exact", vxx_reg=1e-3)


@pytest.mark.parametrize("curvature,lr", CURVATURES)
def test_two_players_per_stage(curvature, lr):
  game = h.two_player_game()
  batch = h.classification_batch((3,), 5)
  compare(game, h.two_player_params(), batch, curvature, lr, "outer", vxx_reg=1e-2)


@pytest.mark.parametrize("loss", ["squared_error", pytest.param(
    "sigmoid_binary_cross_entropy", marks=pytest.mark.slow)])
def test_other_losses_and_weight_decay(loss):
  game = h.tanh_mlp(loss=loss, wd=1e-2)
  params = h.perturbed_params(game)
  x = jax.random.normal(jax.random.PRNGKey(2), (5, 4))
  y = jax.random.uniform(jax.random.PRNGKey(3), (5, 3))
  for rank in ("outer", "exact"):
    compare(game, params, (x, y), "dense", 0.5, rank, vxx_reg=0.0, damping=1e-2)


def test_custom_loss_callable():
  def huber(out, target):
    d = out - target
    return jnp.sum(jnp.where(jnp.abs(d) < 1, 0.5 * d ** 2, jnp.abs(d) - 0.5))
  game = dgnopt.games.sequential([dgnopt.games.Dense(4, "tanh"), dgnopt.games.Dense(2)], (3,),
                                  huber)
  params = h.perturbed_params(game)
  x = jax.random.normal(jax.random.PRNGKey(2), (4, 3))
  y = 0.3 * jax.random.normal(jax.random.PRNGKey(3), (4, 2))
  compare(game, params, (x, y), "identity", 0.3, "exact", vxx_reg=0.0)


def test_several_steps_with_statistics():
  game = h.tanh_mlp()
  params = h.perturbed_params(game)
  batch = h.classification_batch((4,), 5)
  compare(game, params, batch, "adam", 1e-3, "outer", vxx_reg=1e-3, steps=3)


def test_scanned_stages_match_unrolled(monkeypatch):
  # Identical 5->5 layers are solved with lax.scan (here from 3 repeats on);
  # the same network with distinct stage functions (one per layer) is
  # unrolled. Both must agree.
  game = h.tanh_mlp(widths=(5, 5, 5, 5))
  params = h.perturbed_params(game)
  from dgnopt_jax._src import segments as segments_lib
  monkeypatch.setattr(segments_lib, "MIN_STAGE_REPEATS", 3)
  segments = segments_lib.plan_segments(game, params, jnp.zeros((2, 4)))
  assert [s.length for s in segments] == [1, 3, 1]
  unrolled = dgnopt.games.Game(
      tuple(dgnopt.games.Stage(lambda x, th, s=s: s.fn(x, th), s.players) for s in game.stages),
      game.loss)
  assert [s.length for s in segments_lib.plan_segments(unrolled, params, jnp.zeros((2, 4)))] == [1] * 5
  batch = h.classification_batch((4,), 3)
  tx_a = dgnopt.fne(game, 0.3, vxx_reg=1e-2)
  tx_b = dgnopt.fne(unrolled, 0.3, vxx_reg=1e-2)
  h.assert_trees_close(h.step(tx_a, params, batch)[0], h.step(tx_b, params, batch)[0], 1e-12)


def test_feedback_changes_the_update():
  # Guard against a vacuous comparison: the feedback term is not negligible.
  game = h.tanh_mlp()
  params = h.perturbed_params(game)
  batch = h.classification_batch((4,), 5)
  with_fb = h.step(dgnopt.fne(game, 0.5, vxx_reg=1e-2), params, batch)[0]
  without = h.step(dgnopt.olne(game, 0.5), params, batch)[0]
  assert h.max_relative_error(with_fb, without) > 1e-3


@pytest.mark.parametrize("principle", ["fne", pytest.param("gr", marks=pytest.mark.slow)])
def test_convexity_safeguard_matches_reference(principle):
  # At large steps the identity curvature leaves the model non-convex
  # (lambda_max(G) > 1) and the coupling is scaled by 1/lambda_max(G): the
  # reference computes lambda_max by a dense eigensolve, the fast path by
  # power iteration, which converges to it.
  game = h.tanh_mlp()
  h.assert_safeguard_converges_to_reference(game, h.perturbed_params(game),
                                            h.classification_batch((4,), 5), principle, 2, 60)


@pytest.mark.parametrize("principle,curvature,lr,vxx_reg", [
    ("fne", "identity", 0.3, 0.1), ("gr", "identity", 0.3, 0.1),
    pytest.param("fne", "adam", 0.1, 1e-2, marks=pytest.mark.slow)])
def test_convexity_safeguard_covers_the_tikhonov_term(monkeypatch, principle, curvature, lr,
                                                       vxx_reg):
  # With V~_xx = Z Z^T + eps I the coupling matrix is R^T F_theta M^-1
  # F_theta^T R with R = [Z, sqrt(eps) I]. At these steps the Z Z^T part alone
  # keeps every stage convex (identity: all w = 1 without eps), the eps part
  # does not: the reference shrinks some coupling, and the fast path (power
  # iteration on (columns, state) vectors, the dense-layer trace test) must
  # agree with it over two steps.
  scales = h.record_reference_scales(monkeypatch)
  game = h.tanh_mlp()
  params = h.perturbed_params(game, scale=1.0)
  batch = h.classification_batch((4,), 6)
  if curvature == "identity":
    h.reference_step(game, params, batch, learning_rate=lr, curvature=curvature,
                     principle=principle, vxx_rank="outer")
    assert min(scales) == 1.0  # without eps no stage is shrunk
    scales.clear()
  make = dgnopt.fne if principle == "fne" else dgnopt.gr
  tx = make(game, lr, curvature, vxx_reg=vxx_reg, vxx_rank="outer", coupling_iterations=200)
  h.assert_steps_match_reference(tx, game, params, batch, 2, learning_rate=lr,
                                 curvature=curvature, principle=principle, vxx_reg=vxx_reg,
                                 vxx_rank="outer")
  assert min(scales) < 0.9  # the eps part shrank some stage's coupling


def test_dense_jacobian_trace_matches_jacobian():
  # sum_i tr(F_theta^(i) D F_theta^(i)T) of a dense player under a diagonal
  # inverse curvature D, against the per-sample Jacobians from jax.jacrev.
  from dgnopt_jax._src import quadratic_forms
  layer = dgnopt.games.Dense(3, "tanh")
  theta, _ = layer.init(jax.random.PRNGKey(0), (4,), jnp.float64)
  x = jax.random.normal(jax.random.PRNGKey(1), (5, 4), jnp.float64)
  factor = jax.random.normal(jax.random.PRNGKey(2), (5, 2, 3), jnp.float64)
  inv = jax.tree.map(lambda t, k: jax.random.uniform(k, t.shape, jnp.float64, 0.1, 2.0),
                     theta, {"kernel": jax.random.PRNGKey(3), "bias": jax.random.PRNGKey(4)})
  form = quadratic_forms.dense_layer(layer, theta, x, factor, inv)
  expected = 0.0
  for i in range(x.shape[0]):
    jac = jax.jacrev(lambda t: layer(t, x[i:i + 1])[0])(theta)  # leaves (3, *theta shape)
    expected += sum(float(jnp.sum(j * j * d)) for j, d in zip(jax.tree.leaves(jac),
                                                              jax.tree.leaves(inv)))
  assert abs(float(form.jacobian_trace) - expected) <= 1e-12 * expected


def test_feedback_does_not_amplify_deviations_at_large_steps():
  # A CNN at a step size where the unguarded feedback over-compensates by
  # 1 - lambda_max(G) << -1 and the loss explodes; guarded, it stays bounded.
  game = h.relu_cnn()
  params = jax.tree.map(lambda a: a.astype(jnp.float32), h.perturbed_params(game))
  x, y = h.classification_batch((4, 4, 1), 16)
  batch = (x.astype(jnp.float32), y)
  tx = dgnopt.fne(game, 1.0)
  state = tx.init(params)
  first = float(game.loss_value(params, *batch))
  worst = first
  for _ in range(30):
    updates, state = h.step(tx, params, batch, state)
    params = jax.tree.map(jnp.add, params, updates)
    worst = max(worst, float(game.loss_value(params, *batch)))
  assert int(state.skipped) == 0
  assert worst < 3 * first


@pytest.mark.parametrize("make,curvature,lr", [
    (dgnopt.fne, "identity", 0.3), pytest.param(dgnopt.gr, "kfac", 0.1, marks=pytest.mark.slow)])
def test_scanned_residual_blocks_match_unrolled(make, curvature, lr, monkeypatch):
  # Three equal residual blocks (two stages each, a projection in the merge
  # stage) are one scanned segment of period 2 (scanned from 3 repeats here);
  # the same network with distinct stage functions is unrolled. Both must
  # agree, over two steps.
  from dgnopt_jax._src import segments as segments_lib
  monkeypatch.setattr(segments_lib, "MIN_BLOCK_REPEATS", 3)
  G = dgnopt.games
  game = G.sequential([G.Conv2D(3, (3, 3), activation="relu")] +
                      [G.ResidualBlock(3, shortcut="projection") for _ in range(3)] +
                      [G.AvgPool((2, 2)), G.Dense(3)], (4, 4, 1))
  params = h.perturbed_params(game)
  x, y = h.classification_batch((4, 4, 1), 4)
  segments = segments_lib.plan_segments(game, params, x)
  assert [(s.period, s.repeats) for s in segments][:2] == [(1, 1), (2, 3)]
  unrolled = G.Game(tuple(G.Stage(lambda x, th, s=s: s.fn(x, th), s.players, s.name,
                                  s.shared_statistics) for s in game.stages), game.loss)
  assert all(s.repeats == 1 for s in segments_lib.plan_segments(unrolled, params, x))
  tx_a, tx_b = make(game, lr, curvature), make(unrolled, lr, curvature)
  state_a, state_b = tx_a.init(params), tx_b.init(params)
  for _ in range(2):
    up_a, state_a = h.step(tx_a, params, (x, y), state_a)
    up_b, state_b = h.step(tx_b, params, (x, y), state_b)
    h.assert_trees_close(up_a, up_b, 1e-10)
    params = jax.tree.map(jnp.add, params, up_a)
  if jax.tree.leaves(state_a.curvature):
    h.assert_trees_close(state_a.curvature, state_b.curvature, 1e-10)
