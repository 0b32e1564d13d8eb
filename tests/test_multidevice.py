"""Multi-device checks, each in a subprocess so the rest of the suite keeps one device.

``tests/multidevice`` runs on 8 CPU devices
(``XLA_FLAGS=--xla_force_host_platform_device_count=8``); the multi-host
check starts two processes of 4 CPU devices each, joined by
``jax.distributed`` on localhost, and compares their trained params with one
process of 8 devices.
"""

import importlib.util
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

import dgnopt_jax as dgnopt

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cpu_env(devices: int) -> dict:
  env = dict(os.environ)
  env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") +
                      f" --xla_force_host_platform_device_count={devices}").strip()
  env["JAX_PLATFORMS"] = "cpu"
  return env


def run_multidevice_tests(marker: str) -> None:
  proc = subprocess.run(
      [sys.executable, "-m", "pytest", "tests/multidevice", "-q", "-m", marker,
       "-p", "no:cacheprovider"],
      cwd=ROOT, env=cpu_env(8), capture_output=True, text=True, timeout=1200)
  summary = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""
  assert proc.returncode == 0, proc.stdout[-8000:] + proc.stderr[-4000:]
  assert "skipped" not in summary, summary  # 8 devices must have been there


def test_eight_cpu_devices():
  run_multidevice_tests("not slow")


@pytest.mark.slow
def test_eight_cpu_devices_slow():
  run_multidevice_tests("slow")


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


@pytest.mark.slow
def test_two_hosts_equal_one_host(tmp_path):
  """The example's multi-host recipe: 2 processes x 4 devices == 1 process x 8."""
  common = [sys.executable, "examples/data_parallel.py", "--steps", "5",
            "--optimizer", "gr-kfac"]
  single = subprocess.run(common + ["--cpu-devices", "8", "--save", str(tmp_path / "one")],
                          cwd=ROOT, env=cpu_env(1), capture_output=True, text=True,
                          timeout=600)
  assert single.returncode == 0, single.stdout[-3000:] + single.stderr[-3000:]
  port = _free_port()
  procs = [subprocess.Popen(
      common + ["--cpu-devices", "4", "--coordinator", f"localhost:{port}",
                "--num-processes", "2", "--process-id", str(i),
                "--save", str(tmp_path / "two")],
      cwd=ROOT, env=cpu_env(1), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
      for i in range(2)]
  outputs = [p.communicate(timeout=600) for p in procs]
  for p, (out, err) in zip(procs, outputs):
    assert p.returncode == 0, out[-3000:] + err[-3000:]
  assert "2 host(s), 8 cpu devices" in outputs[0][0]
  spec = importlib.util.spec_from_file_location("data_parallel",
                                                os.path.join(ROOT, "examples", "data_parallel.py"))
  example = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(example)
  target = example.make_game().init(jax.random.PRNGKey(0))
  one = dgnopt.checkpoint.restore(str(tmp_path / "one"), target)
  two = dgnopt.checkpoint.restore(str(tmp_path / "two"), target)
  moved = sum(float(np.linalg.norm(np.asarray(a) - np.asarray(b)))
              for a, b in zip(jax.tree.leaves(one), jax.tree.leaves(target)))
  assert moved > 1e-3
  for a, b in zip(jax.tree.leaves(one), jax.tree.leaves(two)):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert np.linalg.norm(a - b) <= 1e-5 * np.linalg.norm(a)
