"""The coupling matvec formed from per-sample gradients, and the image patches behind it.

Where a conv player's per-sample gradients ``q_i`` are formed anyway (diagonal
curvatures when they are no larger than the image patches; Kronecker
curvatures), the convexity safeguard's ``v -> G v`` with
``G_ij = q_i^T M^-1 q_j`` is computed from them instead of a VJP and a JVP
of the stage. The independent computations: the stage's own VJP/JVP products
(the generic route), the dense reference solver, and ``lax.conv_general_dilated``.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import dgnopt_jax as dgnopt
from dgnopt_jax._src import layer_taps
from dgnopt_jax._src import linearise as lin
from dgnopt_jax._src import quadratic_forms
import helpers as h

G = dgnopt.games


@pytest.mark.parametrize("kernel_size,strides,padding,hw", [
    pytest.param((3, 3), (1, 1), "SAME", (8, 8), marks=pytest.mark.slow),
    ((3, 3), (2, 2), "SAME", (8, 8)),
    pytest.param((1, 1), (2, 2), "SAME", (7, 7), marks=pytest.mark.slow),
    pytest.param((3, 2), (1, 2), "VALID", (7, 9), marks=pytest.mark.slow),
    pytest.param((5, 5), (2, 1), "SAME", (9, 6), marks=pytest.mark.slow),
    ((3, 2), (1, 2), ((1, 2), (0, 1)), (7, 6))])
def test_image_patches_reproduce_the_convolution(kernel_size, strides, padding, hw):
  layer = G.Conv2D(5, kernel_size, strides, padding, activation=None)
  theta, _ = layer.init(jax.random.PRNGKey(0), hw + (3,), jnp.float64)
  x = jax.random.normal(jax.random.PRNGKey(1), (4,) + hw + (3,), jnp.float64)

  @jax.jit
  def both(theta, x):
    h_conv = jax.lax.conv_general_dilated(x, theta["kernel"], strides, padding,
                                          dimension_numbers=("NHWC", "HWIO", "NHWC"))
    a = layer_taps.kernel_rows(layer, x)
    h_rows = a @ theta["kernel"].reshape(-1, theta["kernel"].shape[-1])
    h_aug = (layer_taps.layer_inputs(layer, theta, x) @
             layer_taps.to_matrix(theta, layer.output_size))
    return h_conv, h_rows.reshape(h_conv.shape), h_aug.reshape(h_conv.shape)

  h_conv, h_rows, h_aug = both(theta, x)
  np.testing.assert_allclose(h_rows, h_conv, rtol=1e-12, atol=1e-12)
  np.testing.assert_allclose(h_aug, h_conv + theta["bias"], rtol=1e-12, atol=1e-12)


def _record_grams(monkeypatch):
  """Patches the safeguard to compare the given matvec with the stage's products.

  Both are applied to every basis vector inside the compiled step and the
  matrices are handed out through a host callback.
  """
  records = []
  original = lin.guarded_factor_update

  def checking(factor_next, q_x, s, pull, solve, push, iterations, gram=None, **kwargs):
    if gram is not None:
      batch, rank = s.shape[:2]
      basis = jnp.eye(batch * rank, dtype=s.dtype).reshape(-1, batch, rank)

      def generic(v):
        return lin.factor_transpose_apply(
            factor_next, push(solve(pull(lin.factor_apply(factor_next, v)))))

      jax.debug.callback(lambda *a: records.append(tuple(np.asarray(x) for x in a)),
                         jax.lax.map(gram, basis), jax.lax.map(generic, basis), s)
    return original(factor_next, q_x, s, pull, solve, push, iterations, gram, **kwargs)

  monkeypatch.setattr(lin, "guarded_factor_update", checking)
  return records


def _conv_net():
  return G.sequential([G.Conv2D(2, (3, 3)), G.Conv2D(3, (3, 3), strides=(2, 2)),
                       G.ResidualBlock(3, shortcut="identity"), G.AvgPool((2, 2)),
                       G.Dense(3)], (6, 6, 1))


@pytest.mark.parametrize("principle,curvature,lr", [
    pytest.param("fne", "identity", 3.0, marks=pytest.mark.slow),
    pytest.param("gr", "adam", 0.3, marks=pytest.mark.slow),
    pytest.param("fne", "kfac", 1.0, marks=pytest.mark.slow), ("gr", "ekfac", 1.0)])
def test_matvec_from_gradients_equals_the_stage_products(monkeypatch, principle, curvature, lr):
  records = _record_grams(monkeypatch)
  game = _conv_net()
  params = h.perturbed_params(game, scale=0.5)
  batch = h.classification_batch((6, 6, 1), 5)
  make = dgnopt.fne if principle == "fne" else dgnopt.gr
  tx = make(game, lr, curvature, vxx_reg=1e-3)
  jax.block_until_ready(jax.jit(lambda s, p, b: tx.update(None, s, p, batch=b))(
      tx.init(params), params, batch))
  jax.effects_barrier()
  # Both plain conv stages and both residual-block stages take the matvec.
  assert len(records) >= 4
  _assert_grams_match(records)


def _assert_grams_match(records):
  for gram, generic, s in records:
    np.testing.assert_allclose(gram, generic, rtol=1e-10, atol=1e-12 * np.abs(generic).max())
    # G's diagonal blocks are the per-sample forms S the factor update uses.
    batch, rank = s.shape[:2]
    full = gram.reshape(batch, rank, batch, rank)
    np.testing.assert_allclose(np.stack([full[i, :, i, :] for i in range(batch)]),
                               np.swapaxes(s, 1, 2), rtol=1e-10, atol=1e-12 * np.abs(s).max())


@pytest.mark.parametrize("principle,curvature", [("fne", "kfac"), ("gr", "ekfac")])
def test_dense_kronecker_matvec_equals_the_stage_products(monkeypatch, principle, curvature):
  # One-position dense players under a Kronecker curvature: G v from the
  # rotated rank-one factors (a~, g~) against the stage's VJP, the Kronecker
  # solve and the stage's JVP, on every basis vector.
  records = _record_grams(monkeypatch)
  game = h.tanh_mlp()
  params = h.perturbed_params(game, scale=1.0)
  batch = h.classification_batch((4,), 6)
  make = dgnopt.fne if principle == "fne" else dgnopt.gr
  tx = make(game, 2.0, curvature, damping=0.05)
  state = tx.init(params)
  step = jax.jit(lambda s, p, b: tx.update(None, s, p, batch=b))
  for _ in range(2):  # the second step with statistics and an eigenbasis of the first
    updates, state = step(state, params, batch)
    params = optax.apply_updates(params, updates)
  jax.block_until_ready(params)
  jax.effects_barrier()
  assert len(records) >= 2 * (len(game.stages) - 1)  # every stage but the last (no Z' there)
  _assert_grams_match(records)


@pytest.mark.slow
@pytest.mark.parametrize("principle", ["fne", "gr"])
def test_safeguard_on_convolutions_matches_reference(principle):
  # Large steps: lambda_max(G) > 1 at the conv stages, so the safeguard
  # iterates with the matvec from per-sample gradients; with enough
  # iterations it reaches the reference's dense eigensolve.
  game = h.relu_cnn()
  h.assert_safeguard_converges_to_reference(game, h.perturbed_params(game),
                                            h.classification_batch((4, 4, 1), 5), principle, 1, 80)


def test_the_gradient_route_is_taken_where_it_pays(monkeypatch):
  calls = []
  original = quadratic_forms.diagonal_layer
  monkeypatch.setattr(quadratic_forms, "diagonal_layer",
                      lambda *a: calls.append(a[1]) or original(*a))
  game = h.relu_cnn()  # two 3x3 convs of 2 maps on 4x4 (16 positions), two dense
  params = h.perturbed_params(game)
  batch = h.classification_batch((4, 4, 1), 5)
  h.step(dgnopt.fne(game, 0.3, "identity"), params, batch)
  assert len(calls) == 2  # the convolutions; dense layers keep their own route
  calls.clear()
  # With the exact value-Hessian factor (r = 3 columns) the gradients
  # (B, 3, K, 2) are no larger than the patches (B, 16, K): still taken.
  h.step(dgnopt.fne(game, 0.3, "identity", vxx_rank="exact"), params, batch)
  assert len(calls) == 2
  wide = G.sequential([G.Conv2D(20, (3, 3)), G.AvgPool((2, 2)), G.Dense(3)], (4, 4, 1))
  calls.clear()
  h.step(dgnopt.fne(wide, 0.3, "identity"), h.perturbed_params(wide), batch)
  assert calls == []  # 20 maps > 16 positions: the per-sample VJP route


@pytest.mark.parametrize("principle,curvature,lr", [
    ("fne", "identity", 0.5), pytest.param("gr", "adam", 0.05, marks=pytest.mark.slow),
    pytest.param("fne", "kfac", 0.1, marks=pytest.mark.slow),
    pytest.param("gr", "ekfac", 0.1, marks=pytest.mark.slow)])
def test_feedback_from_gradients_matches_reference(monkeypatch, principle, curvature, lr):
  # Without the V_xx Tikhonov term the conv players' value correction
  # Z'^T F_theta k and rollout feedback F_theta^T Z' c come from their
  # per-sample gradients (no JVP/VJP of the stage): two steps, statistics
  # carried, against the dense reference.
  pulled = []
  original = quadratic_forms.gradient_pullback
  monkeypatch.setattr(quadratic_forms, "gradient_pullback",
                      lambda *a: pulled.append(1) or original(*a))
  game = _conv_net()
  params = h.perturbed_params(game, scale=0.5)
  batch = h.classification_batch((6, 6, 1), 8)
  make = dgnopt.fne if principle == "fne" else dgnopt.gr
  tx = make(game, lr, curvature, damping=0.5 if "kfac" in curvature else None,
            coupling_iterations=100)  # the reference solves lambda_max(G) exactly
  h.assert_steps_match_reference(tx, game, params, batch, 2, learning_rate=lr,
                                 curvature=curvature, principle=principle,
                                 damping=0.5 if "kfac" in curvature else None)
  # Traced once: the second plain conv and both block convs (the first stage
  # starts on the nominal trajectory, dx = 0, and has no feedback to pull back).
  assert len(pulled) >= 3


@pytest.mark.parametrize("principle,curvature", [("fne", "kfac"), ("gr", "ekfac")])
def test_dense_kronecker_players_without_tikhonov_match_reference(monkeypatch, principle,
                                                                  curvature):
  # Dense players under a Kronecker curvature with vxx_reg = 0 and large
  # steps, so that the safeguard is active (lambda_max(G) > 1 at some stage):
  # two steps, statistics carried, against the dense reference.
  scales = h.record_reference_scales(monkeypatch)
  game = h.tanh_mlp()
  params = h.perturbed_params(game, scale=1.0)
  batch = h.classification_batch((4,), 6)
  make = dgnopt.fne if principle == "fne" else dgnopt.gr
  lr, damping = 2.0, 0.05
  tx = make(game, lr, curvature, damping=damping, coupling_iterations=200)
  h.assert_steps_match_reference(tx, game, params, batch, 2, learning_rate=lr,
                                 curvature=curvature, principle=principle, damping=damping)
  assert min(scales) < 0.9  # the safeguard shrank some stage's coupling


def _power_iteration(gram, start, iterations):
  v, largest = start / np.linalg.norm(start), 0.0
  for _ in range(iterations):
    gv = gram @ v
    largest, v = max(largest, v @ gv), gv / np.linalg.norm(gv)
  return largest


@pytest.mark.parametrize("traced", [False, True])
def test_lanczos_estimate_lies_between_the_power_iteration_and_lambda_max(traced):
  # A PSD "coupling matrix" with a slowly decaying spectrum (lambda_max = 3):
  # the Lanczos estimate never exceeds lambda_max, is at least the power
  # iteration's from the same start with as many products, and is exact once
  # the Krylov space is the whole space (its process stops there).
  rng = np.random.default_rng(0)
  basis = np.linalg.qr(rng.normal(size=(12, 12)))[0]
  eigenvalues = 3.0 * 0.85 ** np.arange(12)
  gram = (basis * eigenvalues) @ basis.T
  start = np.abs(rng.normal(size=(4, 3))) + 1e-3
  for iterations in (1, 2, 4, 8, 12, 30):
    count = jnp.asarray(iterations) if traced else iterations
    scale = float(jax.jit(lambda c: lin.coupling_scale(
        lambda v: (gram @ v.reshape(-1)).reshape(v.shape), jnp.asarray(start), None, c))(count)
        if traced else lin.coupling_scale(
            lambda v: (gram @ v.reshape(-1)).reshape(v.shape), jnp.asarray(start), None, count))
    estimate = 1.0 / scale
    assert estimate <= eigenvalues[0] * (1 + 1e-10)
    assert estimate >= _power_iteration(gram, start.reshape(-1), iterations) * (1 - 1e-10)
    if iterations >= 12:
      np.testing.assert_allclose(estimate, eigenvalues[0], rtol=1e-10)


def test_an_injected_count_above_the_lanczos_capacity_is_refused():
  game = h.tanh_mlp()
  too_many = jnp.asarray(lin.TRACED_COUNT_CAPACITY + 1)
  with pytest.raises(ValueError, match="coupling_iterations given as an array"):
    dgnopt.fne(game, 0.1, coupling_iterations=too_many)
