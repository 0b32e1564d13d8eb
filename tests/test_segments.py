"""The segments of a step: which stages are scanned together, and the non-finite guard."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dgnopt_jax as dgnopt
from dgnopt_jax._src import segments

G = dgnopt.games


def plan(game, input_shape):
  params = game.init(jax.random.PRNGKey(0))
  return [(s.start, s.period, s.repeats)
          for s in segments.plan_segments(game, params, jnp.zeros((2,) + input_shape, jnp.float32))]


def test_runs_of_equal_layers_are_scanned_from_the_threshold_on():
  # Dense(4 -> 6), five Dense(6 -> 6) equal layers, the head: the five form one run.
  game = G.sequential([G.Dense(6, "tanh") for _ in range(6)] + [G.Dense(3)], (4,))
  assert plan(game, (4,)) == [(0, 1, 1), (1, 1, 5), (6, 1, 1)]
  # Three equal layers are below MIN_STAGE_REPEATS (4): every stage on its own.
  game = G.sequential([G.Dense(6, "tanh") for _ in range(4)] + [G.Dense(3)], (4,))
  assert plan(game, (4,)) == [(t, 1, 1) for t in range(5)]


def test_equal_layers_with_other_activations_are_not_one_run():
  layers = [G.Dense(6, a) for a in ("tanh", "tanh", "relu", "tanh", "tanh", "tanh", "tanh")]
  game = G.sequential(layers + [G.Dense(3)], (6,))
  # Stages 0-1 tanh, 2 relu, 3-6 tanh (a run of 4), the head.
  assert plan(game, (6,)) == [(0, 1, 1), (1, 1, 1), (2, 1, 1), (3, 1, 4), (7, 1, 1)]


def test_blocks_of_stages_repeat_with_their_period():
  # A stem, four equal residual blocks of two stages each, pooling and a head.
  game = G.sequential([G.Conv2D(3, (3, 3), activation="relu")] +
                      [G.ResidualBlock(3) for _ in range(4)] +
                      [G.AvgPool((2, 2)), G.Dense(3)], (4, 4, 1))
  segs = plan(game, (4, 4, 1))
  assert segs[0] == (0, 1, 1) and segs[1] == (1, 2, 4)
  assert sum(period * repeats for _, period, repeats in segs) == len(game.stages)


def test_a_gradient_fn_of_other_shapes_is_refused():
  stage = G.stage(lambda x, th: x * th[0], ["w"])
  bad = G.Stage(stage.fn, stage.players, "scaled", gradient_fn=lambda x, th: x[:, :1])
  game = G.Game((bad,), "squared_error")
  with pytest.raises(ValueError, match="gradient_fn returns"):
    segments.plan_segments(game, {"w": jnp.ones(3)}, jnp.zeros((2, 3)))


def test_all_finite_and_keep_if_applied():
  assert bool(segments.all_finite({"a": jnp.ones(3), "b": (jnp.zeros((2, 2)),)}))
  assert not bool(segments.all_finite({"a": jnp.array([1.0, jnp.inf]), "b": jnp.ones(2)}))
  assert bool(segments.all_finite({}))
  segs = [segments.Segment(0, 1, 1), segments.Segment(1, 1, 4)]
  deltas = [(jnp.ones(2),), (jnp.ones((4, 3)),)]
  new, old = [(jnp.full(2, 5.0),), (jnp.full((4, 3), 5.0),)], [(jnp.zeros(2),),
                                                              (jnp.zeros((4, 3)),)]
  for applied, finite in ((True, True), (False, True), (False, False)):
    kept_deltas, kept_states = segments.keep_if_applied(jnp.asarray(applied),
                                                        jnp.asarray(finite), segs, deltas,
                                                        new, old)
    for d in jax.tree.leaves(kept_deltas):
      np.testing.assert_array_equal(d, 1.0 if applied else 0.0)
    for s in jax.tree.leaves(kept_states):  # statistics move unless the step is not finite
      np.testing.assert_array_equal(s, 5.0 if finite else 0.0)
