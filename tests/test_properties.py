"""Property-based tests: random networks, sizes, dtypes and extreme values through the public API.

The contract (docs/SAFEGUARDS.md, "Numerical safeguards"): an update either

* raises one of our documented errors (``ValueError`` / ``TypeError`` raised
  by dgnopt_jax itself, naming the problem) before any work is done, or
* returns a step after which the params keep their dtypes and are finite, or
  is skipped (``nonfinite="skip"``): zero updates, ``state.skipped`` counts
  it, ``state.count`` does not.

It never returns NaN params without the skip counter, and never lets an
internal error out. Examples are drawn deterministically (``derandomize``)
so that a failure reproduces; raise ``DGNOPT_PROPERTY_EXAMPLES`` for a longer
search.
"""

import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import dgnopt_jax as dgnopt

G = dgnopt.games

EXAMPLES = int(os.environ.get("DGNOPT_PROPERTY_EXAMPLES", "6"))
CURVATURES = ("identity", "rmsprop", "adam", "kfac", "ekfac", "dense")
PRINCIPLES = {"olne": dgnopt.olne, "fne": dgnopt.fne, "gr": dgnopt.gr}
DTYPES = {"float32": jnp.float32, "float64": jnp.float64, "bfloat16": jnp.bfloat16}
INPUT_SCALES = (0.0, 1e-30, 1.0, 1e4, 1e30)
POISON = (None, math.nan, math.inf, -math.inf)

