"""Bad input gets a clear, early error; numerical trouble never becomes NaN params."""

import jax
import jax.numpy as jnp
import pytest

import dgnopt_jax as dgnopt
import helpers as h

G = dgnopt.games


@pytest.fixture
def setup():
  game = h.tanh_mlp()
  params = h.perturbed_params(game)
  return game, params, h.classification_batch((4,), 5)


def update(tx, params, batch):
  return tx.update(None, tx.init(params), params, batch=batch)


def test_missing_batch(setup):
  game, params, _ = setup
  tx = dgnopt.fne(game, 0.1)
  with pytest.raises(TypeError, match="needs the batch"):
    tx.update(None, tx.init(params), params)


def test_params_missing_a_player(setup):
  game, params, batch = setup
  bad = dict(params)
  del bad["dense_1"]
  with pytest.raises(ValueError, match="params do not match the game: player 'dense_1'"):
    update(dgnopt.fne(game, 0.1), bad, batch)


def test_params_with_wrong_shape(setup):
  game, params, batch = setup
  bad = dict(params)
  bad["dense_2"] = {"kernel": jnp.zeros((5, 6)), "bias": jnp.zeros((6,))}
  with pytest.raises(ValueError, match="player 'dense_2' expects shapes"):
    update(dgnopt.olne(game, 0.1), bad, batch)


def test_mismatched_batch_and_targets(setup):
  game, params, (x, y) = setup
  with pytest.raises(ValueError, match="5 samples but targets have shape"):
    update(dgnopt.fne(game, 0.1), params, (x, y[:3]))


def test_wrong_input_shape(setup):
  game, params, (x, y) = setup
  with pytest.raises(ValueError, match="per-sample shape"):
    update(dgnopt.fne(game, 0.1), params, (x[:, :3], y))


def test_empty_batch(setup):
  game, params, (x, y) = setup
  with pytest.raises(ValueError, match="empty"):
    update(dgnopt.fne(game, 0.1), params, (x[:0], y[:0]))


def test_float_labels_for_cross_entropy(setup):
  game, params, (x, y) = setup
  with pytest.raises(ValueError, match="integer class labels"):
    update(dgnopt.fne(game, 0.1), params, (x, y.astype(jnp.float64)))


def test_dense_curvature_refuses_a_large_player():
  game = G.sequential([G.Dense(100, "tanh"), G.Dense(3)], (64,))
  params = game.init(jax.random.PRNGKey(0))
  with pytest.raises(ValueError, match="curvature 'dense' cannot handle player 'dense_0'"):
    dgnopt.fne(game, 0.1, "dense").init(params)


def test_stage_gradient_fn_must_match_the_stage():
  with pytest.raises(TypeError, match="gradient_fn must be callable"):
    G.stage(lambda x, th: x, gradient_fn=1.0)
  dense = G.Dense(3)
  game = G.Game([G.stage(lambda x, th: dense(th[0], x), ["dense"],
                         gradient_fn=lambda x, th: dense(th[0], x)[:, :2])],
                "softmax_cross_entropy")
  params = {"dense": dense.init(jax.random.PRNGKey(0), (4,))[0]}
  x, y = jnp.ones((2, 4)), jnp.zeros(2, jnp.int32)
  with pytest.raises(ValueError, match=r"stage 0 .*gradient_fn returns \(2, 2\) where fn "
                     r"returns \(2, 3\)"):
    update(dgnopt.fne(game, 0.1), params, (x, y))


@pytest.mark.parametrize("kwargs,match", [
    ({"learning_rate": 0.0}, "learning_rate must be > 0"),
    ({"learning_rate": -1.0}, "learning_rate must be > 0"),
    ({"learning_rate": 0.1, "damping": -1.0}, "damping must be >= 0"),
    ({"learning_rate": 0.1, "curvature": "newton"}, "unknown curvature 'newton'"),
    ({"learning_rate": 0.1, "vxx_rank": "full"}, "vxx_rank must be one of"),
    ({"learning_rate": 0.1, "coupling_iterations": 0}, "coupling_iterations must be >= 1"),
])
def test_bad_hyper_parameters(setup, kwargs, match):
  game, _, _ = setup
  with pytest.raises(ValueError, match=match):
    dgnopt.fne(game, **kwargs)


