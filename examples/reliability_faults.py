"""Inject faults into DGNOpt training and report what happens, as a markdown table.

    python examples/reliability_faults.py                      # print the table
    python examples/reliability_faults.py --write docs/RELIABILITY.md

Every training scenario trains DDPNOpt's DIGITS MLP (4 tanh layers of width
32) with a jit-compiled ``fne`` step on real DIGITS batches of 32 and
injects one fault; the input scenarios pass one bad argument to the library,
the checkpoint scenarios damage a checkpoint, and the main-job scenarios run
``python -m dgnopt_jax.train`` with a bad argument or kill it part-way. The
outcome column is computed, not written by hand.
"""

from __future__ import annotations

import argparse
import glob
import json
import logging
import math
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import dgnopt_jax as dgnopt
from dgnopt_jax import datasets
from dgnopt_jax import train as main_job
from dgnopt_jax._src import trust_region as dgnopt_trust_region

G = dgnopt.games
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _setup(dtype=jnp.float32):
  data = datasets.load("digits")
  game = G.sequential([G.Dense(32, "tanh") for _ in range(4)] + [G.Dense(10)], (64,))
  params = jax.tree.map(lambda p: p.astype(dtype), game.init(jax.random.PRNGKey(0)))
  stream = datasets.batches(data.x_train, data.y_train, 32, seed=0)
  batches = [next(stream) for _ in range(20)]
  batches = [(jnp.asarray(x, dtype), jnp.asarray(y)) for x, y in batches]
  return game, params, batches


def _train(tx, params, batches, state=None):
  state = tx.init(params) if state is None else state
  step = jax.jit(lambda p, s, b: tx.update(None, s, p, batch=b))
  for b in batches:
    updates, state = step(params, state, b)
    params = optax.apply_updates(params, updates)
  return params, state


def _outcome(thunk, limit: int = 220) -> str:
  """What ``thunk()`` raised, as ``Type: message`` (the message shortened), or its result."""
  try:
    return str(thunk())
  except Exception as e:  # the outcome is what was raised
    message = main_job.error_summary(e)
    message = message if len(message) <= limit else message[:limit] + "…"
    return f"{type(e).__name__}: {message}"


def _trained_until_stall(tx, params, batches, state=None):
  """Trains on ``batches`` (60 of them, cycled) and reports the stall error or the counts."""
  def run():
    new, final = _train(tx, params, (batches * 3)[:60], state)
    jax.block_until_ready(new)
    return "no error; " + _summary(new, final)
  return _outcome(run, 300)


def _finite(tree) -> bool:
  return all(bool(jnp.all(jnp.isfinite(l))) for l in jax.tree.leaves(tree))


def _summary(params, state) -> str:
  rejected = f", rejected {int(state.rejected)}" if int(state.rejected) else ""
  return (f"params finite: {_finite(params)}; steps applied {int(state.count)}, "
          f"skipped {int(state.skipped)}{rejected}; last loss {float(state.loss):.4g}")


def nan_in_batch():
  game, params, batches = _setup()
  x, y = batches[5]
  batches[5] = (x.at[3, 10].set(jnp.nan), y)
  return ("NaN in one input of batch 6 of 20", "fne, identity",
          _summary(*_train(dgnopt.fne(game, 0.1), params, batches)))


def inf_loss():
  game, params, batches = _setup()
  x, y = batches[5]
  batches[5] = (x.at[0].set(jnp.inf), y)
  return ("inf inputs (inf logits, inf/NaN loss) in batch 6", "fne, adam",
          _summary(*_train(dgnopt.fne(game, 1e-3, "adam"), params, batches)))


def label_out_of_range():
  game, params, batches = _setup()
  x, y = batches[5]
  batches[5] = (x, y.at[0].set(10))
  return ("label 10 for 10 classes in batch 6", "fne, identity",
          _summary(*_train(dgnopt.fne(game, 0.1), params, batches)))


def zero_curvature():
  game, params, batches = _setup()
  batches = [(x.at[:, :8].set(0.0), y) for x, y in batches]  # dead inputs: zero statistics
  tx = dgnopt.fne(game, 1e-3, dgnopt.curvature.rmsprop(eps=0.0))
  return ("zero curvature: RMSprop with eps=0 on inputs that are always 0", "fne, rmsprop",
          _summary(*_train(tx, params, batches)))


def singular_kronecker_factor():
  game, params, batches = _setup()
  batches = [(x.at[:, :8].set(0.0), y) for x, y in batches]  # A has a null space
  tx = dgnopt.fne(game, 0.01, "kfac")
  return ("singular Kronecker factor (zero input columns), default damping 0.1", "fne, kfac",
          _summary(*_train(tx, params, batches)))


