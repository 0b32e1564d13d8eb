"""The README's and the docs' code, the examples and the main job run as documented."""

import json
import pathlib
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dgnopt_jax as dgnopt

ROOT = pathlib.Path(__file__).resolve().parents[1]
G_get = dgnopt.games.get_path


def _snippets(path, language="python"):
  return re.findall(rf"```{language}\n(.*?)```", (ROOT / path).read_text(), re.S)


def test_readme_commands_are_the_main_job_and_the_ci_test_command():
  main_job, tests = [c.strip() for c in _snippets("README.md", "bash")[:2]]
  assert main_job.endswith(".venv/bin/python -m dgnopt_jax.train")
  assert tests.endswith(".venv/bin/python -m pytest") and tests in (ROOT / ".ci/run").read_text()


def test_readme_quick_start_trains_the_flax_model_and_names_an_optimizer():
  quick_start, _, by_name = _snippets("README.md")
  scope = {}
  exec(compile(quick_start, "README.md", "exec"), scope)
  model, game, variables, data = (scope["model"], scope["game"], scope["variables"],
                                  scope["data"])
  x = jnp.asarray(data.x_test)
  logits = model.apply(variables, x)
  np.testing.assert_allclose(game.apply(variables, x), logits, rtol=1e-5, atol=1e-5)
  before = model.init(jax.random.PRNGKey(0), x[:32])
  untrained = float(np.mean(np.argmax(model.apply(before, x), -1) == data.y_test))
  trained = float(np.mean(np.argmax(logits, -1) == data.y_test))
  assert trained > max(0.5, untrained + 0.3), (untrained, trained)
  exec(compile(by_name, "README.md", "exec"), scope)
  assert scope["named"].learning_rate == 0.03 and np.isfinite(float(scope["loss"]))
  assert int(scope["state"].count) + int(scope["state"].rejected) == 1


def test_readme_flax_loops_snippet_trains_a_train_state_and_an_nnx_module():
  from flax import nnx
  quick_start, loops, _ = _snippets("README.md")
  scope = {}
  exec(compile(quick_start.replace("range(200)", "range(1)"), "README.md", "exec"), scope)
  exec(compile(loops, "README.md", "exec"), scope)
  state = scope["state"]
  assert int(state.step) == 1 and jax.tree.structure(state.params) == jax.tree.structure(
      scope["variables"])
  net, data = scope["net"], scope["data"]
  x = jnp.asarray(data.x_test)
  assert int(scope["optimizer"].step[...]) == 200
  accuracy = float(np.mean(np.argmax(net(x), -1) == data.y_test))
  assert accuracy > 0.9, accuracy
  game = dgnopt.games.from_nnx(net, x[:32])
  assert [p.name for p in game.players] == ["conv", "head"]


def test_doc_links_lead_to_files_and_headings():
  def anchor(heading):
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")

  for page in [ROOT / "README.md"] + sorted((ROOT / "docs").glob("*.md")):
    for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
      if target.startswith("http"):
        continue
      path, _, fragment = target.partition("#")
      linked = (page.parent / path).resolve() if path else page
      assert linked.exists(), (page.name, target)
      if fragment:
        headings = re.findall(r"^#+ (.*)$", linked.read_text(), re.M)
        assert fragment in {anchor(h) for h in headings}, (page.name, target)


def _run_games_snippet(marker, first_steps, replace=("", "")):
  """Runs docs/GAMES.md's first snippet (``range(1000)`` -> ``range(first_steps)``), then the
  one snippet containing ``marker`` in the same scope, as a reader would.

  Returns the scope and a copy of it as the first snippet left it.
  """
  blocks = _snippets("docs/GAMES.md")
  scope = {}
  exec(compile(blocks[0].replace("range(1000)", f"range({first_steps})"), "GAMES.md", "exec"),
       scope)
  first = dict(scope)
  marked = [b for b in blocks if marker in b]
  assert len(marked) == 1
  exec(compile(marked[0].replace(*replace), "GAMES.md", "exec"), scope)
  return scope, first


def test_games_mlp_snippet_trains():
  scope = {}
  exec(compile(_snippets("docs/GAMES.md")[0], "GAMES.md", "exec"), scope)
  game, params, data = scope["game"], scope["params"], scope["data"]
  logits = game.apply(params, jnp.asarray(data.x_test, jnp.float32))
  assert float(np.mean(np.argmax(logits, -1) == data.y_test)) > 0.9


