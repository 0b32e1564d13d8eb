"""Train a network on an embedded dataset with DGNOpt beside its baselines.

    python -m dgnopt_jax.train                       # DIGITS, residual CNN, gr-adam beside adam
    python -m dgnopt_jax.train --model mlp --optimizers sgd,fne-sgd,adam,fne-adam
    python -m dgnopt_jax.train --model cnn --optimizers sgd,fne-sgd --steps 800

Optimizer names (``dgnopt_jax.optimizer_from_name``): ``sgd``, ``rmsprop``,
``adam`` are optax's own (gradients by ``jax.grad``); ``olne-<c>``, ``fne-<c>``
and ``gr-<c>`` are this library's open-loop, feedback-Nash and group-rational
solvers with curvature ``<c>`` in identity (alias sgd), rmsprop, adam, kfac,
ekfac, dense (``olne-kfac`` is KFAC with the empirical Fisher). ``name@lr``
sets one optimizer's learning rate; ``name/N`` with a kfac or ekfac curvature
folds the batch's Kronecker statistics into the running averages every N
steps (``statistics_every``), e.g. ``gr-kfac/5@0.03``.

Every argument and optimizer name is checked before any training; a bad one
is a one-line error and exit status 2. Each invocation writes to its own run
folder, ``<out>/<timestamp>-<dataset>-<model>/`` (``<out>/latest`` links to
it): ``record.json`` (rewritten as each run ends), ``curves.png`` and
``checkpoints/``. Running the same command again continues the last
unfinished run folder of that configuration: finished runs are kept, and the
run in progress continues from its checkpoint exactly as if it had not
stopped (``--no-resume`` starts a new folder). SIGTERM or Ctrl-C checkpoints
the run in progress and exits (status 143 or 130); a second Ctrl-C stops at
once.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import itertools
import json
import logging
import math
import os
import platform
import signal
import statistics
import sys
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm import tqdm

import dgnopt_jax as dgnopt
from dgnopt_jax import datasets
from dgnopt_jax._src import checkpoint as checkpoint_lib

G = dgnopt.games

# The arguments that decide a run's results: a run folder is continued only
# by a command that agrees on all of them.
CONFIG_KEYS = ("dataset", "max_train", "max_test", "model", "alignment", "optimizers", "lr",
               "vxx_reg", "damping", "batch_size", "steps", "eval_every", "seeds")
RECORD = "record.json"
FORMAT = 2  # of record.json


class UsageError(ValueError):
  """A bad argument: reported as one line, exit status 2."""


# ----------------------------------------------------------------------------
# Optimizers and evaluation.
# ----------------------------------------------------------------------------


def build_optimizer(spec: dgnopt.OptimizerName, game: G.Game,
                    args: argparse.Namespace) -> dgnopt.NamedOptimizer:
  """The optimizer ``spec`` names, with ``--lr``, ``--vxx-reg`` and ``--damping``."""
  return dgnopt.optimizer_from_name(spec.name, game, args.lr, vxx_reg=args.vxx_reg,
                                    damping=args.damping)


def accuracy(game: G.Game, params: Any, x: np.ndarray, y: np.ndarray) -> float:
  """Test accuracy in percent."""
  predicted = np.asarray(jnp.argmax(jax.jit(game.apply)(params, x), -1))
  return 100.0 * float(np.mean(predicted == np.asarray(y)))


# ----------------------------------------------------------------------------
# Arguments.
# ----------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
  """argparse with one-line errors: ``train: error: <what> (see --help)``, exit status 2."""

  def error(self, message):
    self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _number(kind: Callable, low: float, strict: bool) -> Callable[[str], Any]:
  def parse(text: str):
    try:
      value = kind(text)
    except ValueError:
      raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, "
                                       f"got {text!r}") from None
    if not math.isfinite(value) or value < low or (strict and value == low):
      raise argparse.ArgumentTypeError(f"must be {'>' if strict else '>='} {low:g}, got {text}")
    return value
  parse.__name__ = "integer" if kind is int else "number"
  return parse


def parse_args(argv=None) -> argparse.Namespace:
  """The arguments (bounds checked here, names and combinations by :func:`check_args`)."""
  p = _Parser(prog="python -m dgnopt_jax.train", description=__doc__.split("\n\n")[0],
              epilog=__doc__.split("\n\n", 2)[2],
              formatter_class=argparse.RawDescriptionHelpFormatter)
  positive_int, count = _number(int, 0, True), _number(int, 0, False)
  add = p.add_argument
  add("--dataset", default="digits", choices=datasets.EMBEDDED + datasets.TFDS, metavar="NAME",
      help="an embedded dataset, or a tensorflow-datasets one read from --data-dir: "
           "%(choices)s (default: %(default)s)")
  add("--data-dir", default=None, metavar="DIR",
      help="tensorflow-datasets data_dir (default: tfds's own, ~/tensorflow_datasets)")
  add("--max-train", type=positive_int, default=None, metavar="N",
      help="keep only the first N training examples (default: all)")
  add("--max-test", type=positive_int, default=None, metavar="N",
      help="keep only the first N test examples (default: all)")
  add("--model", default="resnet", choices=G.NETWORKS, metavar="NAME",
      help="the network: %(choices)s (default: %(default)s)")
  add("--alignment", default="merge", choices=G.RESIDUAL_ALIGNMENTS, metavar="WHERE",
      help="where a residual block's shortcut plays (resnet): %(choices)s "
           "(default: %(default)s)")
  add("--optimizers", default="adam,gr-adam", metavar="NAMES",
      help="comma-separated names [<solver>-]<curvature>[/N][@lr]: optax's sgd, rmsprop, adam, "
           "or olne|fne|gr-identity|sgd|rmsprop|adam|kfac|ekfac|dense, e.g. "
           "sgd,fne-sgd@0.05,gr-kfac/5@0.03; the first is the step-time baseline "
           "(default: %(default)s)")
  add("--lr", type=_number(float, 0, True), default=None, metavar="LR",
      help="one learning rate for names without @lr (default per curvature: "
           + ", ".join(f"{k} {v:g}" for k, v in dgnopt.DEFAULT_LEARNING_RATES.items()
                       if k != "sgd") + ")")
  add("--vxx-reg", type=_number(float, 0, False), default=0.0, metavar="EPS",
      help="Tikhonov term on V_xx for fne/gr (default: %(default)s)")
  add("--damping", type=_number(float, 0, False), default=None, metavar="D",
      help="Tikhonov term on the curvature (default per curvature: 0; kfac/ekfac 0.1, which "
           "need > 0; dense 1e-3)")
  add("--batch-size", type=positive_int, default=32, metavar="N",
      help="examples per step (default: %(default)s)")
  add("--steps", type=positive_int, default=1500, metavar="N",
      help="training steps per run (default: %(default)s)")
  add("--eval-every", type=positive_int, default=250, metavar="N",
      help="steps between test evaluations; the last step is always evaluated "
           "(default: %(default)s)")
  add("--seeds", type=positive_int, default=2, metavar="N",
      help="number of seeds, 0..n-1, per optimizer (default: %(default)s)")
  add("--out", default="runs", metavar="DIR",
      help="folder of the run folders (default: %(default)s)")
  add("--checkpoint-every", type=count, default=250, metavar="N",
      help="steps between checkpoints of the run in progress; 0: only when interrupted "
           "(default: %(default)s)")
  add("--resume", action=argparse.BooleanOptionalAction, default=True,
      help="continue the last unfinished run folder of the same configuration in --out "
           "(default: on)")
  add("--lapack-threads", type=count, default=1, metavar="N",
      help="threads of the host LAPACK behind KFAC/EKFAC's eigh on a CPU "
           "(dgnopt_jax.limit_lapack_threads); 0 leaves OpenBLAS's own default "
           "(default: %(default)s)")
  return p.parse_args(argv)


def check_args(args: argparse.Namespace) -> list[dgnopt.OptimizerName]:
  """The optimizers, after checking the names and the arguments' combinations.

  Raises:
    UsageError: an unknown or malformed optimizer name, a name given twice,
      or an image model on a dataset without images.
  """
  names = [o.strip() for o in args.optimizers.split(",")]
  if not any(names):
    raise UsageError("--optimizers is empty; give one or more names, e.g. adam,gr-adam")
  specs = []
  for name in names:
    try:
      specs.append(dgnopt.parse_optimizer_name(name))
    except ValueError as e:
      raise UsageError(f"--optimizers: {e}") from None
  seen = [s.name for s in specs]
  if len(set(seen)) != len(seen):
    raise UsageError(f"--optimizers names {sorted({n for n in seen if seen.count(n) > 1})} "
                     "more than once")
  if args.model in G.IMAGE_NETWORKS and args.dataset not in ("digits",) + datasets.TFDS:
    raise UsageError(f"--model {args.model} needs an image dataset: digits (8x8) or one of "
                     f"{', '.join(datasets.TFDS)}")
  return specs


def config_of(args: argparse.Namespace, specs: list[dgnopt.OptimizerName]) -> dict:
  """The arguments that decide the results (:data:`CONFIG_KEYS`), optimizers as a list."""
  config = {k: getattr(args, k) for k in CONFIG_KEYS}
  config["optimizers"] = [s.name for s in specs]
  return config


# ----------------------------------------------------------------------------
# The run folder.
# ----------------------------------------------------------------------------


def _now() -> str:
  return datetime.datetime.now().astimezone().isoformat(timespec="seconds")


def _json_safe(value: Any) -> Any:
  """Non-finite floats as null (strict JSON), numpy scalars as Python numbers."""
  if isinstance(value, dict):
    return {k: _json_safe(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_json_safe(v) for v in value]
  if isinstance(value, (np.floating, float)):
    return float(value) if math.isfinite(value) else None
  if isinstance(value, np.integer):
    return int(value)
  return value


def write_json(path: str, record: dict) -> None:
  checkpoint_lib.atomic_write(path, json.dumps(_json_safe(record), indent=1,
                                               allow_nan=False).encode())


def _read_record(folder: str) -> dict | None:
  try:
    with open(os.path.join(folder, RECORD)) as f:
      return json.load(f)
  except (OSError, ValueError):
    return None


def find_unfinished(out: str, config: dict) -> str | None:
  """The newest run folder in ``out`` whose record has ``config`` and is not complete."""
  if not os.path.isdir(out):
    return None
  suffix = f"-{config['dataset']}-{config['model']}"
  for entry in sorted(os.listdir(out), reverse=True):
    folder = os.path.join(out, entry)
    if entry.endswith(suffix) and not os.path.islink(folder) and os.path.isdir(folder):
      record = _read_record(folder)
      if record and record.get("config") == config and not record.get("complete"):
        return folder
  return None


def new_run_folder(out: str, config: dict) -> str:
  stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
  base = os.path.join(out, f"{stamp}-{config['dataset']}-{config['model']}")
  folder, n = base, 1
  while os.path.exists(folder):
    n += 1
    folder = f"{base}-{n}"
  os.makedirs(folder)
  return folder


def link_latest(out: str, folder: str) -> None:
  """Points ``<out>/latest`` at ``folder`` (where symbolic links exist)."""
  link = os.path.join(out, "latest")
  tmp = f"{link}.tmp-{os.getpid()}"
  try:
    if os.path.lexists(tmp):
      os.remove(tmp)
    os.symlink(os.path.basename(folder), tmp)
    os.replace(tmp, link)
  except OSError:  # no symbolic links here; the folder is printed instead
    if os.path.lexists(tmp):
      os.remove(tmp)


@contextlib.contextmanager
def folder_lock(folder: str):
  """Holds ``<folder>/run.lock`` with this process's id; refuses a folder a live process holds."""
  path = os.path.join(folder, "run.lock")
  try:
    with open(path) as f:
      pid = int(f.read().strip() or 0)
  except (OSError, ValueError):
    pid = 0
  if pid and pid != os.getpid():
    try:
      os.kill(pid, 0)
      alive = True
    except ProcessLookupError:
      alive = False
    except PermissionError:
      alive = True
    if alive:
      raise UsageError(f"{folder} is in use by process {pid}; wait for it, or use --no-resume")
  with open(path, "w") as f:
    f.write(str(os.getpid()))
  try:
    yield
  finally:
    with contextlib.suppress(OSError):
      os.remove(path)