def huge_learning_rate():
  game, params, batches = _setup()
  return ("learning rate 1e6", "fne, identity",
          _summary(*_train(dgnopt.fne(game, 1e6), params, batches)))


def bf16_params():
  game, params, batches = _setup(jnp.bfloat16)
  new, state = _train(dgnopt.fne(game, 0.1, "kfac"), params, batches)
  dtypes = sorted({str(l.dtype) for l in jax.tree.leaves(new)})
  return ("bfloat16 params and inputs", "fne, kfac",
          f"params dtype after 20 steps: {', '.join(dtypes)}; " + _summary(new, state))


def restore_mid_run():
  game, params, batches = _setup()
  tx = dgnopt.gr(game, 0.03, "ekfac")
  want, _ = _train(tx, params, batches)
  half, half_state = _train(tx, params, batches[:10])
  with tempfile.TemporaryDirectory() as tmp:
    path = os.path.join(tmp, "step10.msgpack")
    dgnopt.checkpoint.save(path, {"params": half, "opt_state": half_state})
    restored = dgnopt.checkpoint.restore(path, {"params": params, "opt_state": tx.init(params)})
  got, _ = _train(tx, restored["params"], batches[10:], restored["opt_state"])
  same = all(np.array_equal(np.asarray(a), np.asarray(b))
             for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)))
  return ("checkpoint at step 10, restore, continue to 20", "gr, ekfac",
          f"params identical bit for bit to the uninterrupted run: {same}")


def raise_policy():
  game, params, batches = _setup()
  x, y = batches[5]
  batches[5] = (x.at[3, 10].set(jnp.nan), y)
  try:
    jax.block_until_ready(_train(dgnopt.fne(game, 0.1, nonfinite="raise"), params, batches))
    outcome = "no error (unexpected)"
  except Exception as e:  # JAX wraps the callback's FloatingPointError
    outcome = f"raised {type(e).__name__}: ...{'not finite' if 'not finite' in str(e) else str(e)[:60]}..."
  return ("NaN in batch 6 with nonfinite='raise'", "fne, identity", outcome)


def bad_batch_shape():
  game, params, batches = _setup()
  x, y = batches[0]
  tx = dgnopt.fne(game, 0.1)
  try:
    tx.update(None, tx.init(params), params, batch=(x[:, :60], y))
    outcome = "no error (unexpected)"
  except ValueError as e:
    outcome = f"ValueError: {e}"
  return ("inputs of shape (32, 60) for a (64,) game", "fne", outcome)




# -- Inputs the library refuses or converts (each used to fail inside JAX). --


def integer_inputs():
  game, params, batches = _setup()
  x, y = batches[0]
  ints = (jnp.round(2 * x)).astype(jnp.int32)
  same = []
  for make in (dgnopt.fne, dgnopt.gr):
    tx = make(game, 0.1)
    got, _ = tx.update(None, tx.init(params), params, batch=(ints, y))
    want, _ = tx.update(None, tx.init(params), params, batch=(ints.astype(jnp.float32), y))
    same.append(all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(got),
                                                          jax.tree.leaves(want))))
  return ("int32 inputs", "fne, gr",
          f"cast to the params' dtype: updates equal those of float32 inputs: {all(same)}")


def inputs_as_a_list():
  game, params, batches = _setup()
  x, y = batches[0]
  tx = dgnopt.fne(game, 0.1)
  return ("inputs given as a Python list of lists", "fne",
          _outcome(lambda: tx.update(None, tx.init(params), params,
                                     batch=(np.asarray(x).tolist(), y))))


def bad_learning_rates():
  game, _, _ = _setup()
  return ("learning rate of shape (2,); the string '0.1'", "fne",
          _outcome(lambda: dgnopt.fne(game, jnp.array([0.1, 0.2]))) + "; " +
          _outcome(lambda: dgnopt.fne(game, "0.1")))


def curvature_class():
  game, _, _ = _setup()
  from dgnopt_jax._src import curvature as curvature_lib  # the class behind dgnopt.curvature.adam()
  return ("the class curvature.Adam instead of an instance", "fne",
          _outcome(lambda: dgnopt.fne(game, 0.1, curvature_lib.Adam)))


def negative_layer_size():
  return ("Dense(-3)", "games", _outcome(lambda: G.Dense(-3)))


