"""What the experiment scripts share: optimizers by name, training runs, tables.

Optimizer names are :func:`dgnopt_jax.optimizer_from_name`'s: ``sgd``,
``rmsprop``, ``adam`` are optax's own on ``jax.grad`` of the batch loss;
``olne-<c>``, ``fne-<c>``, ``gr-<c>`` this library's solvers with curvature
``<c>`` (``sgd`` = identity, rmsprop, adam, kfac, ekfac, dense).
"""

from __future__ import annotations

import json
import os
import platform

import jax
import jax.numpy as jnp
import numpy as np
import optax

import dgnopt_jax as dgnopt
from dgnopt_jax import datasets

G = dgnopt.games


def add_data_arguments(parser) -> None:
  """Adds ``--data-dir``, ``--max-train`` and ``--max-test`` (see :func:`load_data`) to a parser."""
  parser.add_argument("--data-dir", default=None,
                      help="tensorflow-datasets data_dir (default: tfds's own, "
                      "~/tensorflow_datasets)")
  parser.add_argument("--max-train", type=int, default=None,
                      help="keep only the first N training examples")
  parser.add_argument("--max-test", type=int, default=None,
                      help="keep only the first N test examples")


def load_data(name: str, args, images: bool) -> datasets.Dataset:
  """:func:`datasets.load` of ``name`` with the arguments of :func:`add_data_arguments`."""
  return datasets.load(name, images=images, data_dir=args.data_dir, max_train=args.max_train,
                       max_test=args.max_test)


def make_update(game: G.Game, name: str, lr: float, vxx_reg: float = 0.0,
                vxx_rank: str | None = None, trust_region: bool = True):
  """``(init, update)`` of an optimizer name; ``update(params, state, (x, y)) -> (params, state, loss)``.

  ``vxx_reg``, ``vxx_rank`` and ``trust_region`` are passed to the solvers
  (:func:`dgnopt_jax.optimizer_from_name`); ``vxx_rank=None`` keeps the solvers' default.
  """
  options = {"vxx_reg": vxx_reg, "trust_region": trust_region}
  if vxx_rank is not None:
    options["vxx_rank"] = vxx_rank
  optimizer = dgnopt.optimizer_from_name(name, game, lr, **options)

  def update(params, state, batch):
    return optimizer.step(params, state, *batch)

  return optimizer.tx.init, update


def transform_update(tx, validation: bool = False):
  """``(init, update)`` of a DGNOpt transformation (``update`` as :func:`make_update`'s).

  With ``validation`` the batch is ``(x, y, x_val, y_val)`` and the last two
  are passed as ``validation_batch`` (:func:`dgnopt_jax.aligned`).
  """
  def update(params, state, batch):
    extra = {"validation_batch": batch[2:]} if validation else {}
    updates, state = tx.update(None, state, params, batch=batch[:2], **extra)
    return optax.apply_updates(params, updates), state, state.loss

  return tx.init, update


# The runs below loop over jit-compiled steps in Python: XLA on CPU runs a
# convolutional step inside a scan over the whole run 2-4x slower than the
# same step compiled alone (residual CNN, batch 32: 36 vs 9 ms for SGD).


def make_run(game: G.Game, name: str, lr: float, vxx_reg: float = 0.0,
             vxx_rank: str | None = None, trust_region: bool = True):
  """A whole training run: ``(params, xs, ys) -> params`` after ``len(xs)`` jit-compiled steps."""
  init, update = make_update(game, name, lr, vxx_reg, vxx_rank, trust_region)
  step = jax.jit(update)

  def run(params, xs, ys):
    state = init(params)
    for x, y in zip(xs, ys):
      params, state, _ = step(params, state, (x, y))
    return params

  return run