def environment() -> dict:
  """Library and JAX versions, the device and the machine."""
  import flax  # pylint: disable=g-import-not-at-top  (a dependency; only its version is read)
  import jaxlib  # pylint: disable=g-import-not-at-top
  device = jax.devices()[0]
  return {"dgnopt_jax": dgnopt.__version__, "jax": jax.__version__,
          "jaxlib": jaxlib.__version__, "optax": optax.__version__, "flax": flax.__version__,
          "numpy": np.__version__, "python": platform.python_version(),
          "backend": jax.default_backend(), "device": device.device_kind,
          "devices": len(jax.devices()), "machine": platform.platform()}


# ----------------------------------------------------------------------------
# Training.
# ----------------------------------------------------------------------------


class Stop:
  """The signal that asked the job to stop (SIGTERM, SIGINT), set by a handler."""

  def __init__(self):
    self.signum = 0

  def __call__(self, signum, frame):
    del frame
    self.signum = signum
    # A second one stops at once.
    signal.signal(signum, signal.default_int_handler if signum == signal.SIGINT
                  else signal.SIG_DFL)


class Interrupted(Exception):
  """Training stopped on a signal; the run in progress is checkpointed."""


def _run_name(index: int, seed: int) -> str:
  return f"{index:02d}-seed{seed}"


