"""The convexity safeguard's certificate for rank-one players: ``lambda_max(c G) <= 1`` from a, g, D.

``quadratic_forms.rank_one_convexity_test`` certifies the convexity of a
dense player's stage from its layer inputs ``a``, its output derivatives
``g`` and a diagonal inverse curvature ``D`` (in the Kronecker eigenbasis for
KFAC/EKFAC), without the Lanczos process. The independent computation: the
coupling matrix ``G_ir,js = q_ir^T diag(D) q_js`` from per-sample gradients
``q_ir = a_i (x) g_ir`` formed densely in float64, and its eigenvalues.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dgnopt_jax as dgnopt
from dgnopt_jax._src import linearise as lin
from dgnopt_jax._src import quadratic_forms
import helpers as h


def _problem(seed, batch=7, ka=4, rank=2, out=3, constant=False):
  rng = np.random.default_rng(seed)
  a = rng.standard_normal((batch, ka))
  a[:, -1] = 1.0  # a bias row
  g = rng.standard_normal((batch, rank, out))
  d = np.full((ka, out), 0.7) if constant else rng.uniform(0.05, 2.0, (ka, out))
  return a, g, d


def _coupling_eigenvalue(a, g, d):
  """lambda_max(G) with G from the per-sample gradients a_i (x) g_ir, densely."""
  q = np.einsum("bk,bro->brko", a, g).reshape(a.shape[0] * g.shape[1], -1)
  return np.linalg.eigvalsh((q * d.reshape(-1)) @ q.T)[-1]


def _certifies(a, g, d, scale):
  test = quadratic_forms.rank_one_convexity_test(jnp.asarray(a), jnp.asarray(g), jnp.asarray(d))
  return bool(jax.jit(test.certifies)(jnp.asarray(scale)))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_certifies_only_convex_scales(seed):
  a, g, d = _problem(seed)
  lam = _coupling_eigenvalue(a, g, d)
  scales = np.geomspace(0.05, 2.0, 60) / lam
  test = quadratic_forms.rank_one_convexity_test(jnp.asarray(a), jnp.asarray(g), jnp.asarray(d))
  certified = [bool(x) for x in jax.jit(jax.vmap(test.certifies))(jnp.asarray(scales))]
  for c, ok in zip(scales, certified):
    assert not ok or c * lam <= 1.0, (c * lam, ok)
  # Not vacuous: small enough scales are certified, and never past lambda_max.
  assert certified[0] and not certified[-1]


@pytest.mark.parametrize("batch", [7, 1])
def test_exact_for_a_constant_curvature(batch):
  # D = const (the identity curvature): the majorant is G itself.
  a, g, d = _problem(3, batch=batch, constant=True)
  lam = _coupling_eigenvalue(a, g, d)
  assert _certifies(a, g, d, (1 - 1e-6) / lam)
  assert not _certifies(a, g, d, (1 + 1e-6) / lam)


def test_inputs_no_sample_uses_do_not_count():
  # A row of D that no sample's input uses (a dead input feature) does not
  # enter G, however large: the certificate is the one without that row.
  a, g, d = _problem(4, constant=True)
  lam = _coupling_eigenvalue(a, g, d)
  dead_a = np.concatenate([a, np.zeros((a.shape[0], 1))], axis=1)
  dead_d = np.concatenate([d, np.full((1, d.shape[1]), 1e6)], axis=0)
  assert _coupling_eigenvalue(dead_a, g, dead_d) == pytest.approx(lam, rel=1e-12)
  assert _certifies(dead_a, g, dead_d, (1 - 1e-6) / lam)
  assert not _certifies(dead_a, g, dead_d, (1 + 1e-6) / lam)


def test_coupling_scale_takes_the_certificate_before_lanczos():
  rng = np.random.default_rng(5)
  q = rng.standard_normal((6, 6))
  big = jnp.asarray(4.0 * q @ q.T / np.linalg.eigvalsh(q @ q.T)[-1])  # lambda_max 4
  gram = lambda v: big @ v
  start = jnp.ones(6)
  trace = jnp.trace(big)
  plain = lin.coupling_scale(gram, start, trace, 6, unroll=True)
  np.testing.assert_allclose(plain, 0.25, rtol=1e-8)
  certified = lin.coupling_scale(gram, start, trace, 6, unroll=True,
                                 certified=lambda: jnp.asarray(True))
  assert float(certified) == 1.0
  refused = lin.coupling_scale(gram, start, trace, 6, unroll=True,
                               certified=lambda: jnp.asarray(False))
  assert float(refused) == float(plain)


@pytest.mark.parametrize("curvature,lr,holds", [("adam", 0.03, True), ("kfac", 0.3, False)])
def test_steps_equal_without_the_certificate(monkeypatch, curvature, lr, holds):
  # The same fne steps with the certificate priced out (the Lanczos process
  # decides every stage whose trace exceeds 1): the certificate only skips
  # work whose outcome is w = 1. Adam at this rate has stages where it holds
  # and stages where it does not; KFAC's (through the Kronecker forms) never
  # holds here.
  game = h.tanh_mlp((16, 16, 16))
  params = h.perturbed_params(game, scale=1.0)
  batch = h.classification_batch((4,), 24)
  calls = []
  original = quadratic_forms.rank_one_convexity_test

  def recording(a, g, d):
    test = original(a, g, d)

    def certifies(c):
      out = test.certifies(c)
      jax.debug.callback(lambda ok: calls.append(bool(ok)), out)
      return out

    return test._replace(certifies=certifies)

  def run(test_factory):
    monkeypatch.setattr(quadratic_forms, "rank_one_convexity_test", test_factory)
    tx = dgnopt.fne(game, lr, curvature, damping=0.05)
    state, p, out = tx.init(params), params, []
    step = jax.jit(lambda s, p, b: tx.update(None, s, p, batch=b))
    for _ in range(3):
      updates, state = step(state, p, batch)
      p = jax.tree.map(jnp.add, p, updates)
      out.append(updates)
    jax.block_until_ready(p)
    jax.effects_barrier()
    return out

  with_test = run(recording)
  assert calls and any(calls) == holds and not all(calls), calls
  priced_out = run(lambda a, g, d: original(a, g, d)._replace(products=float("inf")))
  for u, v in zip(with_test, priced_out):
    h.assert_trees_close(u, v, 1e-12)
