"""The benchmark scripts run as documented and write their records (tiny settings, CPU)."""

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_resnet18_throughput_writes_its_record(tmp_path):
  out = tmp_path / "throughput.json"
  printed = subprocess.run(
      [sys.executable, "benchmarks/resnet18_throughput.py", "--steps", "3", "--width", "4",
       "--batch", "4", "--pool", "2", "--optimizers", "sgd,olne-sgd", "--out", str(out)],
      cwd=ROOT, capture_output=True, text=True, check=True).stdout
  assert "| optimizer | steps/s | images/s |" in printed
  record = json.loads(out.read_text())
  rows = record["rows"]
  assert [r["optimizer"] for r in rows] == ["sgd", "olne-sgd"]
  for r in rows:
    assert (r["steps"], r["timed_steps"], r["batch"], r["width"]) == (3, 2, 4, 4)
    assert r["compile_s"] > 0 and r["steps_per_s"] > 0
    np.testing.assert_allclose(r["images_per_s"], 4 * r["steps_per_s"])
    assert np.isfinite([r["first_loss"], r["final_loss"]]).all()
    assert r["nonfinite_losses"] == 0
  # optax keeps no count of skipped steps; a DGNOpt solver does.
  assert rows[0]["skipped_steps"] is None and rows[1]["skipped_steps"] == 0


def test_batch_scaling_takes_a_device_and_writes_its_record(tmp_path):
  out = tmp_path / "batch_scaling.json"
  subprocess.run(
      [sys.executable, "benchmarks/batch_scaling.py", "--device", "cpu", "--batches", "4,8",
       "--width", "8", "--rounds", "1", "--repeats", "1", "--trained-steps", "1",
       "--out", str(out)],
      cwd=ROOT, capture_output=True, text=True, check=True)
  record = json.loads(out.read_text())
  assert record["backend"] == "cpu" and record["width"] == 8
  assert set(record["seconds"]["fne-sgd"]) == {"4", "8"}


@pytest.mark.slow
def test_gpu_check_quick_mode_runs_on_a_cpu(tmp_path):
  env = dict(os.environ, GPU_CHECK_QUICK="1", GPU_CHECK_ALLOW_CPU="1", PYTHON=sys.executable,
             OUT=str(tmp_path))
  result = subprocess.run(["bash", "benchmarks/gpu_check.sh"], cwd=ROOT, env=env,
                          capture_output=True, text=True)
  assert result.returncode == 0, result.stdout[-3000:]
  summary = json.loads((tmp_path / "summary.json").read_text())
  assert [s["status"] for s in summary["sections"]] == ["pass"] * 5
  assert len(list(tmp_path.iterdir())) <= 8


@pytest.mark.slow
def test_large_steps_runs_split_players_beside_the_open_loop_step(tmp_path):
  out = tmp_path / "large_steps.json"
  printed = subprocess.run(
      [sys.executable, "benchmarks/large_steps.py", "--datasets", "iris", "--networks",
       "tanh16x2", "--curvatures", "identity", "--seeds", "2", "--steps", "5", "--lrs", "0.1",
       "--out", str(out)],
      cwd=ROOT, capture_output=True, text=True, check=True).stdout
  rows = [line.split("|")[1:-1] for line in printed.splitlines() if line.startswith("| iris")]
  assert sorted(r[4].strip() for r in rows) == ["fne projected", "gr projected"]
  assert all(r[1].strip() == "tanh16x2" for r in rows)
  assert out.exists()
  bad = subprocess.run([sys.executable, "benchmarks/large_steps.py", "--networks", "tanh16xa"],
                       cwd=ROOT, capture_output=True, text=True)
  assert bad.returncode != 0 and "unknown network 'tanh16xa'" in bad.stderr
