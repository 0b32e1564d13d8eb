"""The main job (``python -m dgnopt_jax.train``): checked arguments, run folders, resume.

The arguments are checked in this process (``train.main`` returns or exits
before loading anything for most of them); the runs are subprocesses, on
float32 as a user would run them.
"""

import glob
import json
import os
import pathlib
import re
import signal
import subprocess
import sys
import time

import pytest

from dgnopt_jax import train

ROOT = pathlib.Path(__file__).resolve().parents[1]


def main_exit(argv, capsys):
  """``(exit status, stderr)`` of ``train.main(argv)``."""
  try:
    code = train.main(argv)
  except SystemExit as e:  # argparse's own errors
    code = e.code
  return code, capsys.readouterr().err


@pytest.mark.parametrize("argv,match", [
    (["--steps", "0"], "argument --steps: must be > 0, got 0"),
    (["--optimizers", ""], "--optimizers is empty"),
    (["--optimizers", "sgd,,adam"], "--optimizers: an empty optimizer name"),
    (["--eval-every", "0"], "argument --eval-every: must be > 0, got 0"),
    (["--eval-every", "-1"], "argument --eval-every: must be > 0, got -1"),
    (["--seeds", "0"], "argument --seeds: must be > 0, got 0"),
    (["--optimizers", "fne-kfac/x"], "'fne-kfac/x': the statistics period after '/' must be "
     "an integer >= 1, got 'x'"),
    (["--optimizers", "gr-adam/3"], "a statistics period \\(/3\\) needs the kfac or ekfac"),
    (["--optimizers", "sgd@-1"], "'sgd@-1': the learning rate must be finite and > 0"),
    (["--optimizers", "adam@fast"], "the learning rate after '@' must be a number"),
    (["--optimizers", "sgd,fne-kfax"], "unknown optimizer 'fne-kfax': unknown curvature 'kfax'"),
    (["--optimizers", "newton"], "unknown optimizer 'newton'"),
    (["--optimizers", "sgd,sgd"], "names \\['sgd'\\] more than once"),
    (["--lr", "abc"], "argument --lr: expected a number, got 'abc'"),
    (["--lr", "nan"], "argument --lr: must be > 0, got nan"),
    (["--model", "cnn", "--dataset", "wine"], "--model cnn needs an image dataset"),
    (["--bogus"], "unrecognized arguments: --bogus"),
])
def test_bad_arguments_are_one_line_errors_with_status_2(argv, match, capsys):
  code, err = main_exit(argv, capsys)
  assert code == 2
  assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
  assert err.startswith("python -m dgnopt_jax.train: error: ")
  assert re.search(match, err), err


