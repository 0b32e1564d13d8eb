"""Data-parallel steps on 8 devices equal the single-device steps.

Run on 8 CPU devices by ``tests/test_multidevice.py`` in a subprocess with
``XLA_FLAGS=--xla_force_host_platform_device_count=8``; skipped when fewer
than 8 devices are present (e.g. when collected by the default run).
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import dgnopt_jax as dgnopt
from dgnopt_jax import sharding

G = dgnopt.games

pytestmark = pytest.mark.skipif(
    jax.device_count() < 8, reason="needs 8 devices (run through tests/test_multidevice.py)")

STEPS = 5  # as the shared problem (conftest.py)
BATCH = 64
OPTIMIZERS = {
    "fne-sgd": lambda g: dgnopt.fne(g, 0.1, "identity", vxx_reg=1e-4),
    "fne-adam": lambda g: dgnopt.fne(g, 1e-3, "adam", vxx_reg=1e-4),
    "fne-kfac": lambda g: dgnopt.fne(g, 0.05, "kfac", vxx_reg=1e-4),
    "gr-sgd": lambda g: dgnopt.gr(g, 0.1, "identity", vxx_reg=1e-4),
    "gr-adam": lambda g: dgnopt.gr(g, 1e-3, "adam", vxx_reg=1e-4),
    "gr-kfac": lambda g: dgnopt.gr(g, 0.05, "kfac", vxx_reg=1e-4),
}


def train(tx, params, batches, mesh, params_shardings=None):
  """``STEPS`` jit-compiled steps with explicit in/out shardings on ``mesh``."""
  p_sh = params_shardings or sharding.params_sharding(params, mesh)
  s_sh = sharding.state_sharding(tx.init, params, p_sh, mesh)
  b_sh = sharding.batch_sharding(mesh)

  def step(p, s, x, y):
    updates, s = tx.update(None, s, p, batch=(x, y))
    return optax.apply_updates(p, updates), s

  step = jax.jit(step, in_shardings=(p_sh, s_sh, b_sh, b_sh), out_shardings=(p_sh, s_sh))
  p = jax.device_put(params, p_sh)
  s = jax.jit(tx.init, out_shardings=s_sh)(p)
  for x, y in batches:
    p, s = step(p, s, *sharding.shard_batch((x, y), mesh))
  assert step._cache_size() == 1  # no retrace or recompile: shardings are stable
  return jax.device_get(p), jax.device_get(s), (p, s, p_sh, s_sh)


def relative_errors(a, b, skip=("basis", "eigen")):
  errors = {}
  for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)):
    name = jax.tree_util.keystr(path)
    if any(k in name for k in skip):  # eigenvectors are defined up to sign
      continue
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    errors[name] = float(np.linalg.norm(x - y) / max(np.linalg.norm(x), 1e-30))
  return errors


# Each principle and each curvature by default; all six with -m slow.
DEFAULT_RUN = ("fne-sgd", "gr-adam", "gr-kfac")


@pytest.mark.parametrize("name", [n if n in DEFAULT_RUN else pytest.param(n, marks=pytest.mark.slow)
                                  for n in sorted(OPTIMIZERS)])
def test_eight_devices_equal_one(problem, name):
  game, params, batches = problem
  tx = OPTIMIZERS[name](game)
  one = sharding.make_mesh(jax.devices()[:1])
  eight = sharding.make_mesh(jax.devices()[:8])
  p1, s1, _ = train(tx, params, batches, one)
  p8, s8, (_, _, p_sh, _) = train(tx, params, batches, eight)
  assert int(s8.count) == STEPS and int(s8.skipped) == 0
  moved = relative_errors(params, p1)
  assert min(moved.values()) > 1e-4, "the steps must move every leaf"
  errors = relative_errors(p1, p8)
  assert max(errors.values()) < 1e-5, errors
  state_errors = relative_errors(s1, s8)  # counts, Kronecker factors, Adam moments
  assert max(state_errors.values()) < 1e-5, state_errors
  for leaf in jax.tree.leaves(p_sh):
    assert leaf.spec == jax.sharding.PartitionSpec()


@pytest.mark.slow
@pytest.mark.parametrize("name", ["fne-adam", "gr-kfac"])
def test_model_sharded_kernels_equal_one_device(problem, name):
  """Kernels split over a model axis (4 x 2 mesh); state mirroring them split alike."""
  game, params, batches = problem
  tx = OPTIMIZERS[name](game)
  mesh = sharding.make_mesh(jax.devices()[:8], model=2)
  p_sh = sharding.params_sharding(params, mesh, model_axis="model", min_size=0)
  assert p_sh["dense_0"]["kernel"].spec == jax.sharding.PartitionSpec(None, "model")
  p1, _, _ = train(tx, params, batches, sharding.make_mesh(jax.devices()[:1]))
  p8, _, (p, s, _, s_sh) = train(tx, params, batches, mesh, p_sh)
  errors = relative_errors(p1, p8)
  assert max(errors.values()) < 1e-5, errors
  assert p["dense_0"]["kernel"].sharding.spec == jax.sharding.PartitionSpec(None, "model")
  if name == "fne-adam":
    mu = s.curvature["dense_0"].mu["kernel"]
    assert mu.sharding.is_equivalent_to(p_sh["dense_0"]["kernel"], mu.ndim)
  else:
    factor = s.curvature["dense_0"].input_cov
    assert factor.sharding.is_fully_replicated
  for leaf, want in zip(jax.tree.leaves(s), jax.tree.leaves(s_sh)):
    assert leaf.sharding.is_equivalent_to(want, leaf.ndim)


@pytest.mark.parametrize("name", ["fne-adam", pytest.param("gr-kfac", marks=pytest.mark.slow)])
def test_abstract_init_and_ahead_of_time_step(problem, name):
  """Init on ShapeDtypeStructs; the compiled step's outputs keep the inputs' shardings."""
  game, params, batches = problem
  tx = OPTIMIZERS[name](game)
  mesh = sharding.make_mesh(jax.devices()[:8], model=2)
  abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), params)
  p_sh = sharding.params_sharding(abstract, mesh, model_axis="model", min_size=0)
  abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          abstract, p_sh)
  # init straight on ShapeDtypeStructs, abstractly and concretely
  concrete = jax.tree.map(lambda a: (a.shape, a.dtype), tx.init(params))
  assert jax.tree.map(lambda a: (a.shape, a.dtype), jax.eval_shape(tx.init, abstract)) == concrete
  assert jax.tree.map(lambda a: (a.shape, a.dtype), tx.init(abstract)) == concrete
  s_sh = sharding.state_sharding(tx.init, abstract, p_sh, mesh)
  abstract_state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                                jax.eval_shape(tx.init, abstract), s_sh)
  b_sh = sharding.batch_sharding(mesh)
  x, y = batches[0]
  abstract_batch = (jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=b_sh),
                    jax.ShapeDtypeStruct(y.shape, y.dtype, sharding=b_sh))

  def step(p, s, x, y):
    updates, s = tx.update(None, s, p, batch=(x, y))
    return optax.apply_updates(p, updates), s

  # in_shardings come from the ShapeDtypeStructs; without out_shardings XLA
  # would be free to return, e.g., a bias split over the model axis
  compiled = jax.jit(step, out_shardings=(p_sh, s_sh), donate_argnums=(0, 1)).lower(
      abstract, abstract_state, *abstract_batch).compile()
  in_p, in_s, _, _ = compiled.input_shardings[0]
  out_p, out_s = compiled.output_shardings
  for got, want in zip(jax.tree.leaves((out_p, out_s)), jax.tree.leaves((in_p, in_s))):
    assert got.is_equivalent_to(want, 2), (got, want)
  for got, want in zip(jax.tree.leaves((in_p, in_s)), jax.tree.leaves((p_sh, s_sh))):
    assert got.is_equivalent_to(want, 2), (got, want)
  # the compiled executable accepts only its input shardings: feeding its
  # outputs back for several steps shows nothing is resharded between steps
  p = jax.device_put(jax.tree.map(np.array, params), p_sh)  # fresh buffers: donated
  s = jax.jit(tx.init, out_shardings=s_sh)(p)
  for xb, yb in batches:
    p, s = compiled(p, s, *sharding.shard_batch((xb, yb), mesh))
  assert int(s.count) == len(batches)
  assert all(np.all(np.isfinite(np.asarray(l))) for l in jax.tree.leaves(p))


def test_shard_batch_rejects_indivisible_batch():
  mesh = sharding.make_mesh(jax.devices()[:8])
  with pytest.raises(ValueError, match="not divisible"):
    sharding.shard_batch(np.zeros((12, 3), np.float32), mesh)
  with pytest.raises(ValueError, match="must divide"):
    sharding.make_mesh(jax.devices()[:8], model=3)


def test_sharding_guide_snippet_trains_on_eight_devices():
  """docs/SHARDING.md's recipe runs as written and trains."""
  import pathlib
  import re
  text = (pathlib.Path(__file__).resolve().parents[2] / "docs" / "SHARDING.md").read_text()
  code = re.findall(r"```python\n(.*?)```", text, re.S)[0]
  scope = {}
  exec(compile(code, "SHARDING.md", "exec"), scope)
  params, game, data = scope["params"], scope["game"], scope["data"]
  assert scope["mesh"].shape["data"] == 8
  assert params["dense_0"]["kernel"].sharding.is_fully_replicated
  assert int(scope["opt_state"].count) == 30
  logits = game.apply(jax.device_get(params), data.x_test)
  assert float(np.mean(np.argmax(logits, -1) == data.y_test)) > 0.85