SETTINGS = dict(deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@st.composite
def problems(draw):
  """A random MLP game, its params and a batch (possibly extreme or poisoned)."""
  in_dim = draw(st.integers(1, 5))
  widths = draw(st.lists(st.integers(1, 5), max_size=2))
  activation = draw(st.sampled_from(["tanh", "relu", None]))
  outputs = draw(st.integers(1, 4))
  loss = draw(st.sampled_from(["softmax_cross_entropy", "squared_error"]))
  if loss == "softmax_cross_entropy":
    outputs = max(outputs, 2)
  batch = draw(st.integers(1, 6))
  return {
      "in_dim": in_dim, "widths": widths, "activation": activation, "outputs": outputs,
      "loss": loss, "batch": batch,
      "weight_decay": draw(st.sampled_from([0.0, 1e-3])),
      "dtype": draw(st.sampled_from(sorted(DTYPES))),
      "curvature": draw(st.sampled_from(CURVATURES)),
      "principle": draw(st.sampled_from(sorted(PRINCIPLES))),
      "learning_rate": draw(st.sampled_from([1e-6, 1e-2, 1.0, 1e6])),
      "input_scale": draw(st.sampled_from(INPUT_SCALES)),
      "poison": draw(st.sampled_from(POISON)),
      "seed": draw(st.integers(0, 2 ** 16)),
  }


def build(problem):
  layers = [G.Dense(w, problem["activation"]) for w in problem["widths"]]
  layers.append(G.Dense(problem["outputs"]))
  game = G.sequential(layers, (problem["in_dim"],), problem["loss"],
                      weight_decay=problem["weight_decay"])
  dtype = DTYPES[problem["dtype"]]
  rng = np.random.default_rng(problem["seed"])
  # Params of the game's structure, drawn with numpy (cheap for new shapes).
  params = jax.tree.map(
      lambda s: jnp.asarray(rng.normal(size=s.shape) / np.sqrt(max(s.shape[0], 1)), dtype),
      jax.eval_shape(game.init, jax.random.PRNGKey(0)))
  b = problem["batch"]
  x = rng.normal(size=(b, problem["in_dim"])) * problem["input_scale"]
  if problem["poison"] is not None:
    x[rng.integers(b), rng.integers(problem["in_dim"])] = problem["poison"]
  if problem["loss"] == "softmax_cross_entropy":
    y = jnp.asarray(rng.integers(0, problem["outputs"], size=b))
  else:
    y = jnp.asarray(rng.normal(size=(b, problem["outputs"])), dtype)
  return game, params, (jnp.asarray(x, dtype), y)


def make_transformation(game, problem, **overrides):
  kwargs = dict(learning_rate=problem["learning_rate"], curvature=problem["curvature"])
  kwargs.update(overrides)
  return PRINCIPLES[problem["principle"]](game, **kwargs)


@settings(max_examples=EXAMPLES, **SETTINGS)
@given(problems())
def test_a_step_is_finite_or_counted_as_skipped(problem):
  game, params, batch = build(problem)
  tx = make_transformation(game, problem)
  state = tx.init(params)
  updates, state = jax.jit(lambda p, s, b: tx.update(None, s, p, batch=b))(params, state, batch)
  new_params = optax.apply_updates(params, updates)

  assert jax.tree.structure(new_params) == jax.tree.structure(params)
  for new, old in zip(jax.tree.leaves(new_params), jax.tree.leaves(params)):
    assert new.dtype == old.dtype and new.shape == old.shape
  skipped, rejected = int(state.skipped), int(state.rejected)
  assert skipped + rejected + int(state.count) == 1
  if skipped or rejected:
    assert all(float(jnp.max(jnp.abs(u.astype(jnp.float32)))) == 0.0
               for u in jax.tree.leaves(updates))
  else:
    assert all(bool(jnp.all(jnp.isfinite(p))) for p in jax.tree.leaves(new_params))
  if not bool(jnp.all(jnp.isfinite(batch[0]))):
    assert skipped == 1, "a batch with a non-finite input must be skipped"
  assert all(bool(jnp.all(jnp.isfinite(l))) for l in jax.tree.leaves(state.curvature)
             if jnp.issubdtype(l.dtype, jnp.floating))


def _corrupt(kind, game, params, batch, problem):
  """Returns a thunk that runs one update on a corrupted input."""
  x, y = batch
  tx = lambda **kw: make_transformation(game, problem, **kw)
  first = game.players[0].name

  def step(p=params, b=batch, **kw):
    t = tx(**kw)
    return t.update(None, t.init(params), p, batch=b)

  if kind == "targets_length":
    return lambda: step(b=(x, y[:-1] if len(y) > 1 else jnp.concatenate([y, y])))
  if kind == "input_width":
    return lambda: step(b=(jnp.concatenate([x, x], axis=1), y))
  if kind == "extra_input_axis":
    return lambda: step(b=(x[:, None], y))
  if kind == "empty_batch":
    return lambda: step(b=(x[:0], y[:0]))
  if kind == "batch_not_a_pair":
    return lambda: step(b=x)
  if kind == "missing_player":
    return lambda: step(p={k: v for k, v in params.items() if k != first})
  if kind == "wrong_param_shape":
    bad = dict(params)
    bad[first] = jax.tree.map(lambda a: jnp.zeros(a.shape + (1,), a.dtype), params[first])
    return lambda: step(p=bad)
  if kind == "integer_params":
    return lambda: step(p=jax.tree.map(lambda a: a.astype(jnp.int32), params))
  if kind == "wrong_targets":
    if problem["loss"] == "softmax_cross_entropy":
      return lambda: step(b=(x, y.astype(jnp.float32)))
    return lambda: step(b=(x, y[:, :1] if y.shape[1] > 1 else jnp.concatenate([y, y], 1)))
  if kind == "label_out_of_range":
    if problem["loss"] == "softmax_cross_entropy":
      return lambda: step(b=(x, y.at[0].set(problem["outputs"])))
    return lambda: step(b=(x, y[:-1] if len(y) > 1 else jnp.concatenate([y, y])))
  if kind == "learning_rate":
    return lambda: step(learning_rate=-abs(problem["learning_rate"]))
  if kind == "damping":
    return lambda: step(damping=-1e-3)
  if kind == "curvature_name":
    return lambda: step(curvature="newton")
  if kind == "nonfinite_policy":
    return lambda: step(nonfinite="ignore")
  raise AssertionError(kind)


CORRUPTIONS = ("targets_length", "input_width", "extra_input_axis", "empty_batch",
               "batch_not_a_pair", "missing_player", "wrong_param_shape", "integer_params",
               "wrong_targets", "label_out_of_range", "learning_rate", "damping", "curvature_name",
               "nonfinite_policy")


@settings(max_examples=3 * EXAMPLES, **SETTINGS)
@given(problems(), st.sampled_from(CORRUPTIONS))
def test_bad_input_raises_a_documented_error_early(problem, kind):
  game, params, batch = build(problem)
  run = _corrupt(kind, game, params, batch, problem)
  with pytest.raises((ValueError, TypeError)) as info:
    run()
  # Raised by dgnopt_jax itself (a documented check), not by JAX or numpy
  # somewhere inside the solver.
  tb = info.tb
  while tb.tb_next is not None:
    tb = tb.tb_next
  where = tb.tb_frame.f_code.co_filename
  assert os.sep + "dgnopt_jax" + os.sep in where, (
      f"{kind}: {info.typename} raised in {where}: {info.value}")
  assert str(info.value)