def test_games_fictitious_players_snippet():
  scope, first = _run_games_snippet("G.fictitious(", 300)
  before = first["params"]
  game, split, params, data = scope["game"], scope["split"], scope["params"], scope["data"]
  for player in game.players:  # collapsed = the sum of the four players
    parts = G_get(split, player.path)
    assert len(parts) == 4
    for leaf, *leaves in zip(*map(jax.tree.leaves, [G_get(params, player.path)] + list(parts))):
      np.testing.assert_array_equal(leaf, sum(leaves[1:], leaves[0]))
  x = jnp.asarray(data.x_test, jnp.float32)
  def accuracy(p):
    return float(np.mean(np.argmax(game.apply(p, x), -1) == data.y_test))
  assert accuracy(params) >= accuracy(before) - 0.01
  assert game.loss_value(params, x, data.y_test) < game.loss_value(before, x, data.y_test)


def test_games_alignment_snippet():
  scope, _ = _run_games_snippet("dgnopt.aligned(", 1, ("range(100)", "range(20)"))
  state, game, images = scope["bandit_state"], scope["alignments"][0], scope["images"]
  assert int(state.bandit.pulls.sum()) == 20 and np.all(np.asarray(state.bandit.pulls) > 0)
  logits = game.apply(scope["image_params"], jnp.asarray(images.x_test))
  assert float(np.mean(np.argmax(logits, -1) == images.y_test)) > 0.5