def _eval_steps(steps: int, every: int) -> list[int]:
  return sorted(set(range(every, steps + 1, every)) | {steps})


def train_run(spec: dgnopt.OptimizerName, index: int, seed: int, game: G.Game,
              data: datasets.Dataset, args: argparse.Namespace, folder: str, stop: Stop,
              overall: tqdm) -> dict:
  """One optimizer on one seed, from its checkpoint if there is one; returns its record.

  The checkpoint holds the params, the optimizer state, the step, and every
  per-step value recorded so far, so that a resumed run's record equals an
  uninterrupted one's (the batches are the same: the stream is the seed's,
  advanced past the steps already taken).

  Raises:
    Interrupted: ``stop`` was set; the run is checkpointed at its last step.
  """
  optimizer = build_optimizer(spec, game, args)
  step_fn, lr = jax.jit(optimizer.step), optimizer.learning_rate
  params = game.init(jax.random.PRNGKey(seed))
  state = optimizer.tx.init(params)
  evals = _eval_steps(args.steps, args.eval_every)
  saved = {"params": params, "opt_state": state, "step": 0,
           "losses": np.full(args.steps, np.nan), "skipped": np.zeros(args.steps, np.int32),
           "rejected": np.zeros(args.steps, np.int32), "step_times": np.zeros(args.steps),
           "accuracy": np.full(len(evals), np.nan)}
  path = os.path.join(folder, "checkpoints", _run_name(index, seed) + ".msgpack")
  resumed = None
  if os.path.exists(path):
    saved = dgnopt.checkpoint.restore(path, saved)
    resumed = int(saved["step"])
  params, state, start = saved["params"], saved["opt_state"], int(saved["step"])
  losses, skipped, rejected = saved["losses"].copy(), saved["skipped"].copy(), \
      saved["rejected"].copy()
  step_times, acc = saved["step_times"].copy(), saved["accuracy"].copy()

  def checkpoint(done: int) -> None:
    dgnopt.checkpoint.save(path, {"params": params, "opt_state": state, "step": done,
                                  "losses": losses, "skipped": skipped, "rejected": rejected,
                                  "step_times": step_times, "accuracy": acc})

  stream = datasets.batches(data.x_train, data.y_train, args.batch_size, seed=seed)
  stream = itertools.islice(stream, start, None)  # the batches of the steps already taken
  x, y = next(stream)
  t0 = time.perf_counter()
  compiled = step_fn.lower(params, state, x, y).compile()
  compile_s = time.perf_counter() - t0
  counts = (lambda s: (int(s.skipped), int(s.rejected))) if spec.solver else (lambda s: (0, 0))
  before = counts(state) if start else (0, 0)
  label = f"{spec.name} seed {seed}"
  bar = tqdm(total=args.steps, initial=start, desc=label, unit="step", leave=False,
             dynamic_ncols=True, disable=overall.disable, position=1, mininterval=0.5)
  reached, error = start, None
  with bar:
    for i in range(start + 1, args.steps + 1):
      if stop.signum:
        checkpoint(reached)
        raise Interrupted(f"{label} at step {reached}")
      if i > start + 1:
        x, y = next(stream)
      t = time.perf_counter()
      try:
        params, state, loss = compiled(params, state, x, y)
        loss = float(loss)
      except (jax.errors.JaxRuntimeError, FloatingPointError) as e:
        error = error_summary(e)
        tqdm.write(f"  {label}: stopped at step {i}: {error}")
        break
      step_times[i - 1] = time.perf_counter() - t
      losses[i - 1], reached = loss, i
      now = counts(state)
      skipped[i - 1], rejected[i - 1] = now[0] - before[0], now[1] - before[1]
      before = now
      bar.update(1)
      overall.update(1)
      bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
      if i in evals:
        k = evals.index(i)
        acc[k] = accuracy(game, params, data.x_test, data.y_test)
        rate = (i - start) / max(float(np.sum(step_times[start:i])), 1e-9)
        tqdm.write(f"  {label:>24} step {i:5d}/{args.steps}  loss "
                   f"{np.mean(losses[(evals[k - 1] if k else 0):i]):.4f}  test {acc[k]:6.2f} %  "
                   f"{rate:7.1f} steps/s  run ETA "
                   f"{tqdm.format_interval((args.steps - i) / rate)}")
      if args.checkpoint_every and i % args.checkpoint_every == 0:
        checkpoint(i)
  checkpoint(reached)  # the trained params, for whoever wants them
  return run_record(spec, seed, lr, evals, losses[:reached], acc, skipped[:reached],
                    rejected[:reached], step_times[:reached], compile_s, resumed, error)


