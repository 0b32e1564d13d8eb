"""Checkpoints of params and optimizer state (msgpack through ``flax.serialization``).

A checkpoint is one file holding any pytree of arrays and NamedTuples (the
params, the ``optax`` state with its ``DGNOptState`` and curvature statistics,
a step counter, a data-stream position). It is written to a temporary file
and renamed, so an interrupted save never leaves a truncated checkpoint, and
restored into a target pytree of the same structure (``tx.init(params)`` makes
one), which fixes the types and checks the shapes. Restored arrays are the
saved bits: a run restored at step k continues exactly as the uninterrupted run.
"""

from __future__ import annotations

import os
import tempfile
from typing import Any

import jax
import numpy as np


def _serialization():
  try:
    from flax import serialization  # pylint: disable=g-import-not-at-top
  except ImportError as e:  # a dependency of dgnopt-jax, missing from a broken install
    raise ImportError(
        "checkpoints need flax, a dependency of dgnopt-jax that is not installed: "
        "pip install 'flax>=0.10' (or reinstall dgnopt-jax)") from e
  return serialization


def save(path: str | os.PathLike, tree: Any) -> None:
  """Writes ``tree`` to ``path`` atomically.

  Args:
    path: the checkpoint file.
    tree: a pytree of arrays, scalars, dicts, lists, tuples and NamedTuples.
  """
  data = _serialization().to_bytes(jax.device_get(tree))
  folder = os.path.dirname(os.path.abspath(path))
  os.makedirs(folder, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=folder, prefix=".checkpoint-")
  try:
    with os.fdopen(fd, "wb") as f:
      f.write(data)
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def restore(path: str | os.PathLike, target: Any) -> Any:
  """Reads the checkpoint at ``path`` into the structure of ``target``.

  Args:
    path: a file written by :func:`save`.
    target: a pytree with the saved structure (e.g. ``(params, tx.init(params))``).

  Returns:
    The saved pytree with ``target``'s types.

  Raises:
    FileNotFoundError: no checkpoint at ``path``.
    ValueError: the checkpoint does not fit ``target`` (structure or a leaf's shape).
  """
  with open(path, "rb") as f:
    data = f.read()
  try:
    restored = _serialization().from_bytes(target, data)
  except (ValueError, KeyError, TypeError) as e:
    raise ValueError(f"checkpoint {str(path)!r} does not fit the target: {e}") from e
  for (keypath, want), got in zip(jax.tree_util.tree_leaves_with_path(target),
                                  jax.tree.leaves(restored)):
    if np.shape(want) != np.shape(got):
      raise ValueError(
          f"checkpoint {str(path)!r} does not fit the target at "
          f"{jax.tree_util.keystr(keypath)}: saved shape {np.shape(got)}, "
          f"target shape {np.shape(want)}")
  return restored