@pytest.mark.slow
def test_flax_example_prints_table():
  out = subprocess.run(
      [sys.executable, "examples/flax_resnet_digits.py", "--steps", "10", "--eval-every", "5",
       "--solver", "olne"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
  assert "| optax adam |" in out and "| olne-adam |" in out


def test_example_runs():
  out = subprocess.run(
      [sys.executable, "examples/digits_fne_vs_sgd.py", "--steps", "100", "--seeds", "1"],
      capture_output=True, text=True, check=True, cwd=ROOT)
  assert "DDP-SGD (fne)" in out.stdout and "SGD" in out.stdout


def _model_zoo_table(*args):
  """The rows ``(model, optimizer)`` -> cells of examples/model_zoo.py's table, run as documented."""
  out = subprocess.run([sys.executable, "examples/model_zoo.py", "--quick", *args], cwd=ROOT,
                       capture_output=True, text=True, check=True).stdout
  rows = [line.strip("|").split("|") for line in out.splitlines()
          if line.startswith("| ") and not line.startswith("| model")]
  return {(r[0].strip(), r[1].strip()): [c.strip() for c in r[2:]] for r in rows}


def test_model_zoo_example_cnn_quick():
  table = _model_zoo_table("--models", "cnn")
  assert list(table) == [("cnn", "adam"), ("cnn", "fne-adam"), ("cnn", "gr-adam")]
  for (_, name), (lr, loss, accuracy, _, ratio, _) in table.items():
    assert lr == "0.01" and np.isfinite(float(loss)) and 0 <= float(accuracy) <= 100
    assert ratio == "1.00×" if name == "adam" else ratio.endswith("×")


@pytest.mark.slow
def test_model_zoo_example_quick():
  table = _model_zoo_table()
  assert [k for k in table if k[0] == "transformer"] == [
      ("transformer", "adam"), ("transformer", "fne-adam"), ("transformer", "gr-adam")]
  assert all(np.isfinite(float(cells[1])) for cells in table.values())


def _fault_script():
  import importlib.util
  spec = importlib.util.spec_from_file_location("reliability_faults",
                                                ROOT / "examples" / "reliability_faults.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.mark.slow
def test_fault_script_scenarios_nan_batch_and_bad_shape():
  faults = _fault_script()
  _, _, outcome = faults.nan_in_batch()
  assert "params finite: True; steps applied 19, skipped 1" in outcome
  _, _, outcome = faults.bad_batch_shape()
  assert outcome.startswith("ValueError: batch inputs have per-sample shape (60,)")


@pytest.mark.slow
def test_fault_script_writes_the_reliability_table(tmp_path):
  out = tmp_path / "RELIABILITY.md"
  subprocess.run([sys.executable, "examples/reliability_faults.py", "--write", str(out)],
                 capture_output=True, text=True, check=True, cwd=ROOT)
  rows = [r for r in out.read_text().splitlines() if r.startswith("| ") and "---" not in r][1:]
  assert len(rows) >= len(_fault_script().SCENARIOS)  # some scenarios give several rows
  text = "\n".join(rows)
  for fault in ("NaN in one input", "inf inputs", "label 10 for 10 classes"):
    assert any(fault in r and "skipped 1" in r and "params finite: True" in r for r in rows)
  assert all("params finite: False" not in r for r in rows)
  assert "params dtype after 20 steps: bfloat16" in text
  assert "bit for bit to the uninterrupted run: True" in text
  assert "raised JaxRuntimeError" in text
  assert text.count("DGNOpt run stalled: the last 50 steps were all skipped") == 3
  assert "damping must be > 0, got 0.0" in text and "does not fit the target" in text
  assert "updates equal those of float32 inputs: True" in text
  assert "the rerun's record equals the uninterrupted run's" in text and text.count(
      "exit 2 after") == 8
  assert "record equals the uninterrupted run's (losses, accuracies, skipped steps): True" in text


@pytest.mark.slow
def test_fictitious_players_example_runs():
  out = subprocess.run(
      [sys.executable, "examples/fictitious_players_digits.py", "--steps", "10",
       "--eval-every", "5", "--players", "2", "--target", "0.5"],
      capture_output=True, text=True, check=True, cwd=ROOT)
  rows = [r for r in out.stdout.splitlines() if r.startswith("| ") and "---" not in r]
  assert rows[0].startswith("| N | steps to 50% test acc")
  assert [r.split("|")[1].strip() for r in rows[1:]] == ["2"]


def test_lr_ablation_experiment_writes_table(tmp_path):
  out = tmp_path / "ablation"
  subprocess.run([sys.executable, "experiments/ddpnopt_lr_ablation.py", "--lrs", "0.6",
                  "--vxx-regs", "1e-3", "--seeds", "2", "--steps", "30", "--out", str(out)],
                 cwd=ROOT, capture_output=True, text=True, check=True)
  table = (tmp_path / "ablation.md").read_text()
  assert "| 0.6 |" in table and "[81.73]" in table and "[89.39]" in table
  record = json.loads((tmp_path / "ablation.json").read_text())
  assert [(r["lr"], r["vxx_reg"]) for r in record["results"]] == [(0.6, None), (0.6, 1e-3)]
  assert all(len(r["accuracy"]) == 2 for r in record["results"])


@pytest.mark.slow
def test_table3_experiment_writes_table(tmp_path):
  out = tmp_path / "table3"
  subprocess.run([sys.executable, "experiments/ddpnopt_table3.py", "--datasets", "iris",
                  "--seeds", "1", "--steps", "5", "--out", str(out)],
                 cwd=ROOT, capture_output=True, text=True, check=True)
  table = (tmp_path / "table3.md").read_text()
  assert "| iris (10, 32, 5) |" in table and "[93.00]" in table and "[0.0552]" in table
  record = json.loads((tmp_path / "table3.json").read_text())
  assert len(record["results"]) == 8


@pytest.mark.slow
def test_games_nnx_snippet_trains():
  from flax import nnx
  scope, _ = _run_games_snippet("G.from_nnx(", 1, ("range(100)", "range(20)"))
  net, game, data = scope["net"], scope["nnx_game"], scope["data"]
  assert [p.name for p in game.players] == ["layers/0", "layers/1", "head"]
  assert all(p.layer is not None for p in game.players)
  assert int(scope["optimizer"].step[...]) == 20
  x, y = jnp.asarray(data.x_test), jnp.asarray(data.y_test)
  untrained = scope["Net"](nnx.Rngs(0))  # the snippet's initial params
  params = lambda m: nnx.as_pure(nnx.state(m, nnx.Param))
  assert game.loss_value(params(net), x, y) < 0.7 * game.loss_value(params(untrained), x, y)


def test_games_traced_function_snippet():
  scope, _ = _run_games_snippet("G.from_function(", 1)
  traced, variables, mlp, data = scope["traced"], scope["variables"], scope["mlp"], scope["data"]
  assert [s.num_players for s in traced.stages] == [1, 1, 1]
  assert all(isinstance(p.layer, dgnopt.games.Dense) for p in traced.players)
  x = jnp.asarray(data.x_test, jnp.float32)
  np.testing.assert_allclose(traced.apply(variables, x), mlp.apply(variables, x), rtol=1e-5,
                             atol=1e-5)
  assert float(np.mean(np.argmax(mlp.apply(variables, x), -1) == data.y_test)) > 0.8
