"""Each input that used to fail deep inside JAX, and each silent stall, as a test.

For every case the reproducer as it was reported, and either the clear error
(raised by dgnopt_jax itself, naming the argument) or the correct result,
computed independently (the same step on inputs the test casts itself, the
step the params had before). Stalls use ``max_consecutive_skips=3`` so that
they raise after a few steps.
"""

import math
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import dgnopt_jax as dgnopt
from dgnopt_jax._src import trust_region
import helpers as h

G = dgnopt.games
LIMIT = 3  # max_consecutive_skips in the stall tests


@pytest.fixture(scope="module")
def setup():
  game = h.tanh_mlp()
  return game, h.perturbed_params(game), h.classification_batch((4,), 5)


def raised_by_us(info):
  """The error was raised in dgnopt_jax's own code (a check), not inside JAX or numpy."""
  tb = info.tb
  while tb.tb_next is not None:
    tb = tb.tb_next
  return os.sep + "dgnopt_jax" + os.sep in tb.tb_frame.f_code.co_filename


# -- Inputs that JAX used to reject with its own message. --------------------


@pytest.mark.parametrize("make", [dgnopt.fne, dgnopt.gr])
def test_integer_inputs_are_cast_to_the_params_dtype(setup, make):
  # Was: TypeError "Called multiply with a float0 array" (linearise.py).
  game, params, (x, y) = setup
  ints = jnp.round(3 * x).astype(jnp.int32)
  tx = make(game, 0.1)
  got, _ = h.step(tx, params, (ints, y))
  want, _ = h.step(tx, params, (ints.astype(jnp.float64), y))
  h.assert_trees_close(got, want, 1e-15)


def test_inputs_given_as_a_python_list(setup):
  # Was: "every input leaf needs the same leading batch axis; got sizes {None}".
  game, params, (x, y) = setup
  tx = dgnopt.fne(game, 0.1)
  with pytest.raises(TypeError, match="batch inputs must be arrays.*a list holding Python "
                     "float.*jnp.asarray") as info:
    tx.update(None, tx.init(params), params, batch=(np.asarray(x).tolist(), y))
  assert raised_by_us(info)


@pytest.mark.parametrize("lr,error,match", [
    (jnp.array([0.1, 0.2]), ValueError, r"learning_rate must be a scalar, got float\w*\[2\]"),
    ("0.1", TypeError, "learning_rate must be a float or a schedule.*got str"),
    (True, TypeError, "learning_rate must be a float or a schedule"),
    (float("nan"), ValueError, "learning_rate must be finite"),
    (lambda count: jnp.full((2,), 0.1), ValueError, "learning_rate schedule must return a "
     "real scalar"),
])
def test_learning_rates_that_are_not_real_scalars(setup, lr, error, match):
  # Was: a JAX broadcast error (shape (2,)) or "is not a valid JAX array type" (str).
  game, _, _ = setup
  with pytest.raises(error, match=match) as info:
    dgnopt.fne(game, lr)
  assert raised_by_us(info)


@pytest.mark.parametrize("curvature,match", [
    (dgnopt.curvature.adam, "got the function adam.*dgnopt.curvature.adam\\(\\)"),
    (__import__("dgnopt_jax._src.curvature", fromlist=["Adam"]).Adam,
     "got the class Adam.*dgnopt.curvature.adam\\(\\) or the name 'adam'"),
])
def test_a_curvature_class_or_factory_instead_of_an_instance(setup, curvature, match):
  # Was: "check() missing 1 required positional argument: 'theta'".
  game, _, _ = setup
  with pytest.raises(TypeError, match=match):
    dgnopt.fne(game, 0.1, curvature)