def make_curve_run(init, update, test_accuracy, every: int):
  """A training run that evaluates every ``every`` steps.

  Args:
    init, update: as returned by :func:`make_update` / :func:`transform_update`.
    test_accuracy: ``params -> accuracy in [0, 1]`` (jit-compiled here).
    every: steps between evaluations; the stream's length must be a multiple.

  Returns:
    ``run(params, stream) -> (params, state, accuracy, loss)`` where ``stream`` is
    the batches stacked on a leading steps axis, ``state`` the optimizer's
    final state, ``accuracy[i]`` the test accuracy after ``(i + 1) * every``
    steps and ``loss[i]`` the mean batch loss of those ``every`` steps.
  """
  step = jax.jit(update)
  evaluate_params = jax.jit(test_accuracy)

  def run(params, stream):
    steps = len(jax.tree.leaves(stream)[0])
    if steps % every:
      raise ValueError(f"the stream's {steps} steps are not a multiple of every={every}")
    stream = jax.tree.map(np.asarray, stream)
    state, accuracy, losses = init(params), [], []
    for i in range(steps):
      params, state, loss = step(params, state, jax.tree.map(lambda a: a[i], stream))
      losses.append(loss)
      if (i + 1) % every == 0:
        accuracy.append(evaluate_params(params))
    loss = np.asarray(jnp.stack(losses)).reshape(-1, every).mean(axis=1)
    return params, state, np.asarray(jnp.stack(accuracy)), loss

  return run


def accuracy_on(game: G.Game, data: datasets.Dataset):
  """``params -> test accuracy`` of ``game`` on ``data``'s test split (traceable)."""
  x, y = jnp.asarray(data.x_test), jnp.asarray(data.y_test)
  return lambda params: dgnopt.bandits.accuracy(game.apply(params, x), y)


def steps_to(accuracy: np.ndarray, target: float, every: int) -> float:
  """The first evaluated step at which ``accuracy >= target`` (inf if never)."""
  hit = np.flatnonzero(np.asarray(accuracy) >= target)
  return float((hit[0] + 1) * every) if len(hit) else float("inf")


def batch_streams(data: datasets.Dataset, batch_size: int, steps: int, seeds: int) -> list:
  """Per seed, the ``(xs, ys)`` of ``steps`` batches (:func:`datasets.batches` with that seed)."""
  streams = []
  for seed in range(seeds):
    stream = datasets.batches(data.x_train, data.y_train, batch_size, seed=seed)
    xs, ys = zip(*(next(stream) for _ in range(steps)))
    streams.append((jnp.asarray(np.stack(xs)), jnp.asarray(np.stack(ys))))
  return streams


def evaluate(game: G.Game, params, data: datasets.Dataset) -> tuple[float, float]:
  """(test accuracy in %, mean training loss over the whole training set)."""
  logits = game.apply(params, jnp.asarray(data.x_test))
  accuracy = 100.0 * float(jnp.mean(jnp.argmax(logits, -1) == data.y_test))
  train_logits = game.apply(params, jnp.asarray(data.x_train))
  loss = float(jnp.mean(jax.vmap(game.loss.per_sample)(train_logits, jnp.asarray(data.y_train))))
  return accuracy, loss


def seeds_of(game: G.Game, run, streams: list, data: datasets.Dataset) -> dict:
  """``{"accuracy": [...], "loss": [...]}`` of a run from each seed's init and batches."""
  accuracy, loss = [], []
  for seed, (xs, ys) in enumerate(streams):
    params = run(game.init(jax.random.PRNGKey(seed)), xs, ys)
    acc, train_loss = evaluate(game, params, data)
    accuracy.append(acc)
    loss.append(train_loss)
  return {"accuracy": accuracy, "loss": loss}


def mean_std(values: list[float], digits: int) -> str:
  """``mean ± std`` over the finite values, with the count of diverged runs (non-finite)."""
  values = np.asarray(values, float)
  finite = values[np.isfinite(values)]
  if not len(finite):
    return f"all {len(values)} diverged"
  tail = f" ({len(values) - len(finite)} diverged)" if len(finite) < len(values) else ""
  if abs(finite.mean()) >= 1e4:  # a run that blew up without overflowing
    return f"{finite.mean():.3g} ± {finite.std():.3g}{tail}"
  return f"{finite.mean():.{digits}f} ± {finite.std():.{digits}f}{tail}"


def write_outputs(out: str, table: str, args, results: list[dict]) -> None:
  """Prints ``table``, writes it to ``<out>.md`` and the per-seed ``results`` to ``<out>.json``."""
  print("\n" + table)
  os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
  with open(out + ".md", "w") as f:
    f.write(table)
  record = {"args": vars(args), "machine": platform.platform(), "jax": jax.__version__,
            "results": results}
  with open(out + ".json", "w") as f:
    json.dump(record, f, indent=1)
  print(f"wrote {out}.md and {out}.json")
