"""Checkpoints: restore checks structure, shapes, dtypes, leaf types; checksums; atomic writes."""

import hashlib
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import msgpack
import numpy as np
import pytest

import dgnopt_jax as dgnopt
from dgnopt_jax._src import checkpoint as checkpoint_lib
import helpers as h

G = dgnopt.games
save, restore = dgnopt.checkpoint.save, dgnopt.checkpoint.restore


def test_float64_arrays_do_not_restore_into_a_float32_target(tmp_path):
  # Was: restored, the dtype silently changed to float64.
  path = tmp_path / "c.msgpack"
  save(path, {"w": np.ones((2, 3), np.float64)})
  with pytest.raises(ValueError, match=r"at \['w'\]: the target has float32\[2,3\], the "
                     r"checkpoint has float64\[2,3\]"):
    restore(path, {"w": jnp.zeros((2, 3), jnp.float32)})
  got = restore(path, {"w": jax.ShapeDtypeStruct((2, 3), jnp.float64)})
  np.testing.assert_array_equal(got["w"], np.ones((2, 3)))


def test_a_string_does_not_restore_at_a_scalar_leaf(tmp_path):
  # Was: the string restored in the scalar's place.
  path = tmp_path / "c.msgpack"
  save(path, {"step": "ten", "x": np.zeros(2)})
  for target, what in (({"step": 0, "x": np.zeros(2)}, "Python int"),
                       ({"step": jnp.zeros([], jnp.int32), "x": np.zeros(2)}, r"int32\[\]")):
    with pytest.raises(ValueError, match=rf"at \['step'\]: the target has {what}, the "
                       "checkpoint has str 'ten'"):
      restore(path, target)


def test_a_deeper_network_does_not_restore_into_a_shallower_target(tmp_path):
  # Was: the extra layer silently dropped.
  deep, shallow = h.tanh_mlp(widths=(5, 5)), h.tanh_mlp(widths=(5,))
  path = tmp_path / "c.msgpack"
  save(path, h.perturbed_params(deep))
  with pytest.raises(ValueError, match=r"at the root: the checkpoint has keys \['dense_2'\] "
                     "that the target lacks"):
    restore(path, h.perturbed_params(shallow))
  save(path, h.perturbed_params(shallow))
  with pytest.raises(ValueError, match=r"the checkpoint lacks keys \['dense_2'\]"):
    restore(path, h.perturbed_params(deep))


def test_another_curvatures_state_does_not_restore(tmp_path):
  game = h.tanh_mlp()
  params = h.perturbed_params(game)
  path = tmp_path / "c.msgpack"
  save(path, dgnopt.fne(game, 0.1, "adam").init(params))
  with pytest.raises(ValueError, match=r"\['curvature'\]\['dense_0'\]: the checkpoint lacks "
                     r"keys \['eigenbasis_moments'.*has keys \['mu', 'nu'\]"):
    restore(path, dgnopt.fne(game, 0.1, "kfac").init(params))


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_a_corrupted_file_is_refused(tmp_path, damage):
  path = tmp_path / "c.msgpack"
  target = {"w": np.arange(100.0)}
  save(path, target)
  data = bytearray(path.read_bytes())
  if damage == "truncate":
    data = data[:-7]
  else:
    data[-20] ^= 0x10  # one bit of an array
  path.write_bytes(bytes(data))
  with pytest.raises(ValueError, match="is corrupted: its checksum does not match"):
    restore(path, target)
  path.write_bytes(b"\x81\xa1w\x01")  # valid msgpack, but no header
  with pytest.raises(ValueError, match="not a dgnopt_jax checkpoint"):
    restore(path, target)


def test_restore_never_unpickles(tmp_path):
  # A payload with a valid checksum whose array claims dtype 'object' (the
  # one way numpy could be asked for Python objects) and a pickle as bytes.
  marker = tmp_path / "pickle-ran"
  pickled = b"cos\nsystem\n(S'touch " + str(marker).encode() + b"'\ntR."
  array = msgpack.ExtType(1, msgpack.packb(((1,), "object", pickled)))
  payload = msgpack.packb({"w": array})
  path = tmp_path / "c.msgpack"
  path.write_bytes(checkpoint_lib.MAGIC + hashlib.sha256(payload).digest() + payload)
  with pytest.raises(ValueError, match="cannot be read"):
    restore(path, {"w": np.zeros(1)})
  assert not marker.exists()


def test_a_failed_save_leaves_no_temporary_file(tmp_path, monkeypatch):
  path = tmp_path / "c.msgpack"
  save(path, {"w": np.zeros(3)})

  def full_disk(fd):
    raise OSError(28, "No space left on device")

  monkeypatch.setattr(os, "fsync", full_disk)
  with pytest.raises(OSError, match="No space"):
    save(path, {"w": np.ones(3)})
  assert sorted(os.listdir(tmp_path)) == ["c.msgpack"]
  monkeypatch.undo()
  np.testing.assert_array_equal(restore(path, {"w": np.zeros(3)})["w"], np.zeros(3))


def test_a_killed_saves_temporary_file_is_removed_by_the_next_save(tmp_path):
  # A save killed between writing and renaming leaves ".c.msgpack.tmp-<pid>"
  # of a process that no longer exists.
  dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                        capture_output=True, text=True, check=True).stdout.strip()
  stale = tmp_path / f".c.msgpack.tmp-{dead}"
  stale.write_bytes(b"half a checkpoint")
  save(tmp_path / "c.msgpack", {"w": np.zeros(3)})
  assert sorted(os.listdir(tmp_path)) == ["c.msgpack"]


def test_save_syncs_the_file_and_its_folder(tmp_path, monkeypatch):
  synced = []
  real = os.fsync
  monkeypatch.setattr(os, "fsync", lambda fd: synced.append(os.path.realpath(
      f"/proc/self/fd/{fd}")) or real(fd))
  save(tmp_path / "c.msgpack", {"w": np.zeros(3)})
  assert len(synced) == 2
  assert synced[1] == os.path.realpath(tmp_path)  # the rename itself is on disk
