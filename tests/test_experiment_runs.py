"""The experiment scripts' run helpers (experiments/common.py) and the DGNOpt scripts end to end."""

import json
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dgnopt_jax as dgnopt

from helpers import tanh_mlp

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "experiments"))
import common  # noqa: E402


@pytest.mark.parametrize("name", ["sgd", "fne-sgd"])
def test_curve_run_evaluates_the_params_of_a_step_by_step_loop(name):
  game = tanh_mlp(widths=(6,), in_dim=4, classes=3)
  rng = np.random.default_rng(0)
  xs, ys = jnp.asarray(rng.normal(size=(6, 8, 4))), jnp.asarray(rng.integers(3, size=(6, 8)))
  x_test, y_test = jnp.asarray(rng.normal(size=(20, 4))), jnp.asarray(rng.integers(3, size=20))
  accuracy = lambda p: jnp.mean(jnp.argmax(game.apply(p, x_test), -1) == y_test)
  init, update = common.make_update(game, name, 0.5)
  params0 = game.init(jax.random.PRNGKey(1))
  params, state, curve, losses = common.make_curve_run(init, update, accuracy, 2)(
      params0, (xs, ys))
  # The same run one optimizer step at a time, with optax / the transform directly.
  if name == "sgd":
    import optax
    tx = optax.sgd(0.5)
    grad = jax.grad(lambda p, x, y: game.loss_value(p, x, y))
    step = jax.jit(lambda p, s, x, y: tx.update(grad(p, x, y), s, p))
  else:
    tx = dgnopt.fne(game, 0.5)
    step = jax.jit(lambda p, s, x, y: tx.update(None, s, p, batch=(x, y)))
  p, s, want = params0, tx.init(params0), []
  for i in range(6):
    updates, s = step(p, s, xs[i], ys[i])
    p = jax.tree.map(jnp.add, p, updates)
    if i % 2 == 1:
      want.append(float(accuracy(p)))
  np.testing.assert_allclose(curve, want, atol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-12), params, p)
  assert losses.shape == (3,) and np.all(np.isfinite(losses))
  assert common.steps_to(np.array([0.1, 0.5, 0.9]), 0.5, 10) == 20.0
  assert common.steps_to(np.array([0.1, 0.2]), 0.5, 10) == float("inf")


def _run_script(script, tmp_path, *args):
  out = tmp_path / "result"
  subprocess.run([sys.executable, f"experiments/{script}", *args, "--out", str(out)],
                 cwd=ROOT, capture_output=True, text=True, check=True)
  return (tmp_path / "result.md").read_text(), json.loads((tmp_path / "result.json").read_text())


def test_table4_script(tmp_path):
  table, record = _run_script("dgnopt_table4.py", tmp_path, "--players", "2", "--seeds", "1",
                              "--steps", "20", "--eval-every", "10", "--target", "10")
  assert "| N = 2 | 10 ± 0 |" in table and "2.31k / 2.97k" in table
  assert [r["run"] for r in record["results"]] == ["SGD", 2]


@pytest.mark.slow
def test_table5_script(tmp_path):
  table, record = _run_script("dgnopt_table5.py", tmp_path, "--seeds", "1", "--steps", "20",
                              "--early", "10", "--eval-every", "10")
  assert "| adaptive |" in table and "| 88.33 | 85.65 |" in table
  pulls = {r["run"]: r["pulls"] for r in record["results"]}
  assert pulls["fixed"] == [[20, 0]] and sum(pulls["adaptive"][0]) == 20


@pytest.mark.slow
def test_tables23_script(tmp_path):
  table, record = _run_script("dgnopt_tables23.py", tmp_path, "--networks", "inception",
                              "--seeds", "1", "--steps", "5")
  assert "| inception |" in table and "[97.96]" in table and "| inception | GR |" in table
  assert len(record["results"]) == 12


@pytest.mark.slow
def test_fig8_script(tmp_path):
  table, record = _run_script("dgnopt_fig8.py", tmp_path, "--lrs", "1.0", "--seeds", "1",
                              "--steps", "20", "--eval-every", "10")
  assert "| 1 | DGNOpt-FNE |" in table and (tmp_path / "result.png").stat().st_size > 1000
  assert len(record["results"]) == 3