@pytest.mark.parametrize("make,match", [
    (lambda: G.Dense(-3), "Dense: features must be a positive integer, got -3"),
    (lambda: G.Dense(2.5), "Dense: features must be a positive integer"),
    (lambda: G.Conv2D(4, (0, 3)), r"Conv2D: kernel_size must be a pair of positive integers"),
    (lambda: G.Conv2D(4, 3), r"Conv2D: kernel_size must be a pair"),
    (lambda: G.Conv2D(4, strides=(1, -1)), "Conv2D: strides"),
    (lambda: G.Conv2D(4, padding="same"), "Conv2D: padding"),
    (lambda: G.AvgPool((2,)), "AvgPool: window"),
    (lambda: G.ResidualBlock(0), "ResidualBlock: features"),
    (lambda: G.InceptionBlock(-1), "InceptionBlock: features"),
    (lambda: G.Dense(3, "tahn"), "unknown activation 'tahn'"),
])
def test_layer_sizes(make, match):
  # Was (Dense(-3)): "broadcast_in_dim shape must have every element be nonnegative".
  with pytest.raises(ValueError, match=match):
    make()


class _Branchy(nn.Module):
  """A custom module with a Python ``if`` on an array value."""

  @nn.compact
  def __call__(self, x):
    x = nn.Dense(5)(x)
    if x.sum() > 0:
      x = jnp.tanh(x)
    return nn.Dense(3)(x)


def test_python_branch_on_values_in_a_flax_module():
  # Was: JAX's TracerBoolConversionError from inside from_flax.
  x = jnp.ones((1, 4))
  with pytest.raises(TypeError, match="the Flax model _Branchy uses an array's value in Python "
                     "control flow.*jnp.where or jax.lax.cond") as info:
    G.from_flax(_Branchy(), x, "softmax_cross_entropy")
  assert raised_by_us(info)
  assert isinstance(info.value.__cause__, jax.errors.TracerBoolConversionError)


def test_python_branch_on_values_in_a_stage(setup):
  _, _, (x, y) = setup

  def fn(x, thetas):
    h = x @ thetas[0]["w"]
    return jnp.tanh(h) if h.sum() > 0 else h

  game = G.Game([G.stage(lambda x, th: x, []), G.stage(fn, ["a"], name="branchy")],
                "softmax_cross_entropy")
  params = {"a": {"w": jnp.ones((4, 3))}}
  tx = dgnopt.fne(game, 0.1)
  with pytest.raises(TypeError, match=r"stage 1 \(branchy\) uses an array's value in Python"):
    tx.update(None, tx.init(params), params, batch=(x, y))


def test_optimizer_state_of_other_shapes(setup):
  # Was: "add got incompatible shapes for broadcasting: (5, 3), (6, 3)".
  game, params, batch = setup
  other = h.tanh_mlp(widths=(5, 6, 5))
  stale = dgnopt.fne(other, 0.1, "adam").init(h.perturbed_params(other))
  tx = dgnopt.fne(game, 0.1, "adam")
  with pytest.raises(ValueError, match=r"optimizer state does not fit.*at state\.curvature"
                     r"\['dense_1'\]\.mu\['bias'\]: tx\.init\(params\) has float64\[5\], the "
                     r"state given has float64\[6\]") as info:
    tx.update(None, stale, params, batch=batch)
  assert raised_by_us(info)


def test_optimizer_state_of_another_curvature(setup):
  # Was: "AttributeError: 'KroneckerState' object has no attribute 'mu'".
  game, params, batch = setup
  tx = dgnopt.fne(game, 0.1, "adam")
  with pytest.raises(ValueError, match=r"at state\.curvature\['dense_0'\]: tx\.init\(params\) "
                     "has AdamState, the state given has KroneckerState"):
    tx.update(None, dgnopt.fne(game, 0.1, "kfac").init(params), params, batch=batch)


def test_mixed_float32_and_float64_players_under_gr_kfac():
  # Was: "unexpected JAX type (e.g. shape/dtype) for argument to VJP function".
  game = G.sequential([G.Dense(6, "tanh"), G.Parallel(G.Dense(5), G.Dense(5)), G.Dense(3)],
                      (4,))
  params = h.perturbed_params(game)
  params["parallel_1"]["a"] = jax.tree.map(lambda p: p.astype(jnp.float32),
                                           params["parallel_1"]["a"])
  x, y = h.classification_batch((4,), 5)
  tx = dgnopt.gr(game, 0.1, "kfac")
  with pytest.raises(ValueError, match=r"one floating dtype.*float64: 'dense_0', "
                     r"'parallel_1/b', 'dense_2'; float32: 'parallel_1/a'"):
    tx.update(None, tx.init(params), params, batch=(x, y))
  # The open-loop step differentiates no stage by its input: mixed dtypes are fine there.
  updates, state = h.step(dgnopt.olne(game, 0.1), params, (x, y))
  assert int(state.skipped) == 0 and updates["parallel_1"]["a"]["kernel"].dtype == jnp.float32