def _conv_game():
  """Conv players with a layer (taps route) and one without (generic route)."""
  def custom_conv(x, th):
    return jax.nn.relu(jax.lax.conv_general_dilated(
        x, th[0]["w"], (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")))

  layers_before = [G.Conv2D(6, (3, 3)), G.ResidualBlock(6, shortcut="identity"),
                   G.ResidualBlock(8, shortcut="projection")]
  head = G.sequential([G.AvgPool((2, 2)), G.Dense(10)], (8, 8, 8), dtype=jnp.float64)
  body = G.sequential(layers_before, (8, 8, 1), dtype=jnp.float64)
  custom = G.stage(custom_conv, ["custom"])
  game = G.Game(body.stages + (custom,) + head.stages, "softmax_cross_entropy")
  key = jax.random.PRNGKey(1)
  params = {**body.init(key), **head.init(key),
            "custom": {"w": 0.2 * jax.random.normal(key, (3, 3, 8, 8), jnp.float64)}}
  return game, params


@pytest.mark.parametrize("curvature,lr", [("identity", 0.1),
                                          pytest.param("adam", 1e-3, marks=pytest.mark.slow)])
def test_conv_fne_on_eight_devices_equals_single_device_route(problem, monkeypatch, curvature,
                                                               lr):
  """Per-sample conv terms: partition-safe forms on 8 devices == vmap forms on 1 (float64)."""
  from dgnopt_jax._src import linearise
  game, params = _conv_game()
  _, _, batches = problem
  batches = [(x.reshape(-1, 8, 8, 1).astype(np.float64), y) for x, y in batches[:2]]
  tx = dgnopt.fne(game, lr, curvature, vxx_reg=1e-4)
  p8, _, _ = train(tx, params, batches, sharding.make_mesh(jax.devices()[:8]))
  monkeypatch.setattr(linearise, "partition_safe", lambda: False)  # the 1-device program
  tx = dgnopt.fne(game, lr, curvature, vxx_reg=1e-4)
  p1, _, _ = train(tx, params, batches, sharding.make_mesh(jax.devices()[:1]))
  assert min(relative_errors(params, p1).values()) > 1e-6
  errors = relative_errors(p1, p8)
  assert max(errors.values()) < 1e-10, errors