def error_summary(e: BaseException) -> str:
  """The error's own message (JAX wraps a callback's error in its traceback)."""
  text = str(e)
  for marker in ("DGNOpt run stalled", "DGNOpt step is not finite"):
    if marker in text:
      text = text[text.index(marker):]
  return text.strip().splitlines()[0] if text.strip() else type(e).__name__


def run_record(spec: dgnopt.OptimizerName, seed: int, lr: float, evals: list[int],
               losses: np.ndarray, acc: np.ndarray, skipped: np.ndarray, rejected: np.ndarray,
               step_times: np.ndarray, compile_s: float, resumed: int | None,
               error: str | None) -> dict:
  """A run's JSON record: the curve at the evaluation steps it reached, totals, timing."""
  curve, last = [], 0
  for k, s in enumerate(evals):
    if s > len(losses):
      break
    curve.append({"step": s, "train_loss": float(np.mean(losses[last:s])),
                  "test_accuracy_pct": float(acc[k]), "skipped": int(np.sum(skipped[:s])),
                  "rejected": int(np.sum(rejected[:s])),
                  "train_time_s": float(np.sum(step_times[:s]))})
    last = s
  warm = step_times[min(10, max(len(step_times) - 1, 0)):]
  return {"optimizer": spec.name, "seed": seed, "learning_rate": lr, "steps": len(losses),
          "curve": curve,
          "final_train_loss": curve[-1]["train_loss"] if curve else None,
          "test_accuracy_pct": curve[-1]["test_accuracy_pct"] if curve else None,
          "skipped": int(np.sum(skipped)), "rejected": int(np.sum(rejected)),
          "skipped_steps": [int(s) + 1 for s in np.flatnonzero(skipped)],
          "step_time_s": float(statistics.median(warm)) if len(warm) else None,
          "train_time_s": float(np.sum(step_times)), "compile_time_s": compile_s,
          "resumed_at_step": resumed, "error": error}


