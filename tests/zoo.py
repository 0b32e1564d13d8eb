"""The model zoo: networks written the way JAX and Flax users write them.

None of them but ``models.resnet18`` uses this library's vocabulary;
``games.from_function`` traces each, the networks with train-mode BatchNorm
(:data:`BATCH_STATISTICS`) through their train-mode forward pass. ``tests/test_model_zoo.py`` checks every one against independent
computations, ``tests/test_traced_games.py`` how the tracer cuts them.

Each entry of :data:`CASES` is a :class:`Case`: the function, a params maker
(``make_params(dtype, seed)``) and an input maker (``make_input(batch,
seed)``, float64 features or int32 token ids).
"""

import importlib.util
import pathlib
import sys
from typing import Any, Callable, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from dgnopt_jax import models
import helpers as h

ROOT = pathlib.Path(__file__).resolve().parents[1]


def load_example(name: str) -> Any:
  """``examples/<name>.py`` as the module ``examples.<name>`` (loaded once).

  It is registered in ``sys.modules`` before it runs: Flax modules are
  dataclasses, which look their module up there.
  """
  qualified = f"examples.{name}"
  if qualified not in sys.modules:
    spec = importlib.util.spec_from_file_location(qualified, ROOT / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[qualified] = module
    spec.loader.exec_module(module)
  return sys.modules[qualified]


# ----------------------------------------------------------------------------
# The models.
# ----------------------------------------------------------------------------


def plain_mlp(params, x):
  """A function MLP: dict layers, ``jnp.dot`` and a jitted helper."""
  hidden = jnp.tanh(jnp.dot(x, params["dense0"]["kernel"]) + params["dense0"]["bias"])
  hidden = _jitted_layer(params["dense1"], hidden)
  return hidden @ params["out"]["kernel"] + params["out"]["bias"]


@jax.jit
def _jitted_layer(layer, x):
  return jax.nn.gelu(x @ layer["kernel"] + layer["bias"])


def plain_mlp_params(dtype, seed=0, sizes=(4, 5, 5, 3)):
  rng = np.random.default_rng(seed)
  names = ["dense0", "dense1", "out"]
  return {n: {"kernel": jnp.asarray(rng.normal(size=(a, b)) / np.sqrt(a), dtype),
              "bias": jnp.asarray(0.1 * rng.normal(size=(b,)), dtype)}
          for n, a, b in zip(names, sizes[:-1], sizes[1:])}


class CompactMLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.tanh(nn.Dense(5)(x))
    x = nn.relu(nn.Dense(5)(x))
    return nn.Dense(3)(x)


class CompactCNN(nn.Module):
  """An inline residual ``x + conv(relu(conv(x)))`` and a max pooling."""

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(2, (3, 3))(x))
    x = x + nn.Conv(2, (3, 3))(nn.relu(nn.Conv(2, (3, 3))(x)))
    x = nn.max_pool(x, (2, 2), (2, 2))
    x = x.reshape((x.shape[0], -1))
    return nn.Dense(3)(x)


class SetupMLP(nn.Module):
  def setup(self):
    self.hidden = nn.Dense(4)
    self.norm = nn.LayerNorm()
    self.head = nn.Dense(3)

  def __call__(self, x):
    return self.head(nn.swish(self.norm(self.hidden(x))))


class ProjectionBlock(nn.Module):
  """A setup-style residual block whose shortcut is a strided 1x1 convolution.

  ``relu(conv2(relu(conv1(x))) + shortcut(x))`` with ``conv1`` and the
  shortcut strided, then global average pooling and a dense head: the block's
  input ``x`` is carried in the states beside the main path until the
  shortcut reads it.
  """

  features: int = 3

  def setup(self):
    self.conv1 = nn.Conv(self.features, (3, 3), strides=(2, 2))
    self.conv2 = nn.Conv(self.features, (3, 3))
    self.shortcut = nn.Conv(self.features, (1, 1), strides=(2, 2), use_bias=False)
    self.head = nn.Dense(3)

  def __call__(self, x):
    y = self.conv2(nn.relu(self.conv1(x)))
    x = nn.relu(y + self.shortcut(x))
    return self.head(jnp.mean(x, axis=(1, 2)))


class Attention(nn.Module):
  """Self-attention over a sequence: 3-D projection kernels, products of two batch values."""

  @nn.compact
  def __call__(self, x):
    x = x + nn.MultiHeadDotProductAttention(num_heads=2, qkv_features=4)(x)
    return nn.Dense(3)(jnp.mean(x, axis=1))


