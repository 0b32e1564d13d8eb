"""optax's wrappers around the DGNOpt transformations, one test per row of docs/OPTAX.md.

What works is compared with an independent computation (optax on
``jax.grad``, a step of a freshly built transformation, a game written by
hand); what is refused is checked for its error type and message.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import dgnopt_jax as dgnopt
import helpers as h

G = dgnopt.games


@pytest.fixture(scope="module")
def setup():
  game = h.tanh_mlp(widths=(5, 5))  # dense_0 .. dense_2
  params = h.perturbed_params(game)
  batch = h.classification_batch((4,), 6)
  return game, params, batch


_FNE = {}


def fne(game, learning_rate):
  """One ``dgnopt.fne(game, learning_rate)`` per rate, so ``h.step`` compiles its step once."""
  return _FNE.setdefault((id(game), learning_rate), dgnopt.fne(game, learning_rate))


def test_gradients_passed_in_are_refused(setup):
  game, params, batch = setup
  tx = dgnopt.fne(game, 0.1)
  gradients = jax.tree.map(jnp.ones_like, params)  # any pytree: it is not read
  with pytest.raises(TypeError, match=r"call tx.update\(None, state, params, batch=...\)"):
    tx.update(gradients, tx.init(params), params, batch=batch)


@pytest.mark.parametrize("after", ["clip_by_global_norm", "clip", "decoupled_decay"])
def test_transformations_after_the_step_act_on_it(setup, after):
  game, params, batch = setup
  plain, _ = h.step(fne(game, 0.5), params, batch)
  u = np.concatenate([np.ravel(l) for l in jax.tree.leaves(plain)])
  if after == "clip_by_global_norm":
    bound = 0.5 * np.linalg.norm(u)
    then = optax.clip_by_global_norm(bound)
    expected = jax.tree.map(lambda a: a * bound / np.linalg.norm(u), plain)
  elif after == "clip":
    bound = 0.5 * np.max(np.abs(u))
    then = optax.clip(bound)
    expected = jax.tree.map(lambda a: np.clip(a, -bound, bound), plain)
  else:  # decoupled weight decay: theta <- theta + step - lr * wd * theta
    then = optax.add_decayed_weights(-0.5 * 0.01)
    expected = jax.tree.map(lambda a, p: a - 0.005 * p, plain, params)
  got, _ = h.step(optax.chain(fne(game, 0.5), then), params, batch)
  h.assert_trees_close(got, expected, 1e-12)


@pytest.mark.parametrize("before", [optax.clip_by_global_norm(1e-3), optax.clip(1e-3),
                                    optax.add_decayed_weights(1e-4)])
def test_transformations_before_the_step_are_refused(setup, before):
  game, params, _ = setup
  for tx in (optax.chain(before, dgnopt.fne(game, 0.1)),
             optax.named_chain(("first", before), ("game", dgnopt.gr(game, 0.1)))):
    with pytest.raises(TypeError, match="must come first in optax.(named_)?chain"):
      tx.init(params)


def test_multisteps_is_refused_at_init(setup):
  game, params, _ = setup
  tx = optax.MultiSteps(dgnopt.fne(game, 0.1), 2)
  for init in (tx.init, jax.jit(tx.init)):
    with pytest.raises(TypeError, match="optax.MultiSteps cannot wrap dgnopt_jax.fne.*"
                                        "whole batch"):
      init(params)


def test_apply_if_finite_is_refused_and_the_step_checks_itself(setup):
  game, params, (x, y) = setup
  with pytest.raises(TypeError, match="optax.apply_if_finite cannot wrap.*nonfinite='skip'"):
    optax.apply_if_finite(dgnopt.olne(game, 0.1), 3).init(params)
  updates, state = h.step(fne(game, 0.5), params, (x.at[0, 0].set(jnp.nan), y))
  assert all(float(jnp.max(jnp.abs(l))) == 0.0 for l in jax.tree.leaves(updates))
  assert int(state.skipped) == 1 and int(state.count) == 0


def test_inject_hyperparams_under_jit_without_static_args(setup):
  game, params, batch = setup
  tx = optax.inject_hyperparams(dgnopt.fne)(game=game, learning_rate=0.1)
  traces = []

  @jax.jit
  def step(params, state):
    traces.append(1)
    return tx.update(None, state, params, batch=batch)

  state = tx.init(params)
  first, state = step(params, state)
  h.assert_trees_close(first, h.step(fne(game, 0.1), params, batch)[0], 1e-12)
  # a new learning rate in the state: the same compiled step, the step of a
  # freshly built fne at the new rate from the same statistics
  state.hyperparams["learning_rate"] = jnp.asarray(0.03, state.hyperparams["learning_rate"].dtype)
  second, _ = step(params, state)
  fresh = dgnopt.fne(game, 0.03)
  expected, _ = h.step(fresh, params, batch, state.inner_state)
  h.assert_trees_close(second, expected, 1e-12)
  assert len(traces) == 1
  assert float(h.max_relative_error(second, first)) > 0.1


def test_inject_hyperparams_traces_the_numbers_it_is_given(setup):
  # coupling_iterations and vxx_reg given explicitly are injected as arrays
  # (traced: the power iteration runs as a loop); the step is the one of a
  # transformation built with those numbers.
  game, params, batch = setup
  kwargs = dict(learning_rate=0.5, coupling_iterations=3, vxx_reg=1e-3)
  tx = optax.inject_hyperparams(dgnopt.fne)(game=game, **kwargs)
  got, _ = jax.jit(lambda p, s: tx.update(None, s, p, batch=batch))(params, tx.init(params))
  expected, _ = h.step(dgnopt.fne(game, **kwargs), params, batch)
  h.assert_trees_close(got, expected, 1e-10)
  decayed = optax.inject_hyperparams(dgnopt.fne)(game=game, learning_rate=0.1, weight_decay=1e-3)
  with pytest.raises(TypeError, match=r"static_args=\('weight_decay',\)"):
    jax.jit(lambda p, s: decayed.update(None, s, p, batch=batch))(params, decayed.init(params))


def test_masked_and_multi_transform_are_refused(setup):
  game, params, _ = setup
  labels = {k: ("game" if k in ("dense_0", "dense_1") else "other") for k in params}  # dense_2
  mask = {k: v == "game" for k, v in labels.items()}
  wrapped = [optax.multi_transform({"game": dgnopt.fne(game, 0.1), "other": optax.adam(1e-3)},
                                    labels),
             optax.masked(dgnopt.fne(game, 0.1), mask)]
  if hasattr(optax.transforms, "selective_transform"):  # optax >= 0.2.5
    wrapped.append(optax.transforms.selective_transform(
        dgnopt.fne(game, 0.1), freeze_mask={k: not v for k, v in mask.items()}))
  for tx in wrapped:
    with pytest.raises(TypeError, match="player 'dense_2' .* masked .*frozen="):
      tx.init(params)


@pytest.mark.skipif(not hasattr(optax.transforms, "freeze"), reason="optax without freeze")
def test_freeze_after_the_step_is_refused(setup):
  game, params, _ = setup
  tx = optax.chain(dgnopt.fne(game, 0.1),
                   optax.transforms.freeze({k: k == "dense_0" for k in params}))
  with pytest.raises(TypeError, match="freeze after dgnopt_jax.fne .*frozen="):
    tx.init(params)


def test_frozen_open_loop_step_is_optax_with_those_params_zeroed(setup):
  game, params, batch = setup
  labels = {k: ("zero" if k == "dense_1" else "sgd") for k in params}
  sgd = optax.multi_transform({"sgd": optax.sgd(0.1), "zero": optax.set_to_zero()}, labels)
  grads = jax.grad(game.loss_value)(params, *batch)
  expected, _ = sgd.update(grads, sgd.init(params), params)
  got, state = h.step(dgnopt.olne(game, 0.1, frozen=["dense_1"]), params, batch)
  h.assert_trees_close(got, expected, 1e-12)
  assert "dense_1" not in state.curvature


@pytest.mark.parametrize("make", [dgnopt.fne, dgnopt.gr])
def test_frozen_players_are_constants_of_the_game(setup, make):
  # the same step as on a game written by hand in which the frozen layer is
  # a stage without players closing over its params
  game, params, batch = setup
  layer = G.Dense(5, "tanh")  # dense_1
  fixed = G.stage(lambda x, thetas: layer(params["dense_1"], x), [])
  by_hand = G.Game(game.stages[:1] + (fixed,) + game.stages[2:], game.loss)
  rest = {k: v for k, v in params.items() if k != "dense_1"}
  expected, _ = h.step(make(by_hand, 0.5, "adam"), rest, batch)
  got, state = h.step(make(game, 0.5, "adam", frozen="dense_1"), params, batch)
  assert all(float(jnp.max(jnp.abs(l))) == 0.0 for l in jax.tree.leaves(got["dense_1"]))
  h.assert_trees_close({k: v for k, v in got.items() if k != "dense_1"}, expected, 1e-12)
  with pytest.raises(ValueError, match="frozen names 'dense_9', which is no player"):
    make(game, 0.1, frozen=["dense_9"])


def test_reduce_on_plateau_after_the_step_scales_it(setup):
  game, params, batch = setup
  tx = optax.chain(fne(game, 0.5),
                   optax.contrib.reduce_on_plateau(factor=0.5, patience=1, cooldown=0))
  step = jax.jit(lambda s, v: tx.update(None, s, params, batch=batch, value=v))
  state, scales = tx.init(params), []
  for _ in range(3):  # the same value every time: a plateau
    updates, new_state = step(state, jnp.asarray(1.0))
    scales.append(float(optax.tree_utils.tree_get(new_state, "scale")))
    plain, _ = h.step(fne(game, 0.5), params, batch, state[0])
    h.assert_trees_close(updates, jax.tree.map(lambda a: scales[-1] * a, plain), 1e-12)
    state = new_state
  assert scales[0] == 1.0 and scales[-1] < 1.0


def test_tree_get_count_counts_applied_steps(setup):
  game, params, (x, y) = setup
  tx = optax.chain(fne(game, 0.5), optax.clip_by_global_norm(1.0))
  state = tx.init(params)
  for batch in [(x, y), (x.at[0, 0].set(jnp.inf), y), (x, y)]:
    updates, state = h.step(tx, params, batch, state)
    params = optax.apply_updates(params, updates)
  assert int(optax.tree_utils.tree_get(state, "count")) == 2
  assert int(optax.tree_utils.tree_get(state, "skipped")) == 1


def test_map_params_maps_the_per_player_moments(setup):
  game, params, batch = setup
  tx = dgnopt.fne(game, 0.1, "adam")
  _, state = h.step(tx, params, batch)
  cast = optax.tree_utils.tree_map_params(tx, lambda p: p.astype(jnp.float32), state,
                                          transform_non_params=lambda v: v)
  for player in ("dense_0", "dense_2"):
    for got, want in zip(jax.tree.leaves(cast.curvature[player].mu),
                         jax.tree.leaves(state.curvature[player].mu)):
      assert got.dtype == jnp.float32 and np.array_equal(np.float32(want), got)
  assert cast.curvature["dense_0"].count.dtype == jnp.int32 and cast.count.dtype == jnp.int32
  kfac = dgnopt.fne(game, 0.1, "kfac")
  marked = optax.tree_utils.tree_map_params(kfac, lambda p: p, kfac.init(params),
                                            transform_non_params=lambda v: "not params")
  assert set(jax.tree.leaves(marked)) == {"not params"}  # factors mirror no params


def test_weight_decay_on_the_transformation_is_optax_decay(setup):
  game, params, batch = setup
  grads = jax.grad(game.loss_value)(params, *batch)  # no decay in the game
  sgd = optax.chain(optax.add_decayed_weights(0.01), optax.sgd(0.1))
  expected, _ = sgd.update(grads, sgd.init(params), params)
  got, _ = h.step(dgnopt.olne(game, 0.1, weight_decay=0.01), params, batch)
  h.assert_trees_close(got, expected, 1e-12)
  with pytest.raises(ValueError, match="set it in one place"):
    dgnopt.fne(h.tanh_mlp(wd=0.1), 0.1, weight_decay=0.01)
