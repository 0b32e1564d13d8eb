"""The host LAPACK's thread pool on the CPU backend (Kronecker curvatures' eigendecompositions).

KFAC and EKFAC refresh the eigendecompositions of their factors every
``inverse_every`` steps with ``jnp.linalg.eigh``, which XLA's CPU backend
runs as a call into the host LAPACK (the OpenBLAS that scipy ships, which
jaxlib's CPU kernels use). OpenBLAS keeps its worker threads spinning for a
while after each call; on a machine with few cores they hold the cores that
XLA's own thread pool needs for the rest of the step, which slows the
refresh step and the step after it (docs/PERFORMANCE.md, "Host LAPACK
threads"). The decompositions are small (factors of at most
``max_factor_size``), so one thread loses little.
"""

from __future__ import annotations

import importlib

import threadpoolctl


def limit_lapack_threads(threads: int = 1) -> threadpoolctl.threadpool_limits:
  """Limits the host BLAS/LAPACK thread pools (OpenBLAS, MKL, BLIS) to ``threads``.

  For KFAC/EKFAC on a CPU: call it once before training, or use it as a
  context manager around the training loop::

      with dgnopt.limit_lapack_threads():
        for x, y in batches:
          params, opt_state = train_step(params, opt_state, x, y)

  It changes a process-wide setting (numpy's BLAS too, while in force). On
  an accelerator backend the eigendecompositions do not run on the host,
  and the limit does not touch them.

  Args:
    threads: threads each BLAS library may use, at least 1.

  Returns:
    threadpoolctl's limiter: in force until ``restore_original_limits()`` is
    called or its ``with`` block ends.
  """
  if not isinstance(threads, int) or threads < 1:
    raise ValueError(f"threads must be a positive integer, got {threads!r}")
  # jaxlib's CPU LAPACK kernels call scipy's: load it, so that its pool is limited too.
  importlib.import_module("scipy.linalg")
  return threadpoolctl.threadpool_limits(limits=threads, user_api="blas")
