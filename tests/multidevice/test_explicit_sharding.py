"""Explicit sharding (``AxisType.Explicit``, sharding in types) on 8 devices.

The batch is sharded over the ``data`` axis of an explicit-axes mesh, the
params replicated (or a kernel split over a ``model`` axis); the step runs
with the mesh's axes switched to ``Auto`` inside (``jax.sharding.auto_axes``)
and hands back its updates and state with the sharding types it was given.
Checked: 5 steps equal 5 steps on one device (1e-5, float32), the state's
and the params' types are the same at init and after every step, eager
equals jit. Run on 8 CPU devices by ``tests/test_multidevice.py``.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import dgnopt_jax as dgnopt

G = dgnopt.games

pytestmark = [
    pytest.mark.skipif(jax.device_count() < 8,
                       reason="needs 8 devices (run through tests/test_multidevice.py)"),
    pytest.mark.skipif(not hasattr(jax.sharding, "auto_axes"),
                       reason="explicit mesh axes need a newer JAX"),
]

STEPS = 5  # as the shared problem (conftest.py)
BATCH = 64
RATES = {"identity": 0.1, "adam": 1e-3, "kfac": 0.05}
# One configuration by default; the cross product with -m slow.
DEFAULT_RUN = ("fne", "adam")


def make(kind, curvature, game):
  kwargs = {"vxx_reg": 1e-4} if kind != "olne" else {}
  return getattr(dgnopt, kind)(game, RATES[curvature], curvature, **kwargs)


def step_fn(tx):
  def step(params, state, x, y):
    updates, state = tx.update(None, state, params, batch=(x, y))
    return optax.apply_updates(params, updates), state
  return step


def types(tree):
  return jax.tree.map(jax.typeof, tree)


def train_on_one_device(tx, params, batches):
  step = jax.jit(step_fn(tx))
  state = tx.init(params)
  for x, y in batches:
    params, state = step(params, state, x, y)
  return jax.device_get(params), jax.device_get(state)


def train_explicit(tx, params, batches, mesh, params_spec):
  """``STEPS`` jit-compiled steps under ``jax.set_mesh(mesh)``; the types must not change."""
  with jax.set_mesh(mesh):
    params = jax.device_put(params, jax.tree.map(lambda s: NamedSharding(mesh, s), params_spec))
    state = tx.init(params)
    want = types((params, state))
    assert types(state) == types(jax.jit(tx.init)(params))  # eager init == jit init
    step = jax.jit(step_fn(tx))
    for x, y in batches:
      x, y = jax.device_put((x, y), NamedSharding(mesh, P("data")))
      params, state = step(params, state, x, y)
      assert types((params, state)) == want
  return jax.device_get(params), jax.device_get(state), want[1]


def relative_errors(a, b):
  errors = {}
  for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)):
    name = jax.tree_util.keystr(path)
    if "basis" in name or "eigen" in name:  # eigenvectors are defined up to sign
      continue
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    errors[name] = float(np.linalg.norm(x - y) / max(np.linalg.norm(x), 1e-30))
  return errors


def explicit_mesh(shape=(8,), names=("data",)):
  return jax.make_mesh(shape, names, axis_types=(jax.sharding.AxisType.Explicit,) * len(shape),
                       devices=jax.devices()[:8])


CONFIGS = [(kind, curvature) for kind in ("fne", "gr", "olne") for curvature in RATES]


@pytest.mark.parametrize("kind,curvature", [
    c if c == DEFAULT_RUN else pytest.param(*c, marks=pytest.mark.slow) for c in CONFIGS])
def test_explicit_mesh_equals_one_device(problem, kind, curvature):
  game, params, batches = problem
  tx = make(kind, curvature, game)
  p1, s1 = train_on_one_device(tx, params, batches)
  p8, s8, _ = train_explicit(tx, params, batches, explicit_mesh(),
                             jax.tree.map(lambda _: P(), params))
  assert int(s8.count) == STEPS and int(s8.skipped) == 0
  assert min(relative_errors(params, p1).values()) > 1e-4, "the steps must move every leaf"
  errors = relative_errors(p1, p8)
  assert max(errors.values()) < 1e-5, errors
  state_errors = relative_errors(s1, s8)
  assert max(state_errors.values()) < 1e-5, state_errors


@pytest.mark.parametrize("kind,curvature", [
    c if c == ("olne", "kfac") else pytest.param(*c, marks=pytest.mark.slow) for c in CONFIGS])
def test_explicit_mesh_eager_equals_jit(problem, kind, curvature):
  game, params, batches = problem
  tx = make(kind, curvature, game)
  mesh = explicit_mesh()
  with jax.set_mesh(mesh):
    p = jax.device_put(params, NamedSharding(mesh, P()))
    x, y = jax.device_put(batches[0], NamedSharding(mesh, P("data")))
    state = tx.init(p)
    eager = tx.update(None, state, p, batch=(x, y))
    jitted = jax.jit(lambda s, p, x, y: tx.update(None, s, p, batch=(x, y)))(state, p, x, y)
    assert types(eager) == types(jitted)
    assert types(eager[1]) == types(state) and types(eager[0]) == types(p)
  errors = relative_errors(jax.device_get(jitted), jax.device_get(eager))
  # Adam's first step divides each gradient entry by its own magnitude: the
  # roundoff of entries near zero (eager and jit add in other orders) shows.
  assert max(errors.values()) < (2e-4 if curvature == "adam" else 1e-5), errors


@pytest.mark.slow
@pytest.mark.parametrize("kind,curvature", [("fne", "adam"), ("gr", "kfac")])
def test_explicit_mesh_with_kernels_on_a_model_axis(problem, kind, curvature):
  """A 4 x 2 (data, model) explicit mesh, every kernel split over the model axis."""
  game, params, batches = problem
  tx = make(kind, curvature, game)
  spec = jax.tree.map(lambda a: P(None, "model") if a.ndim == 2 else P(), params)
  p1, _ = train_on_one_device(tx, params, batches)
  p8, _, state_types = train_explicit(tx, params, batches,
                                      explicit_mesh((4, 2), ("data", "model")), spec)
  errors = relative_errors(p1, p8)
  assert max(errors.values()) < 1e-5, errors
  if curvature == "adam":  # the moments keep the types of the kernels they mirror
    assert state_types.curvature["dense_0"].mu["kernel"].sharding.spec == P(None, "model")


@pytest.mark.slow
def test_sharding_guide_explicit_snippet_trains_on_eight_devices():
  """docs/SHARDING.md's explicit-axes snippet runs after the recipe and trains."""
  import pathlib
  import re
  text = (pathlib.Path(__file__).resolve().parents[2] / "docs" / "SHARDING.md").read_text()
  recipe, explicit = re.findall(r"```python\n(.*?)```", text, re.S)[:2]
  scope = {}
  exec(compile(recipe + explicit, "SHARDING.md", "exec"), scope)
  params, game, data = scope["params"], scope["game"], scope["data"]
  assert int(scope["opt_state"].count) == 30
  logits = game.apply(jax.device_get(params), data.x_test)
  assert float(np.mean(np.argmax(logits, -1) == data.y_test)) > 0.85
