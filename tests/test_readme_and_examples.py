"""The README's code, the example and the main job run as documented."""

import json
import pathlib
import re
import subprocess
import sys

import jax.numpy as jnp
import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_readme_snippet_trains():
  text = (ROOT / "README.md").read_text()
  code = re.findall(r"```python\n(.*?)```", text, re.S)[0]
  scope = {}
  exec(compile(code, "README.md", "exec"), scope)
  game, params, data = scope["game"], scope["params"], scope["data"]
  logits = game.apply(params, jnp.asarray(data.x_test, jnp.float32))
  assert float(np.mean(np.argmax(logits, -1) == data.y_test)) > 0.9


def test_main_job_writes_table_record_and_plot(tmp_path):
  out = subprocess.run(
      [sys.executable, "-m", "dgnopt_jax.train", "--steps", "60", "--eval-every", "30",
       "--seeds", "1", "--optimizers", "sgd,fne-sgd,olne-adam", "--out", str(tmp_path)],
      capture_output=True, text=True, check=True, cwd=ROOT)
  assert "| optimizer | lr | train loss | test acc (%)" in out.stdout
  record = json.loads((tmp_path / "digits_mlp.json").read_text())
  assert [r["optimizer"] for r in record["summary"]] == ["sgd", "fne-sgd", "olne-adam"]
  assert (tmp_path / "digits_mlp.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_example_runs():
  out = subprocess.run(
      [sys.executable, "examples/digits_fne_vs_sgd.py", "--steps", "100", "--seeds", "1"],
      capture_output=True, text=True, check=True, cwd=ROOT)
  assert "DDP-SGD (fne)" in out.stdout and "SGD" in out.stdout
