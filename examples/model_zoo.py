"""Models written the way Flax users write them, trained as traced games beside optax.adam.

    python examples/model_zoo.py [--steps 400] [--quick] [--models cnn,transformer]
        [--optimizers adam,fne-adam,gr-adam] [--batch-size 32] [--seed 0]

Two custom Flax linen modules, neither written in this library's vocabulary:

* ``cnn``: a ``@nn.compact`` CNN on DIGITS 8x8x1 images (``dgnopt_jax.datasets``):
  a 3x3 convolution, an inline residual block ``x + conv(relu(conv(x)))``,
  ``nn.max_pool`` 2x2 and a dense classifier;
* ``transformer``: a small transformer classifier on a synthetic token task
  that needs attention, *is the first token repeated later in the sequence*
  (:func:`first_token_repeated`): ``nn.Embed`` plus learned positional
  embeddings (a ``self.param``), two pre-LayerNorm blocks of
  ``nn.MultiHeadDotProductAttention`` and a GELU MLP, a final LayerNorm, mean
  pooling over the sequence and an ``nn.Dense`` head.

Each is turned into a game by ``games.from_function(model.apply, variables,
x, "softmax_cross_entropy")``, which traces the module's ``apply`` and cuts it
into stages (one per layer; the residual streams are carried in the states).
Three optimizers train the same initial variables on the same batches:

* ``adam``: ``optax.adam(lr)`` on ``jax.grad`` of the cross-entropy of
  ``model.apply``, the train step Flax users write;
* ``fne-adam``, ``gr-adam``: ``dgnopt.fne`` / ``dgnopt.gr`` with the Adam
  curvature, built by name (``dgnopt.optimizer_from_name``, e.g.
  ``"fne-adam@0.003"``) with the solvers' defaults (trust region on,
  ``vxx_rank="projected"``, no ``vxx_reg``).

The learning rate is the same for the three on each model (fne-adam and
gr-adam follow Adam's conventions, so the same rate means steps of the same
size): ``--cnn-lr`` (default 1e-2) and ``--transformer-lr`` (default 1e-3),
each the rate of a grid (3e-4 to 3e-2) with adam's lowest final training loss
at the default settings. The grid, run for fne-adam and gr-adam too, and what
it gave are in docs/RESULTS.md ("Custom Flax models traced as games").

Prints progress and a markdown table: final training loss (mean of the last
``--eval-every`` steps), test accuracy, and the step time as a ratio to
adam's, measured in the same run after compilation (the median step).
``--quick`` runs tiny models for a few steps (the tests run it).
"""

from __future__ import annotations

import argparse
import functools
import time
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import dgnopt_jax as dgnopt
from dgnopt_jax import datasets

G = dgnopt.games


# ----------------------------------------------------------------------------
# The models, as Flax users write them.
# ----------------------------------------------------------------------------


class ResidualCNN(nn.Module):
  """A 3x3 convolution, an inline residual block, a 2x2 max pooling and a dense classifier."""

  features: int = 8
  classes: int = 10

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = nn.relu(nn.Conv(self.features, (3, 3))(x))
    x = x + nn.Conv(self.features, (3, 3))(nn.relu(nn.Conv(self.features, (3, 3))(x)))
    x = nn.max_pool(nn.relu(x), (2, 2), strides=(2, 2))
    return nn.Dense(self.classes)(x.reshape((x.shape[0], -1)))


class EncoderBlock(nn.Module):
  """A pre-LayerNorm transformer block: self-attention and a GELU MLP, each a residual."""

  heads: int
  mlp_ratio: int = 2

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = x + nn.MultiHeadDotProductAttention(num_heads=self.heads)(nn.LayerNorm()(x))
    hidden = nn.gelu(nn.Dense(self.mlp_ratio * x.shape[-1])(nn.LayerNorm()(x)))
    return x + nn.Dense(x.shape[-1])(hidden)


class TokenTransformer(nn.Module):
  """Token and learned positional embeddings, pre-LN blocks, mean pooling, a dense head."""

  vocab: int
  length: int
  dim: int = 32
  heads: int = 2
  blocks: int = 2
  classes: int = 2

  @nn.compact
  def __call__(self, tokens: jax.Array) -> jax.Array:
    x = nn.Embed(self.vocab, self.dim)(tokens)
    x = x + self.param("positions", nn.initializers.normal(0.02), (self.length, self.dim))
    for _ in range(self.blocks):
      x = EncoderBlock(self.heads)(x)
    x = nn.LayerNorm()(x)
    return nn.Dense(self.classes)(jnp.mean(x, axis=1))


# ----------------------------------------------------------------------------
# Data.
# ----------------------------------------------------------------------------