def python_branch_in_a_module():
  import flax.linen as nn  # pylint: disable=g-import-not-at-top

  class Branchy(nn.Module):

    @nn.compact
    def __call__(self, x):
      x = nn.Dense(32)(x)
      if x.sum() > 0:  # a Python branch on an array value
        x = jnp.tanh(x)
      return nn.Dense(10)(x)

  return ("a Flax module with a Python `if` on array values", "from_flax",
          _outcome(lambda: G.from_flax(Branchy(), jnp.zeros((1, 64)), "softmax_cross_entropy"),
                   160))


def mismatched_state():
  game, params, batches = _setup()
  other = G.sequential([G.Dense(16, "tanh") for _ in range(4)] + [G.Dense(10)], (64,))
  tx = dgnopt.fne(game, 1e-3, "adam")
  shapes = _outcome(lambda: tx.update(None, dgnopt.fne(other, 1e-3, "adam").init(
      other.init(jax.random.PRNGKey(0))), params, batch=batches[0]), 140)
  curvature = _outcome(lambda: tx.update(None, dgnopt.fne(game, 0.03, "kfac").init(params),
                                         params, batch=batches[0]), 140)
  return ("optimizer state of another network; of another curvature", "fne, adam",
          f"{shapes}; {curvature}")


def mixed_precision_players():
  with jax.enable_x64(True):
    game, params, batches = _setup(jnp.float64)
    params["dense_0"] = jax.tree.map(lambda p: p.astype(jnp.float32), params["dense_0"])
    tx = dgnopt.gr(game, 0.03, "kfac")
    return ("float32 first layer, float64 others", "gr, kfac",
            _outcome(lambda: tx.update(None, tx.init(params), params, batch=batches[0]), 260))


# -- Stalls: steps that can never be applied. --


def schedule_nan_at_start():
  game, _, _ = _setup()
  return ("learning-rate schedule NaN at count 0", "fne",
          _outcome(lambda: dgnopt.fne(game, lambda count: jnp.where(count >= 0, jnp.nan, 0.1))))


def schedule_nan_later():
  game, params, batches = _setup()
  tx = dgnopt.fne(game, lambda count: jnp.where(count >= 5, jnp.nan, 0.1))
  return ("learning-rate schedule NaN from count 5, 60 steps", "fne, identity",
          _trained_until_stall(tx, params, batches))


def damping_schedule_nan():
  game, params, batches = _setup()
  tx = dgnopt.fne(game, 0.03, "kfac", damping=lambda count: jnp.where(count >= 5, jnp.nan, 0.1),
                  max_consecutive_skips=math.inf)
  skipped = _summary(*_train(tx, params, batches))
  tx = dgnopt.fne(game, 0.03, "kfac", damping=lambda count: jnp.where(count >= 5, jnp.nan, 0.1))
  return ("KFAC damping schedule NaN from count 5", "fne, kfac",
          f"20 steps, no limit: {skipped}; 60 steps: " +
          _trained_until_stall(tx, params, batches))


def rmsprop_decay_nan():
  game, params, batches = _setup()
  built = _outcome(lambda: dgnopt.curvature.rmsprop(decay=float("nan")))
  curvature = dgnopt.curvature.rmsprop()
  object.__setattr__(curvature, "decay", float("nan"))  # statistics that turn NaN anyway
  tx = dgnopt.fne(game, 1e-3, curvature, max_consecutive_skips=math.inf)
  return ("RMSprop decay NaN; NaN statistics (the check bypassed)", "fne, rmsprop",
          f"{built}; bypassed, 20 steps: {_summary(*_train(tx, params, batches))}")


def nan_params():
  game, params, batches = _setup()
  bad = jax.tree.map(lambda p: p, params)
  bad["dense_2"] = {**bad["dense_2"], "kernel": bad["dense_2"]["kernel"].at[0, 0].set(jnp.nan)}
  tx = dgnopt.fne(game, 0.1)
  at_init = _outcome(lambda: tx.init(bad))
  return ("a NaN in the params: at tx.init; with a state made from finite params", "fne",
          f"{at_init}; " + _trained_until_stall(tx, bad, batches, tx.init(params)))


def kfac_zero_damping():
  game, _, _ = _setup()
  return ("KFAC with damping=0.0", "fne, kfac",
          _outcome(lambda: dgnopt.fne(game, 0.03, "kfac", damping=0.0)))


def trust_region_floor():
  with jax.enable_x64(True):  # float64: float32's round-off ends the run at loss 0 exactly
    return _trust_region_floor()