def test_non_finite_loss_skips_the_step(setup):
  game, params, (x, y) = setup
  tx = dgnopt.fne(game, 0.1, "adam")
  state = tx.init(params)
  bad_x = x.at[0, 0].set(jnp.nan)
  updates, state = h.step(tx, params, (bad_x, y), state)
  assert all(float(jnp.max(jnp.abs(u))) == 0.0 for u in jax.tree.leaves(updates))
  assert int(state.skipped) == 1 and int(state.count) == 0
  assert all(bool(jnp.all(jnp.isfinite(l))) for l in jax.tree.leaves(state.curvature))
  updates, state = h.step(tx, params, (x, y), state)
  assert int(state.count) == 1
  assert any(float(jnp.max(jnp.abs(u))) > 0 for u in jax.tree.leaves(updates))


@pytest.mark.parametrize("curvature", ["adam", "kfac"])
def test_skipped_step_keeps_every_statistic(curvature):
  # Four equal hidden layers are one scanned segment, the first and last
  # layers segments of their own: both kinds keep their old state exactly.
  game = G.sequential([G.Dense(6, "tanh")] + [G.Dense(6, "tanh") for _ in range(4)]
                      + [G.Dense(3)], (4,))
  params = h.perturbed_params(game)
  x, y = h.classification_batch((4,), 5)
  tx = dgnopt.fne(game, 0.1, curvature)
  _, state = h.step(tx, params, (x, y))
  before = state.curvature
  updates, state = h.step(tx, params, (x.at[1, 2].set(jnp.inf), y), state)
  assert int(state.skipped) == 1
  assert all(float(jnp.max(jnp.abs(u))) == 0.0 for u in jax.tree.leaves(updates))
  assert jax.tree.structure(state.curvature) == jax.tree.structure(before)
  for new, old in zip(jax.tree.leaves(state.curvature), jax.tree.leaves(before)):
    assert bool(jnp.array_equal(new, old))


@pytest.mark.parametrize("curvature,lr", [("identity", 1e4), ("rmsprop", 10.0),
                                          ("dense", 1e3)])
def test_huge_steps_never_produce_nan(setup, curvature, lr):
  # S = q^T M^-1 q far above I: the factor update clamps (I - S) at zero.
  game, params, batch = setup
  updates, state = h.step(dgnopt.fne(game, lr, curvature, damping=0.0), params, batch)
  assert all(bool(jnp.all(jnp.isfinite(u))) for u in jax.tree.leaves(updates))


def test_singular_dense_curvature_is_pseudo_inverted():
  # Zero inputs and zero weights: the dense curvature is singular.
  game = G.sequential([G.Dense(3, "tanh"), G.Dense(2)], (2,))
  params = jax.tree.map(jnp.zeros_like, game.init(jax.random.PRNGKey(0)))
  x = jnp.zeros((4, 2))
  y = jnp.array([0, 1, 0, 1])
  updates, state = h.step(dgnopt.fne(game, 1.0, "dense", damping=0.0), params, (x, y))
  assert all(bool(jnp.all(jnp.isfinite(u))) for u in jax.tree.leaves(updates))
  assert int(state.skipped) == 0


@pytest.mark.parametrize("curvature", [dgnopt.curvature.rmsprop(eps=0.0),
                                       dgnopt.curvature.adam(eps=0.0)])
def test_zero_diagonal_curvature_is_pseudo_inverted(curvature):
  # A dead ReLU unit has zero statistics; with eps = 0 that is C = 0 on its
  # coordinates, which get no step rather than 0/0.
  game = G.sequential([G.Dense(4, "relu"), G.Dense(3)], (4,))
  params = h.perturbed_params(game)
  params["dense_0"]["bias"] = params["dense_0"]["bias"].at[0].set(-1e3)
  updates, state = h.step(dgnopt.fne(game, 1e-3, curvature), params,
                          h.classification_batch((4,), 5))
  assert int(state.skipped) == 0
  assert all(bool(jnp.all(jnp.isfinite(u))) for u in jax.tree.leaves(updates))
  assert float(jnp.max(jnp.abs(updates["dense_0"]["kernel"][:, 0]))) == 0.0
  assert float(jnp.max(jnp.abs(updates["dense_0"]["kernel"][:, 1:]))) > 0.0