def first_token_repeated(count: int, length: int, vocab: int,
                         seed: int) -> tuple[np.ndarray, np.ndarray]:
  """Token sequences labelled 1 if the first token occurs again later, else 0.

  Half of the sequences are of each class (the classes alternate, then the
  order is shuffled). Every token after the first is drawn uniformly from the
  vocabulary without the first token; a positive sequence then gets the first
  token at one uniformly chosen later position. So no token or position is
  informative alone: telling the classes apart needs comparing the first token
  with the others, which a sum of per-position features cannot do.

  Args:
    count: number of sequences.
    length: tokens per sequence (>= 2).
    vocab: vocabulary size (>= 2).
    seed: numpy seed; the same arguments give the same data.

  Returns:
    ``(tokens, labels)``: int32 arrays of shapes ``(count, length)`` and ``(count,)``.
  """
  if length < 2 or vocab < 2:
    raise ValueError(f"need length >= 2 and vocab >= 2, got length {length}, vocab {vocab}")
  rng = np.random.default_rng(seed)
  first = rng.integers(0, vocab, size=count)
  # Uniform over the vocab without ``first``: draw from vocab - 1, skip ``first``.
  rest = rng.integers(0, vocab - 1, size=(count, length - 1))
  rest = rest + (rest >= first[:, None])
  labels = np.arange(count) % 2
  where = rng.integers(0, length - 1, size=count)
  positive = labels == 1
  rest[positive, where[positive]] = first[positive]
  tokens = np.concatenate([first[:, None], rest], axis=1)
  order = rng.permutation(count)
  return tokens[order].astype(np.int32), labels[order].astype(np.int32)


def token_dataset(length: int, vocab: int, train: int, test: int, seed: int) -> datasets.Dataset:
  x_train, y_train = first_token_repeated(train, length, vocab, seed)
  x_test, y_test = first_token_repeated(test, length, vocab, seed + 1)
  return datasets.Dataset("first-token-repeated", x_train, y_train, x_test, y_test, 2)


# ----------------------------------------------------------------------------
# Training.
# ----------------------------------------------------------------------------


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def adam_step(model: nn.Module, learning_rate: float) -> tuple[Callable, Callable]:
  """The train step Flax users write: ``optax.adam`` on ``jax.grad`` of ``model.apply``."""
  tx = optax.adam(learning_rate)

  def step(variables, opt_state, x, y):
    loss, grads = jax.value_and_grad(lambda v: cross_entropy(model.apply(v, x), y))(variables)
    updates, opt_state = tx.update(grads, opt_state, variables)
    return optax.apply_updates(variables, updates), opt_state, loss

  return step, tx.init


def solver_step(name: str, game: G.Game, learning_rate: float) -> tuple[Callable, Callable]:
  """The step of a DGNOpt solver named ``name`` (``fne-adam``, ``gr-adam``, ...)."""
  named = dgnopt.optimizer_from_name(f"{name}@{learning_rate}", game)
  return named.step, named.tx.init


def train(model: nn.Module, label: str, step: Callable, init: Callable, variables: Any,
          data: datasets.Dataset, seed: int, args: argparse.Namespace) -> dict:
  """Trains from ``variables`` on the batches of ``seed``.

  Returns:
    ``{"loss", "acc", "step", "first"}``: the mean training loss of the last
    ``--eval-every`` steps, the final test accuracy, the median step time
    after the first (seconds) and the first step's time (compilation included
    when ``step`` is new).
  """
  opt_state = init(variables)
  x_test, y_test = jnp.asarray(data.x_test), jnp.asarray(data.y_test)
  stream = datasets.batches(data.x_train, data.y_train, args.batch_size, seed=seed)
  losses, times = [], []
  for n in range(1, args.steps + 1):
    x, y = next(stream)
    start = time.perf_counter()
    variables, opt_state, loss = jax.block_until_ready(step(variables, opt_state, x, y))
    times.append(time.perf_counter() - start)
    losses.append(float(loss))
    if n % args.eval_every == 0 or n == args.steps:
      accuracy = float(_accuracy(model, variables, x_test, y_test))
      print(f"{label:>32}  step {n:4d}  train loss {np.mean(losses[-args.eval_every:]):.4f}  "
            f"test acc {100 * accuracy:.2f}%", flush=True)
  return {"loss": float(np.mean(losses[-args.eval_every:])), "acc": accuracy,
          "step": float(np.median(times[1:])) if len(times) > 1 else times[0],
          "first": times[0]}


@functools.partial(jax.jit, static_argnums=0)
def _accuracy(model: nn.Module, variables: Any, x: jax.Array, y: jax.Array) -> jax.Array:
  return jnp.mean(jnp.argmax(model.apply(variables, x), -1) == y)


