"""symmetric_eigh: numpy's eigendecomposition, and no batched host call a small thread pool can wedge on."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import dgnopt_jax as dgnopt
import helpers as h
from dgnopt_jax._src.symmetric_eigh import symmetric_eigh


def _symmetric(shape, seed=0):
  m = np.random.default_rng(seed).normal(size=shape)
  return m + np.swapaxes(m, -1, -2)


def _check_against_numpy(matrices, w, u):
  want = np.linalg.eigvalsh(matrices)
  np.testing.assert_allclose(w, want, rtol=1e-10, atol=1e-10)
  rebuilt = np.einsum("...ij,...j,...kj->...ik", u, w, u)
  np.testing.assert_allclose(rebuilt, matrices, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("batching", ["none", "leading_axes", "vmap", "vmap_of_vmap"])
def test_matches_numpy(batching):
  shape = {"none": (5, 5)}.get(batching, (3, 4, 5, 5))
  m = jnp.asarray(_symmetric(shape))
  decompose = {"none": symmetric_eigh, "leading_axes": symmetric_eigh,
               "vmap": jax.vmap(symmetric_eigh),
               "vmap_of_vmap": jax.vmap(jax.vmap(symmetric_eigh))}[batching]
  w, u = jax.jit(decompose)(m)
  assert w.shape == shape[:-1] and u.shape == shape
  _check_against_numpy(np.asarray(m), np.asarray(w), np.asarray(u))


def _eigh_operands(lowered_text: str) -> list[str]:
  return re.findall(r"@lapack_[sd]syevd_ffi\(%[\w#]+\)[^\n]*?: \((tensor<[^>]*>)", lowered_text)


def _vmapped_kfac_steps(solver):
  """Two runs side by side of a network whose three equal layers are one scanned segment."""
  game = h.tanh_mlp(widths=(4, 4, 4, 4))
  params = [h.perturbed_params(game, seed) for seed in (0, 1)]
  batch = h.classification_batch((4,), 8)
  tx = solver(game, 0.1, "kfac")

  def run(p):
    def step(carry, _):
      p, s = carry
      updates, s = tx.update(None, s, p, batch=batch)
      return (optax.apply_updates(p, updates), s), None
    return jax.lax.scan(step, (p, tx.init(p)), None, length=3)[0][0]

  stacked = jax.tree.map(lambda *a: jnp.stack(a), *params)
  return jax.jit(jax.vmap(run)), jax.jit(run), stacked, params


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the host LAPACK's batching, on a CPU")
@pytest.mark.parametrize("solver", [dgnopt.olne, dgnopt.fne])
def test_vmapped_kfac_steps_decompose_one_matrix_per_call(solver):
  """Batched host eigh calls that run at once can take every pool worker and wait forever.

  Under a vmap over runs (and the scan over stacked players) every
  eigendecomposition in the compiled program is one matrix per call, and
  the runs side by side give what each run gives alone.
  """
  vmapped, single, stacked, params = _vmapped_kfac_steps(solver)
  operands = _eigh_operands(vmapped.lower(stacked).as_text())
  assert operands, "the program decomposes the Kronecker factors"
  batched = [t for t in operands if t.count("x") != 2]
  assert not batched, f"batched eigh calls in the program: {batched}"
  together = vmapped(stacked)
  for n, p in enumerate(params):
    h.assert_trees_close(jax.tree.map(lambda l: l[n], together), single(p), 1e-9)
