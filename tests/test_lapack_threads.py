"""limit_lapack_threads: the host BLAS/LAPACK pools (behind KFAC/EKFAC's eigh on a CPU)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import threadpoolctl

import dgnopt_jax as dgnopt


def _blas_threads() -> dict:
  return {i["filepath"]: i["num_threads"] for i in threadpoolctl.threadpool_info()
          if i["user_api"] == "blas"}


def test_limits_every_blas_pool_and_restores_them():
  jnp.linalg.eigh(jnp.eye(3)).eigenvalues.block_until_ready()  # jaxlib's LAPACK is loaded
  before = _blas_threads()
  assert before, "no BLAS library found to limit"
  with dgnopt.limit_lapack_threads(1):
    inside = _blas_threads()
    assert set(inside) >= set(before) and set(inside.values()) == {1}
    # The Kronecker curvatures' decomposition still runs and is right.
    m = np.random.default_rng(0).normal(size=(40, 40))
    m = m @ m.T
    w, u = jax.jit(jnp.linalg.eigh)(jnp.asarray(m, jnp.float32))
    np.testing.assert_allclose(np.asarray(u * w) @ np.asarray(u).T, m, rtol=1e-4, atol=1e-3)
  after = _blas_threads()
  assert {k: after[k] for k in before} == before


@pytest.mark.parametrize("threads", [0, -1, 1.5, "2"])
def test_rejects_a_thread_count_that_is_not_a_positive_integer(threads):
  with pytest.raises(ValueError, match="positive integer"):
    dgnopt.limit_lapack_threads(threads)