def _summary_row(name: str, runs: list[dict]) -> dict:
  """One optimizer's mean and standard deviation over its seeds (runs that reached a curve)."""
  mine = [r for r in runs if r["optimizer"] == name]
  good = [r for r in mine if r["test_accuracy_pct"] is not None]
  acc = [r["test_accuracy_pct"] for r in good]
  loss = [r["final_train_loss"] if r["final_train_loss"] is not None else np.inf for r in good]
  times = [r["step_time_s"] for r in mine if r["step_time_s"] is not None]
  nan = float("nan")
  return {"optimizer": name, "learning_rate": mine[0]["learning_rate"],
          "train_loss": float(np.mean(loss)) if loss else nan,
          "train_loss_std": float(np.std(loss)) if loss else nan,
          "test_accuracy_pct": float(np.mean(acc)) if acc else nan,
          "test_accuracy_pct_std": float(np.std(acc)) if acc else nan,
          "step_time_ms": 1e3 * statistics.median(times) if times else nan,
          "skipped": sum(r["skipped"] for r in mine),
          "failed": sum(r["error"] is not None for r in mine)}


def summarise(runs: list[dict], optimizers: list[str]) -> tuple[str, list[dict]]:
  """The markdown result table (mean ± std over seeds) and its rows."""
  with np.errstate(invalid="ignore"):  # a diverged run's inf loss has no spread
    rows = [_summary_row(name, runs) for name in optimizers]
  for row in rows:
    row["step_time_ratio"] = row["step_time_ms"] / rows[0]["step_time_ms"]
  lines = [f"| optimizer | lr | train loss | test acc (%) | step time (ms) | / {optimizers[0]} "
           "| skipped |", "|---|---|---|---|---|---|---|"]
  for r in rows:
    failed = f" ({r['failed']} failed)" if r["failed"] else ""
    lines.append(f"| {r['optimizer']} | {r['learning_rate']:g} | {r['train_loss']:.4f} ± "
                 f"{r['train_loss_std']:.4f} | {r['test_accuracy_pct']:.2f} ± "
                 f"{r['test_accuracy_pct_std']:.2f} | {r['step_time_ms']:.2f} | "
                 f"{r['step_time_ratio']:.2f}× | {r['skipped']}{failed} |")
  return "\n".join(lines), rows


