"""Checkpoints of params and optimizer state: one msgpack file, checked on every restore.

A checkpoint is one file holding any pytree of arrays and NamedTuples (the
params, the ``optax`` state with its ``DGNOptState`` and curvature statistics,
a step counter, a data-stream position):

* **format**: a header (``MAGIC``, then the SHA-256 of the payload) and the
  payload, the tree's state dict in msgpack (``flax.serialization``). Arrays
  are raw bytes with their shape and dtype name; reading one never
  unpickles anything (object dtypes cannot be read back at all).
* **writing** is atomic: the bytes go to a temporary file beside the
  checkpoint, which is flushed to disk (``fsync``) and renamed over the
  checkpoint, and the folder is synced so that the rename itself survives
  a crash. A failed save removes its temporary file; the temporary file a
  killed process left behind is removed by the next save to the same path.
* **restoring** into a target pytree (``tx.init(params)`` makes one) checks
  the checksum (a truncated or corrupted file is refused), then the
  structure (every key and field, nothing missing and nothing extra), every
  array's shape and dtype and every other leaf's type, and fails naming
  the first mismatch. Restored arrays are the saved bits: a run restored
  at step k continues exactly as the uninterrupted run.

Orbax (``orbax-checkpoint``) writes a directory per checkpoint, asynchronously,
and restores what the target's shapes say; one synchronous file with a
checksum and a strict comparison is what resuming a run on one host needs.
"""

from __future__ import annotations

import glob
import hashlib
import os
from typing import Any

import jax

from dgnopt_jax._src import guards

MAGIC = b"DGNOPT-CHECKPOINT-1\n"
_DIGEST = 32  # SHA-256


def _serialization():
  try:
    from flax import serialization  # pylint: disable=g-import-not-at-top
  except ImportError as e:  # a dependency of dgnopt-jax, missing from a broken install
    raise ImportError(
        "checkpoints need flax, a dependency of dgnopt-jax that is not installed: "
        "pip install 'flax>=0.10' (or reinstall dgnopt-jax)") from e
  return serialization


def _temporary(path: str, pid: int) -> str:
  folder, name = os.path.split(path)
  return os.path.join(folder, f".{name}.tmp-{pid}")


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # another user's live process
    return True
  return True


def _remove_stale_temporaries(path: str) -> None:
  """Removes the temporary files that killed saves to ``path`` left behind."""
  folder, name = os.path.split(path)
  for tmp in glob.glob(glob.escape(os.path.join(folder, f".{name}.tmp-")) + "*"):
    pid = tmp.rsplit("-", 1)[-1]
    if pid.isdigit() and (int(pid) == os.getpid() or not _alive(int(pid))):
      try:
        os.remove(tmp)
      except FileNotFoundError:
        pass


def _sync_folder(folder: str) -> None:
  try:
    fd = os.open(folder, os.O_RDONLY)
  except OSError:  # a platform without folder descriptors
    return
  try:
    os.fsync(fd)
  except OSError:
    pass
  finally:
    os.close(fd)


def atomic_write(path: str | os.PathLike, data: bytes) -> None:
  """Writes ``data`` to ``path`` so that ``path`` holds either its old or its new bytes.

  A temporary file beside ``path`` is written, flushed to disk and renamed
  over ``path``, and the folder is synced; a failure removes the temporary
  file, and a killed process's temporary file is removed by the next write
  to the same path.

  Args:
    path: the file (its folder is created).
    data: its new contents.
  """
  path = os.path.abspath(os.fspath(path))
  folder = os.path.dirname(path)
  os.makedirs(folder, exist_ok=True)
  _remove_stale_temporaries(path)
  tmp = _temporary(path, os.getpid())
  try:
    with open(tmp, "wb") as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise
  _sync_folder(folder)


def save(path: str | os.PathLike, tree: Any) -> None:
  """Writes ``tree`` to ``path`` atomically (:func:`atomic_write`), with a checksum.

  Args:
    path: the checkpoint file (its folder is created).
    tree: a pytree of arrays, scalars, dicts, lists, tuples and NamedTuples.
  """
  payload = _serialization().to_bytes(jax.device_get(tree))
  atomic_write(path, MAGIC + hashlib.sha256(payload).digest() + payload)


def _payload(path: str, data: bytes) -> bytes:
  if not data.startswith(MAGIC):
    raise ValueError(
        f"{path!r} is not a dgnopt_jax checkpoint (no {MAGIC.strip().decode()} header): "
        "it was not written by dgnopt_jax.checkpoint.save, or its start is corrupted")
  digest, payload = data[len(MAGIC):len(MAGIC) + _DIGEST], data[len(MAGIC) + _DIGEST:]
  if len(digest) != _DIGEST or hashlib.sha256(payload).digest() != digest:
    raise ValueError(
        f"checkpoint {path!r} is corrupted: its checksum does not match its contents "
        "(a truncated or damaged file); restore an earlier checkpoint")
  return payload


def restore(path: str | os.PathLike, target: Any) -> Any:
  """Reads the checkpoint at ``path`` into the structure of ``target``.

  Args:
    path: a file written by :func:`save`.
    target: a pytree with the saved structure, shapes and dtypes (e.g.
      ``{"params": params, "opt_state": tx.init(params)}``); its leaves'
      values are not used.

  Returns:
    The saved pytree with ``target``'s container types (arrays as numpy
    arrays).

  Raises:
    FileNotFoundError: no checkpoint at ``path``.
    ValueError: the file is not a checkpoint or is corrupted (checksum), or
      it does not fit ``target``: a key or field missing or extra, a
      container of another kind, an array of another shape or dtype, or a
      leaf of another type; the message names the first one.
  """
  path = os.fspath(path)
  with open(path, "rb") as f:
    data = f.read()
  serialization = _serialization()
  payload = _payload(path, data)
  try:
    saved = serialization.msgpack_restore(payload)
  except Exception as e:  # msgpack's or numpy's errors on a payload it did not write
    raise ValueError(f"checkpoint {path!r} cannot be read: {e}") from e
  found = guards.first_mismatch(serialization.to_state_dict(target), saved,
                                names=("the target", "the checkpoint"))
  if found:
    raise ValueError(f"checkpoint {path!r} does not fit the target {found}")
  return serialization.from_state_dict(target, saved)