# -- Silent stalls. -----------------------------------------------------------


def test_learning_rate_schedule_not_finite_at_count_0(setup):
  # Was: every step skipped, forever (a skipped step does not advance count).
  game, _, _ = setup
  with pytest.raises(ValueError, match="learning_rate schedule must give a finite value >= 0 "
                     "at count 0, got nan"):
    dgnopt.fne(game, lambda count: jnp.where(count >= 0, jnp.nan, 0.1))
  with pytest.raises(TypeError, match="learning_rate schedule must be traceable"):
    dgnopt.fne(game, lambda count: 0.1 if count < 5 else 0.01)


def _run(tx, params, batch, steps, state=None):
  """``steps`` updates, compiled once per transformation (:func:`helpers.step`)."""
  state = tx.init(params) if state is None else state
  for _ in range(steps):
    updates, state = h.step(tx, params, batch, state)
    params = optax.apply_updates(params, updates)
  jax.block_until_ready(state)
  return params, state


def test_learning_rate_schedule_that_turns_nan_skips_then_raises(setup):
  game, params, batch = setup
  tx = dgnopt.fne(game, lambda count: jnp.where(count >= 2, jnp.nan, 0.1),
                  max_consecutive_skips=LIMIT)
  params, state = _run(tx, params, batch, LIMIT + 1)
  assert (int(state.count), int(state.skipped), int(state.consecutive_skips)) == (2, 2, 2)
  with pytest.raises(Exception, match=r"DGNOpt run stalled: the last 3 steps were all "
                     r"skipped.*learning rate \(times the trust region's step scale\) nan"):
    _run(tx, params, batch, 1, state)


def test_kfac_damping_schedule_that_turns_nan_is_a_skipped_step(setup):
  # Was: params frozen (safe_reciprocal(NaN) = 0) while count advanced, skipped 0.
  game, params, batch = setup
  damping = lambda count: jnp.where(count >= 2, jnp.nan, 0.1)
  tx = dgnopt.fne(game, 0.05, "kfac", damping=damping, max_consecutive_skips=LIMIT)
  before, state = _run(tx, params, batch, 2)
  after, state = _run(tx, before, batch, LIMIT - 1, state)
  assert (int(state.count), int(state.skipped)) == (2, LIMIT - 1)
  h.assert_trees_close(after, before, 1e-300)
  with pytest.raises(Exception, match=r"DGNOpt run stalled.*damping nan"):
    _run(tx, after, batch, 1, state)


def test_rmsprop_decay_nan(setup):
  # Was: NaN statistics, params frozen, nothing counted.
  game, params, batch = setup
  with pytest.raises(ValueError, match=r"rmsprop: decay must be a finite number in \[0, 1\), "
                     "got nan"):
    dgnopt.curvature.rmsprop(decay=float("nan"))
  for kwargs, match in (({"b1": 1.0}, "adam: b1"), ({"eps": -1e-8}, "adam: eps")):
    with pytest.raises(ValueError, match=match):
      dgnopt.curvature.adam(**kwargs)
  with pytest.raises(ValueError, match="kfac: decay"):
    dgnopt.curvature.kfac(decay=1.5)
  # Statistics that turn NaN after construction (the check bypassed): the step
  # is skipped and the old statistics kept.
  curvature = dgnopt.curvature.rmsprop()
  object.__setattr__(curvature, "decay", float("nan"))
  _, state = _run(dgnopt.fne(game, 1e-3, curvature, max_consecutive_skips=math.inf), params,
                  batch, 2)
  assert (int(state.count), int(state.skipped)) == (0, 2)
  assert all(bool(jnp.all(jnp.isfinite(l))) for l in jax.tree.leaves(state.curvature))