def plot(runs: list[dict], optimizers: list[str], path: str) -> bool:
  """Train loss against steps and against training time, test accuracy against steps.

  Lines are the mean over seeds, bands span the seeds (min to max); the
  training time excludes compilation and evaluation.
  """
  try:
    import matplotlib  # pylint: disable=g-import-not-at-top
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  except ImportError:
    print("matplotlib is not installed: no plot written")
    return False
  fig, axes = plt.subplots(1, 3, figsize=(15, 4))
  for name in optimizers:
    curves = [r["curve"] for r in runs if r["optimizer"] == name and r["curve"]]
    if not curves:
      continue
    n = min(len(c) for c in curves)
    field = lambda key: np.array([[p[key] if p[key] is not None else np.nan for p in c[:n]]
                                  for c in curves], float)
    steps = [p["step"] for p in curves[0][:n]]
    loss, acc, secs = field("train_loss"), field("test_accuracy_pct"), field("train_time_s")
    for ax, xs, ys in ((axes[0], steps, loss), (axes[1], np.mean(secs, 0), loss),
                       (axes[2], steps, acc)):
      line, = ax.plot(xs, np.mean(ys, 0), label=name)
      if len(curves) > 1:
        ax.fill_between(xs, np.min(ys, 0), np.max(ys, 0), color=line.get_color(), alpha=0.2)
  axes[0].set(xlabel="step", ylabel="train loss", yscale="log")
  axes[1].set(xlabel="training time (s, compile excluded)", ylabel="train loss", yscale="log")
  axes[2].set(xlabel="step", ylabel="test accuracy (%)")
  axes[2].legend()
  fig.suptitle("mean over seeds; bands span the seeds")
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return True


def _error(message: str) -> int:
  print(f"python -m dgnopt_jax.train: error: {message}", file=sys.stderr)
  return 2