class BatchNormMLP(nn.Module):
  """A dense layer, train-mode BatchNorm (batch statistics), tanh and a dense head."""

  @nn.compact
  def __call__(self, x, train: bool = True):
    x = nn.BatchNorm(use_running_average=not train, momentum=0.8)(nn.Dense(4)(x))
    return nn.Dense(3)(nn.tanh(x))


class BatchNormCNN(nn.Module):
  """Train-mode BatchNorm after each convolution (batch statistics), an inline residual."""

  @nn.compact
  def __call__(self, x, train: bool = True):
    norm = lambda: nn.BatchNorm(use_running_average=not train, momentum=0.8)
    x = nn.relu(norm()(nn.Conv(2, (3, 3), use_bias=False)(x)))
    x = x + norm()(nn.Conv(2, (3, 3))(x))
    x = nn.max_pool(nn.relu(x), (2, 2), (2, 2))
    return nn.Dense(3)(x.reshape((x.shape[0], -1)))


def train_mode(module):
  """``module``'s train-mode forward pass: the outputs of ``apply(..., mutable=["batch_stats"])``."""
  return lambda v, x: module.apply(v, x, train=True, mutable=["batch_stats"])[0]


RESNET18 = models.resnet18(num_classes=3, width=2)


# The example's transformer at its smallest: token ids through nn.Embed,
# learned positions (a bare param), two pre-LayerNorm blocks of attention and
# an MLP, mean pooling and a dense head.
VOCAB, LENGTH = 5, 4
TRANSFORMER = load_example("model_zoo").TokenTransformer(VOCAB, LENGTH, dim=4, heads=2, blocks=2,
                                                         classes=3)


# ----------------------------------------------------------------------------
# Cases.
# ----------------------------------------------------------------------------


class Case(NamedTuple):
  apply_fn: Callable
  make_params: Callable  # (dtype, seed) -> params
  make_input: Callable  # (batch, seed) -> x


def features(shape):
  return lambda batch, seed: h.classification_batch(shape, batch, seed=seed)[0]


def tokens(batch, seed):
  rng = np.random.default_rng(seed)
  return jnp.asarray(rng.integers(0, VOCAB, size=(batch, LENGTH)), jnp.int32)


def flax_case(module, make_input, apply_fn=None):
  """``module.apply`` (or ``apply_fn``) with the variables from ``init``, each perturbed by
  0.1-sized noise."""

  def make(dtype, seed=0):
    variables = module.init(jax.random.PRNGKey(seed), make_input(2, 0))
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda a: jnp.asarray(np.asarray(a) + 0.1 * rng.normal(size=a.shape),
                                              dtype), variables)
  return Case(apply_fn or module.apply, make, make_input)


CASES = {
    "plain_mlp": Case(plain_mlp, plain_mlp_params, features((4,))),
    "compact_mlp": flax_case(CompactMLP(), features((4,))),
    "compact_cnn": flax_case(CompactCNN(), features((4, 4, 1))),
    "setup_mlp": flax_case(SetupMLP(), features((4,))),
    "setup_projection": flax_case(ProjectionBlock(), features((4, 4, 2))),
    "attention": flax_case(Attention(), features((3, 4))),
    "transformer": flax_case(TRANSFORMER, tokens),
    "batch_norm_mlp": flax_case(BatchNormMLP(), features((3,)), train_mode(BatchNormMLP())),
    "batch_norm_cnn": flax_case(BatchNormCNN(), features((4, 4, 1)), train_mode(BatchNormCNN())),
    "resnet18": flax_case(RESNET18, features((4, 4, 3)), train_mode(RESNET18)),
}
# Models whose samples are coupled by batch statistics (train-mode BatchNorm).
BATCH_STATISTICS = {"batch_norm_mlp", "batch_norm_cnn", "resnet18"}


def case(name, dtype=jnp.float64, batch=5, seed=1):
  """``(apply_fn, params, x, y)``: params in ``dtype``, float inputs in ``dtype``, 3 classes."""
  apply_fn, make_params, make_input = CASES[name]
  x = make_input(batch, seed)
  if jnp.issubdtype(x.dtype, jnp.floating):
    x = x.astype(dtype)
  return apply_fn, make_params(dtype), x, jnp.arange(batch) % 3


def batches(name, count, batch=4, seed=20):
  """``count`` labelled batches of the case's inputs (seeds ``seed``, ``seed + 1``, ...)."""
  make_input = CASES[name].make_input
  return [(make_input(batch, seed + i), jnp.arange(batch) % 3) for i in range(count)]