def test_params_not_finite_at_the_start(setup):
  # Was: every step skipped, no error.
  game, params, batch = setup
  bad = jax.tree.map(lambda p: p, params)
  bad["dense_1"]["kernel"] = bad["dense_1"]["kernel"].at[0, 0].set(jnp.nan)
  with pytest.raises(ValueError, match="params of player 'dense_1' are not finite"):
    dgnopt.fne(game, 0.1).init(bad)
  # A state made elsewhere (a restored run): the stall names the player.
  tx = dgnopt.fne(game, 0.1, max_consecutive_skips=LIMIT)
  with pytest.raises(Exception, match=r"params not finite in players \['dense_1'\]"):
    _run(tx, bad, batch, LIMIT, state=tx.init(params))


@pytest.mark.parametrize("make,curvature", [(dgnopt.fne, "kfac"), (dgnopt.gr, "ekfac"),
                                            (dgnopt.olne, "kfac")])
def test_kronecker_curvatures_refuse_zero_damping(setup, make, curvature):
  # Was: accepted; DIGITS MLP loss 2.5e12 within 10 steps.
  game, _, _ = setup
  with pytest.raises(ValueError, match=f"damping must be > 0, got 0.0 \\(the {curvature} "
                     "curvature's solve needs damping > 0\\)"):
    make(game, 0.1, curvature, damping=0.0)
  with pytest.raises(ValueError, match="damping schedule must give a finite value > 0"):
    make(game, 0.1, curvature, damping=optax.constant_schedule(0.0))
  make(game, 0.1, "dense", damping=0.0)  # the dense curvature pseudo-inverts: allowed


def test_max_consecutive_skips_argument(setup):
  game, _, _ = setup
  for bad in (0, -1, 2.5, True):
    with pytest.raises(ValueError, match="max_consecutive_skips must be a positive integer"):
      dgnopt.fne(game, 0.1, max_consecutive_skips=bad)


def test_a_skip_run_broken_by_a_finite_step_starts_again(setup):
  game, params, (x, y) = setup
  tx = dgnopt.fne(game, 0.1, max_consecutive_skips=LIMIT)
  state = tx.init(params)
  bad = (x.at[0, 0].set(jnp.nan), y)
  for batch in [bad, bad, (x, y), bad, bad, (x, y)]:
    updates, state = h.step(tx, params, batch, state)
    params = optax.apply_updates(params, updates)
  assert (int(state.skipped), int(state.count), int(state.consecutive_skips)) == (4, 2, 0)


def test_rejections_at_the_trust_region_floor_are_not_a_stall():
  # A converged run: a step of 2^-20 of the learning rate along the descent
  # direction no longer lowers the batch objective beyond its round-off, and
  # the trust region rejects every step at its smallest scale. That is the
  # end of a run that worked, not a stall: no error.
  rosenbrock = lambda out, target: (1.0 - out[0]) ** 2 + 100.0 * (out[1] - out[0] ** 2) ** 2
  game = G.Game((G.stage(lambda x, th: x + th[0], ["x"]),
                 G.stage(lambda h, th: jnp.concatenate([h, jnp.zeros_like(h) + th[0]], -1),
                         ["y"])), rosenbrock)
  tx = dgnopt.fne(game, 1e-2, "adam", max_consecutive_skips=LIMIT)

  def body(carry, _):
    p, s = carry
    u, s = tx.update(None, s, p, batch=(jnp.zeros((1, 1)), jnp.zeros((1,))))
    return (optax.apply_updates(p, u), s), s.step_scale <= trust_region.MIN_SCALE

  start = {"x": jnp.array([0.0]), "y": jnp.array([0.0])}
  (final, state), at_floor = jax.jit(
      lambda p: jax.lax.scan(body, (p, tx.init(p)), None, length=3000))(start)
  assert int(state.skipped) == 0 and int(np.sum(np.asarray(at_floor))) > LIMIT
  np.testing.assert_allclose([float(final["x"][0]), float(final["y"][0])], [1.0, 1.0],
                             atol=1e-2)