def test_errors_found_before_training(tmp_path, capsys):
  # An unwritable --out, a damping kfac cannot use, a batch larger than the data:
  # found after loading the data and building the optimizers, before any step.
  blocker = tmp_path / "a-file"
  blocker.write_text("")
  base = ["--model", "mlp", "--steps", "5", "--seeds", "1"]
  for argv, match in (
      (["--out", str(blocker / "runs")], f"--out {blocker / 'runs'}: cannot write there"),
      (["--optimizers", "sgd,gr-kfac", "--damping", "0", "--out", str(tmp_path)],
       "gr-kfac: damping must be > 0, got 0.0"),
      (["--batch-size", "5000", "--out", str(tmp_path)], "--batch-size 5000 exceeds the 1347"),
  ):
    code, err = main_exit(base + argv, capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert match in err
  assert sorted(os.listdir(tmp_path)) == ["a-file"]  # nothing trained, nothing written


@pytest.mark.parametrize("argv", [["--steps", "0"], ["--optimizers", "sgd,fne-kfax"]])
def test_bad_arguments_exit_within_five_seconds(argv):
  start = time.perf_counter()
  done = subprocess.run([sys.executable, "-m", "dgnopt_jax.train"] + argv, cwd=ROOT,
                        capture_output=True, text=True, timeout=60)
  elapsed = time.perf_counter() - start
  assert done.returncode == 2 and elapsed < 5.0, (done.returncode, elapsed)
  assert len(done.stderr.strip().splitlines()) == 1 and done.stdout == ""


def test_help_shows_defaults_and_the_optimizer_syntax(capsys):
  with pytest.raises(SystemExit) as info:
    train.parse_args(["--help"])
  assert info.value.code == 0
  text = capsys.readouterr().out
  for expected in ("[<solver>-]<curvature>[/N][@lr]", "(default: 1500)", "(default: 250)",
                   "(default: adam,gr-adam)", "kfac 0.03", "gr-kfac/5@0.03", "--no-resume",
                   "--checkpoint-every N"):
    assert expected in text, expected


# The SIGTERM run: optax's sgd (finished before the signal) and fne-sgd
# (interrupted part-way), one seed, DIGITS MLP.
COMMAND = [sys.executable, "-m", "dgnopt_jax.train", "--model", "mlp", "--optimizers",
           "sgd,fne-sgd", "--steps", "600", "--eval-every", "200", "--seeds", "1",
           "--checkpoint-every", "10"]
# What a run's record holds that does not depend on timing.
DETERMINISTIC = ("optimizer", "seed", "learning_rate", "steps", "curve", "final_train_loss",
                 "test_accuracy_pct", "skipped", "rejected", "skipped_steps", "error")


def _record(out):
  folders = [f for f in glob.glob(os.path.join(out, "*-digits-mlp")) if not os.path.islink(f)]
  assert len(folders) == 1, folders
  return folders[0], json.loads(pathlib.Path(folders[0], "record.json").read_text())


def _deterministic(record):
  runs = [{k: (r[k] if k != "curve" else [{c: p[c] for c in p if c != "train_time_s"}
                                          for p in r[k]]) for k in DETERMINISTIC}
          for r in record["runs"]]
  summary = [{k: row[k] for k in ("optimizer", "train_loss", "test_accuracy_pct", "skipped")}
             for row in record["summary"]]
  return runs, summary


def test_sigterm_then_the_same_command_gives_the_uninterrupted_record(tmp_path):
  whole, parts = str(tmp_path / "whole"), str(tmp_path / "parts")
  # The uninterrupted run: the table, the record and the plot.
  done = subprocess.run(COMMAND + ["--out", whole], cwd=ROOT, capture_output=True, text=True,
                        timeout=300)
  assert done.returncode == 0, done.stderr
  assert "| optimizer | lr | train loss | test acc (%) |" in done.stdout
  assert "fne-sgd seed 0 step   200/600" in done.stdout and "steps/s  run ETA" in done.stdout
  folder, want = _record(whole)
  assert os.path.realpath(os.path.join(whole, "latest")) == os.path.realpath(folder)
  assert want["complete"] and want["seeds"] == [0]
  assert {"dgnopt_jax", "jax", "jaxlib", "optax", "device", "backend"} <= set(
      want["environment"])
  assert want["units"]["accuracy"] == "percent of the test set"
  assert all(50 < r["test_accuracy_pct"] <= 100 for r in want["runs"])
  assert pathlib.Path(folder, "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

  # SIGTERM while fne-sgd trains: the finished sgd run is kept, fne-sgd checkpointed.
  job = subprocess.Popen(COMMAND + ["--out", parts], cwd=ROOT, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
  deadline = time.time() + 240
  while not glob.glob(os.path.join(parts, "*", "checkpoints", "01-seed0.msgpack")):
    assert job.poll() is None and time.time() < deadline, job.communicate()
    time.sleep(0.005)
  job.send_signal(signal.SIGTERM)
  out, err = job.communicate(timeout=120)
  assert job.returncode == 128 + signal.SIGTERM, err
  assert "interrupted (SIGTERM): fne-sgd seed 0 at step" in out
  stopped = int(out.split("fne-sgd seed 0 at step ")[1].split()[0])
  assert 10 <= stopped < 600
  _, partial = _record(parts)
  assert not partial["complete"] and [r["optimizer"] for r in partial["runs"]] == ["sgd"]

  # The same command again: continues the folder, the record equals the uninterrupted one.
  again = subprocess.run(COMMAND + ["--out", parts], cwd=ROOT, capture_output=True,
                         text=True, timeout=300)
  assert again.returncode == 0, again.stderr
  assert "(continuing: 1 of 2 runs done)" in again.stdout
  _, got = _record(parts)
  assert got["complete"] and got["runs"][1]["resumed_at_step"] == stopped
  assert _deterministic(got) == _deterministic(want)
