"""Eigendecompositions of symmetric matrices that never run as one batched host call.

On the CPU backend ``jnp.linalg.eigh`` of a batch of matrices (explicit
leading axes, or ``vmap``: stacked players of a scanned segment, several
training runs side by side) is one call into jaxlib's LAPACK kernel, which
splits the batch into tasks on XLA's intra-op thread pool and blocks the
pool worker it runs on until they finish. Two such calls that XLA schedules
at the same time (KFAC refreshes its input and output factors together) can
take every worker of a small pool, and then nothing is left to run their
tasks: the program waits forever. A 2-core machine meets this within a few
steps of a vmapped K-FAC run.

:func:`symmetric_eigh` therefore decomposes a batch on the CPU one matrix
at a time, in a loop (``lax.map``) whose body is an unbatched call; each
call runs LAPACK on the worker that issued it and waits for nothing. On
other backends a batch stays one batched call (a GPU's batched solver has
no such pool). A ``custom_vmap`` rule applies the choice at every level of
batching, so user ``vmap`` over a training step gets it too.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


@jax.custom_batching.custom_vmap
def _eigh(matrix: jax.Array) -> tuple[jax.Array, jax.Array]:
  eigenvalues, eigenvectors = jnp.linalg.eigh(matrix)
  return eigenvalues, eigenvectors


@_eigh.def_vmap
def _eigh_batched(axis_size: int, in_batched: list, matrix: jax.Array):
  del axis_size
  (batched,) = in_batched
  if not batched:
    return _eigh(matrix), (False, False)

  def one_at_a_time(matrices):
    # The loop body is _eigh itself: an enclosing vmap reaches this rule again.
    return jax.lax.map(_eigh, matrices)

  def all_at_once(matrices):
    return tuple(jax.vmap(jnp.linalg.eigh)(matrices))

  result = jax.lax.platform_dependent(matrix, cpu=one_at_a_time, default=all_at_once)
  return tuple(result), (True, True)


def symmetric_eigh(matrix: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Eigenvalues (ascending) and eigenvectors of symmetric matrices.

  The same result as ``jnp.linalg.eigh`` (which symmetrises its input),
  computed without batched host calls on the CPU (see the module docstring).

  Args:
    matrix: ``(..., n, n)`` symmetric matrices.

  Returns:
    ``(w, u)``: ``w`` of shape ``(..., n)`` and ``u`` of shape ``(..., n, n)``
    with ``matrix = u @ diag(w) @ u^T``.
  """
  decompose = _eigh
  for _ in range(matrix.ndim - 2):
    decompose = jax.vmap(decompose)
  return decompose(matrix)