def _trust_region_floor():
  rosenbrock = lambda out, target: (1.0 - out[0]) ** 2 + 100.0 * (out[1] - out[0] ** 2) ** 2
  game = G.Game((G.stage(lambda x, th: x + th[0], ["x"]),
                 G.stage(lambda h, th: jnp.concatenate([h, jnp.zeros_like(h) + th[0]], -1),
                         ["y"])), rosenbrock)
  tx = dgnopt.fne(game, 1e-2, "adam")
  start = {"x": jnp.array([0.0]), "y": jnp.array([0.0])}
  batch = (jnp.zeros((1, 1)), jnp.zeros((1,)))
  step = jax.jit(lambda p, s: tx.update(None, s, p, batch=batch))
  params, state, at_floor, longest, run = start, tx.init(start), 0, 0, 0
  for _ in range(3000):
    floor = float(state.step_scale) <= dgnopt_trust_region.MIN_SCALE
    updates, new = step(params, state)
    rejected = int(new.rejected) > int(state.rejected)
    run = run + 1 if floor and rejected else 0
    at_floor, longest = at_floor + (floor and rejected), max(longest, run)
    params, state = optax.apply_updates(params, updates), new
  return ("steps rejected at the trust region's smallest scale (Rosenbrock, float64, 3000 "
          "steps)", "fne, adam",
          f"converged to ({float(params['x'][0]):.6f}, {float(params['y'][0]):.6f}), loss "
          f"{float(state.loss):.1e}; {at_floor} steps rejected at scale 2^-20, up to "
          f"{longest} in a row, skipped {int(state.skipped)}: where a converged run ends "
          "(the batch gradient at round-off), not counted as a stall")


# -- Checkpoints. --


def checkpoint_faults():
  game, params, _ = _setup()
  deeper = G.sequential([G.Dense(32, "tanh") for _ in range(5)] + [G.Dense(10)], (64,))
  with tempfile.TemporaryDirectory() as tmp:
    path = os.path.join(tmp, "c.msgpack")
    with jax.enable_x64(True):
      dgnopt.checkpoint.save(path, jax.tree.map(lambda p: np.asarray(p, np.float64), params))
    dtype = _outcome(lambda: dgnopt.checkpoint.restore(path, params), 150)
    dgnopt.checkpoint.save(path, {"step": "ten"})
    string = _outcome(lambda: dgnopt.checkpoint.restore(path, {"step": 0}), 150)
    dgnopt.checkpoint.save(path, deeper.init(jax.random.PRNGKey(0)))
    structure = _outcome(lambda: dgnopt.checkpoint.restore(path, params), 150)
    data = bytearray(open(path, "rb").read())
    data[-100] ^= 1
    open(path, "wb").write(bytes(data))
    corrupted = _outcome(lambda: dgnopt.checkpoint.restore(path, deeper.init(
        jax.random.PRNGKey(0))), 150)
    stale = os.path.join(tmp, f".c.msgpack.tmp-{_dead_pid()}")
    open(stale, "wb").write(b"half a checkpoint")
    dgnopt.checkpoint.save(path, params)
    left = sorted(os.listdir(tmp))
  dtype, string, structure, corrupted = (o.replace(tmp + os.sep, "") for o in
                                         (dtype, string, structure, corrupted))
  return [("float64 checkpoint restored into a float32 target", "checkpoint", dtype),
          ("a string restored at a scalar leaf", "checkpoint", string),
          ("a 5-hidden-layer checkpoint restored into the 4-hidden-layer MLP", "checkpoint",
           structure),
          ("one bit of a checkpoint flipped", "checkpoint", corrupted),
          ("the temporary file of a save killed before its rename", "checkpoint",
           f"removed by the next save; the folder holds {left}")]


def _dead_pid() -> int:
  done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                        capture_output=True, text=True, check=True)
  return int(done.stdout)


# -- The main job. --


def main_job_arguments():
  rows = []
  for argv in (["--steps", "0"], ["--optimizers", ""], ["--eval-every", "0"], ["--seeds", "0"],
               ["--optimizers", "fne-kfac/x"], ["--eval-every", "-1"], ["--optimizers", "sgd@-1"],
               ["--optimizers", "sgd,fne-kfax"]):
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "dgnopt_jax.train"] + argv, cwd=ROOT,
                          capture_output=True, text=True)
    shown = " ".join(a or "''" for a in argv)
    rows.append((f"`python -m dgnopt_jax.train {shown}`",
                 "main job", f"exit {done.returncode} after {time.perf_counter() - start:.1f} s: "
                 f"{done.stderr.strip()}"))
  return rows