def main(argv=None) -> int:
  args = parse_args(argv)
  try:
    specs = check_args(args)
  except UsageError as e:
    return _error(str(e))
  config = config_of(args, specs)
  names = config["optimizers"]
  images = args.model in G.IMAGE_NETWORKS
  try:
    data = datasets.load(args.dataset, images=images, data_dir=args.data_dir,
                         max_train=args.max_train, max_test=args.max_test)
  except (ValueError, OSError, ImportError) as e:
    return _error(f"--dataset {args.dataset}: {error_summary(e)}")
  if args.batch_size > len(data.x_train):
    return _error(f"--batch-size {args.batch_size} exceeds the {len(data.x_train)} training "
                  "examples")
  game = G.network_from_name(args.model, data.x_train.shape[1:], data.num_classes,
                              args.alignment)
  for spec in specs:  # every transformation is built (and checked) before any training
    try:
      build_optimizer(spec, game, args)
    except (ValueError, TypeError) as e:
      return _error(f"{spec.name}: {error_summary(e)}")
  folder = find_unfinished(args.out, config) if args.resume else None
  record = _read_record(folder) if folder else None
  try:
    if folder is None:
      folder = new_run_folder(args.out, config)
    probe = os.path.join(folder, ".writable")
    checkpoint_lib.atomic_write(probe, b"")
    os.remove(probe)
  except OSError as e:
    return _error(f"--out {args.out}: cannot write there ({e.strerror or e})")
  link_latest(args.out, folder)
  if args.lapack_threads and jax.default_backend() == "cpu":
    dgnopt.limit_lapack_threads(args.lapack_threads)

  if record is None or record.get("format") != FORMAT:
    record = {"format": FORMAT, "config": config, "arguments": vars(args),
              "seeds": list(range(args.seeds)),
              "command": " ".join(["python -m dgnopt_jax.train"] +
                                  list(sys.argv[1:] if argv is None else argv)),
              "environment": environment(), "started": _now(), "finished": None,
              "complete": False, "units": {"accuracy": "percent of the test set",
                                           "train_loss": "mean batch loss since the last "
                                           "evaluation", "time": "seconds"},
              "runs": [], "summary": None}
  else:
    record.setdefault("resumed", []).append({"at": _now(), "environment": environment()})
  done = {(r["optimizer"], r["seed"]) for r in record["runs"]}
  todo = [(s, i, spec) for s in range(args.seeds) for i, spec in enumerate(specs)
          if (spec.name, s) not in done]
  print(f"dgnopt_jax {dgnopt.__version__} | jax {jax.__version__} on {jax.default_backend()} | "
        f"{args.dataset}: {len(data.x_train)} train / {len(data.x_test)} test | model "
        f"{args.model} | batch {args.batch_size} | {args.steps} steps | seeds {args.seeds}",
        flush=True)
  print(f"run folder {folder}" + (f" (continuing: {len(done)} of "
                                   f"{len(done) + len(todo)} runs done)" if done else ""),
        flush=True)
  stop = Stop()
  handlers = {s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGINT)}
  # A run that stalls raises from a host callback, which JAX also logs with its
  # traceback; the job reports the error itself, in one line and in the record.
  logging.getLogger("jax._src.callback").setLevel(logging.CRITICAL)
  interrupted = None
  try:
    with folder_lock(folder):
      write_json(os.path.join(folder, RECORD), record)
      overall = tqdm(total=len(todo) * args.steps, desc="all runs", unit="step",
                     dynamic_ncols=True, position=0, mininterval=0.5,
                     disable=not sys.stderr.isatty())
      with overall:
        for seed, index, spec in todo:
          if stop.signum:
            interrupted = f"before {spec.name} seed {seed}; nothing to checkpoint"
            break
          try:
            run = train_run(spec, index, seed, game, data, args, folder, stop, overall)
          except Interrupted as e:
            interrupted = str(e)
            break
          record["runs"].append(run)
          record["runs"].sort(key=lambda r: (r["seed"], names.index(r["optimizer"])))
          write_json(os.path.join(folder, RECORD), record)
      if interrupted is None:
        table, rows = summarise(record["runs"], names)
        record.update(summary=rows, complete=True, finished=_now())
        write_json(os.path.join(folder, RECORD), record)
  except UsageError as e:
    return _error(str(e))
  finally:
    for s, h in handlers.items():
      signal.signal(s, h)
  if interrupted is not None:
    print(f"\ninterrupted ({signal.Signals(stop.signum).name}): {interrupted} checkpointed in "
          f"{folder}; run the same command again to continue", flush=True)
    return 128 + stop.signum
  print("\n" + table)
  wrote = plot(record["runs"], names, os.path.join(folder, "curves.png"))
  failed = [f"{r['optimizer']} seed {r['seed']}" for r in record["runs"] if r["error"]]
  print(f"\nwrote {os.path.join(folder, RECORD)}" +
        (f" and {os.path.join(folder, 'curves.png')}" if wrote else ""))
  if failed:
    print(f"{len(failed)} run(s) stopped early ({', '.join(failed)}); see their 'error' in "
          "the record", file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main())