def build(name: str, args: argparse.Namespace) -> tuple[nn.Module, datasets.Dataset, float]:
  """The model, its data (fixed, whatever the seed) and its learning rate."""
  if name == "cnn":
    data = datasets.load("digits", images=True)
    return ResidualCNN(features=4 if args.quick else 8), data, args.cnn_lr
  length, vocab = (6, 6) if args.quick else (8, 8)
  data = token_dataset(length, vocab, 2048, 512, seed=0)
  model = TokenTransformer(vocab, length, dim=8 if args.quick else 32, heads=2, blocks=2)
  return model, data, args.transformer_lr


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--steps", type=int, default=None, help="steps per run (default 1000; 4 quick)")
  p.add_argument("--seeds", type=int, default=None,
                 help="seeds of the initial params and the batch order (default 2; 1 quick)")
  p.add_argument("--quick", action="store_true", help="tiny models, a few steps (for tests)")
  p.add_argument("--models", default="cnn,transformer", help="comma-separated: cnn, transformer")
  p.add_argument("--optimizers", default="adam,fne-adam,gr-adam",
                 help="comma-separated: adam (optax) and solver names such as fne-adam")
  p.add_argument("--cnn-lr", type=float, default=1e-2)
  p.add_argument("--transformer-lr", type=float, default=1e-3)
  p.add_argument("--batch-size", type=int, default=32)
  p.add_argument("--eval-every", type=int, default=None, help="default: steps / 4")
  args = p.parse_args(argv)
  args.steps = args.steps or (4 if args.quick else 1000)
  args.seeds = args.seeds or (1 if args.quick else 2)
  args.eval_every = args.eval_every or max(1, args.steps // 4)
  args.models = [m.strip() for m in args.models.split(",") if m.strip()]
  args.optimizers = [o.strip() for o in args.optimizers.split(",") if o.strip()]
  bad = [m for m in args.models if m not in ("cnn", "transformer")]
  if bad:
    p.error(f"unknown models {bad}; use cnn, transformer")
  if min(args.steps, args.seeds, args.batch_size) < 1:
    p.error("--steps, --seeds and --batch-size must be >= 1")
  for name in args.optimizers:
    if name != "adam":
      try:
        spec = dgnopt.parse_optimizer_name(name)
      except ValueError as e:
        p.error(str(e))
      if spec.solver is None or spec.learning_rate is not None:
        p.error(f"{name!r}: use adam or a solver name without @lr (the rate is per model)")
  if "adam" in args.optimizers:  # the baseline first: the ratios are to its step time
    args.optimizers.remove("adam")
    args.optimizers.insert(0, "adam")
  return args


def _mean_std(values: list[float], scale: float = 1.0, digits: int = 4) -> str:
  values = scale * np.asarray(values)
  if len(values) == 1:
    return f"{values[0]:.{digits}f}"
  return f"{values.mean():.{digits}f} ± {values.std():.{digits}f}"


def main(argv: list[str] | None = None) -> list[dict]:
  """Runs every model with every optimizer and seed; prints and returns the table's rows."""
  args = parse_args(argv)
  rows = []
  for model_name in args.models:
    model, data, lr = build(model_name, args)
    x0 = jnp.asarray(data.x_train[:args.batch_size])
    initial = [model.init(jax.random.PRNGKey(seed), x0) for seed in range(args.seeds)]
    start = time.perf_counter()
    game = G.from_function(model.apply, initial[0], x0, "softmax_cross_entropy")
    trace_time = time.perf_counter() - start
    size = sum(a.size for a in jax.tree.leaves(initial[0]))
    print(f"{model_name}: {type(model).__name__}, {size} params, traced in {trace_time:.1f} s "
          f"to {len(game.stages)} stages, {len(game.players)} players "
          f"({sum(p.layer is not None for p in game.players)} with Kronecker structure)",
          flush=True)
    for name in args.optimizers:
      step, init = adam_step(model, lr) if name == "adam" else solver_step(name, game, lr)
      step = jax.jit(step)  # compiled once, for every seed
      runs = [train(model, f"{model_name} {name} seed {seed}", step, init, initial[seed], data,
                    seed, args) for seed in range(args.seeds)]
      rows.append({"model": model_name, "optimizer": name, "lr": lr,
                   **{k: [r[k] for r in runs] for k in runs[0]}})
  print(f"\n{args.steps} steps, batch {args.batch_size}, {args.seeds} seed(s) (mean ± std); "
        f"{jax.devices()[0].platform} backend; step time: median over the steps after the "
        "first, ratio to adam's on the same model\n")
  print("| model | optimizer | lr | train loss | test acc (%) | step (ms) | / adam | "
        "compile (s) |")
  print("|---|---|---|---|---|---|---|---|")
  for row in rows:
    step_time = float(np.median(row["step"]))
    base = [r for r in rows if r["model"] == row["model"] and r["optimizer"] == "adam"]
    ratio = f"{step_time / float(np.median(base[0]['step'])):.2f}×" if base else "-"
    print(f"| {row['model']} | {row['optimizer']} | {row['lr']:g} | {_mean_std(row['loss'])} | "
          f"{_mean_std(row['acc'], 100, 2)} | {1e3 * step_time:.2f} | {ratio} | "
          f"{row['first'][0]:.1f} |")
  return rows


if __name__ == "__main__":
  main()