def main_job_sigterm():
  command = [sys.executable, "-m", "dgnopt_jax.train", "--model", "mlp", "--optimizers",
             "sgd,fne-sgd", "--steps", "600", "--eval-every", "200", "--seeds", "1",
             "--checkpoint-every", "10"]
  with tempfile.TemporaryDirectory() as tmp:
    whole, parts = os.path.join(tmp, "whole"), os.path.join(tmp, "parts")
    subprocess.run(command + ["--out", whole], cwd=ROOT, capture_output=True, check=True)
    job = subprocess.Popen(command + ["--out", parts], cwd=ROOT, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True)
    while not glob.glob(os.path.join(parts, "*", "checkpoints", "01-seed0.msgpack")):
      time.sleep(0.005)
    job.send_signal(signal.SIGTERM)
    out, _ = job.communicate()
    stopped = out.strip().splitlines()[-1]
    subprocess.run(command + ["--out", parts], cwd=ROOT, capture_output=True, check=True)
    records = [json.load(open(glob.glob(os.path.join(d, "*-digits-mlp", "record.json"))[0]))
               for d in (whole, parts)]
  keys = ("optimizer", "seed", "steps", "final_train_loss", "test_accuracy_pct", "skipped")
  same = all(all(a[k] == b[k] for k in keys) and
             [(p["train_loss"], p["test_accuracy_pct"]) for p in a["curve"]] ==
             [(p["train_loss"], p["test_accuracy_pct"]) for p in b["curve"]]
             for a, b in zip(records[0]["runs"], records[1]["runs"]))
  return ("SIGTERM while fne-sgd trains (after sgd finished), then the same command",
          "main job", f"exit {job.returncode}: {stopped.split(' checkpointed in ')[0]}; the "
          "rerun's record "
          f"equals the uninterrupted run's (losses, accuracies, skipped steps): {same}")


SCENARIOS = [nan_in_batch, inf_loss, label_out_of_range, zero_curvature,
             singular_kronecker_factor, huge_learning_rate, bf16_params, restore_mid_run,
             raise_policy, bad_batch_shape, integer_inputs, inputs_as_a_list, bad_learning_rates,
             curvature_class, negative_layer_size, python_branch_in_a_module, mismatched_state,
             mixed_precision_players, schedule_nan_at_start, schedule_nan_later,
             damping_schedule_nan, rmsprop_decay_nan, nan_params, kfac_zero_damping,
             trust_region_floor, checkpoint_faults, main_job_arguments, main_job_sigterm]


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--write", default=None, help="also write the table to this markdown file")
  args = p.parse_args(argv)
  # The stalls raise from a host callback, which JAX also logs with a traceback.
  for logger in ("jax._src.callback", "jax._src.debugging"):
    logging.getLogger(logger).setLevel(logging.CRITICAL)
  rows = []
  for scenario in SCENARIOS:
    results = scenario()
    for fault, setup, outcome in results if isinstance(results, list) else [results]:
      rows.append(f"| {fault} | {setup} | {outcome.replace('|', '/').replace(chr(10), ' ')} |")
      print(rows[-1], flush=True)
  table = "\n".join(["| fault injected | optimizer | what happened |", "|---|---|---|"] + rows)
  print("\n" + table)
  if args.write:
    header = (
        "# Reliability\n\nFaults injected into training and what happened, produced by\n"
        "`python examples/reliability_faults.py --write docs/RELIABILITY.md` "
        f"(jax {jax.__version__}, {jax.default_backend()}, {platform.machine()}).\n\n"
        "Policy: a step whose loss, update, updated params, learning rate, damping or "
        "curvature statistics are not finite is skipped (`nonfinite=\"skip\"`: zero "
        "updates, statistics unchanged, `state.skipped` incremented, `state.count` not) or "
        "raises (`nonfinite=\"raise\"`); a run whose last `max_consecutive_skips` (50) "
        "steps were all skipped raises, since a skipped step changes nothing and the next "
        "one meets the same params and schedule values; zero or singular curvature is "
        "pseudo-inverted (no step along directions without curvature and damping); "
        "`(I − S)` is clamped before its square root; params keep their dtype. Bad input "
        "(hyper-parameters, layer sizes, batches, optimizer states, mixed player dtypes, "
        "checkpoints that do not fit, main-job arguments) is refused before any work with "
        "an error that names it. A learning rate of 1e6 keeps the params finite but the "
        "run is lost; the Kronecker curvatures refuse damping 0.\n\n")
    os.makedirs(os.path.dirname(os.path.abspath(args.write)), exist_ok=True)
    with open(args.write, "w") as f:
      f.write(header + table + "\n")
    print(f"\nwrote {args.write}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
