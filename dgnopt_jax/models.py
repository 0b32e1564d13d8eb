"""Flax linen models that :func:`dgnopt_jax.games.from_flax` turns into games.

Requires flax. The containers :class:`Chain`, :class:`Residual` and
:class:`Branches` are plain Flax modules; :func:`resnet18` and
:func:`inception_net` build networks from them::

  model = resnet18(num_classes=10)
  variables = model.init(jax.random.PRNGKey(0), x)             # {"params", "batch_stats"}
  logits, new_stats = model.apply(variables, x, mutable=["batch_stats"])   # train mode
  logits = model.apply(variables, x, train=False)              # running averages
  game = dgnopt_jax.games.from_flax(model, x)
"""

from __future__ import annotations

import functools
from typing import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from dgnopt_jax._src.flax_blocks import Branches
from dgnopt_jax._src.flax_blocks import Chain
from dgnopt_jax._src.flax_blocks import Residual

__all__ = ["Branches", "Chain", "Residual", "basic_block", "flatten", "global_average_pool",
           "inception_block", "inception_net", "resnet18"]


def global_average_pool(x: jax.Array) -> jax.Array:
  """Mean over the spatial axes of an NHWC batch: (B, H, W, C) -> (B, C)."""
  return jnp.mean(x, axis=(1, 2))


def flatten(x: jax.Array) -> jax.Array:
  """(B, ...) -> (B, -1)."""
  return x.reshape((x.shape[0], -1))


def basic_block(features: int, strides: int = 1, in_features: int | None = None,
                batch_norm: bool = True, activation: Callable = nn.relu) -> Residual:
  """The ResNet basic block (He et al. 2016): two 3x3 convolutions and a shortcut.

  ``act(bn(conv(act(bn(conv(x))))) + shortcut(x))``; the shortcut is the
  identity when the shape is kept, else a strided 1x1 convolution (and a
  BatchNorm). Without ``batch_norm`` the convolutions have biases.
  """
  def norm():
    return [nn.BatchNorm(momentum=0.9, epsilon=1e-5)] if batch_norm else []

  conv = functools.partial(nn.Conv, use_bias=not batch_norm)
  body = ([conv(features, (3, 3), strides=(strides, strides))] + norm() + [activation] +
          [conv(features, (3, 3))] + norm())
  shortcut = []
  if strides != 1 or (in_features is not None and in_features != features):
    shortcut = [conv(features, (1, 1), strides=(strides, strides))] + norm()
  return Residual(body, shortcut, activation)


def resnet18(num_classes: int = 10, width: int = 64,
             stage_sizes: Sequence[int] = (2, 2, 2, 2), batch_norm: bool = True) -> Chain:
  """The CIFAR-style ResNet18: a 3x3 stem, four stages of basic blocks, global pooling.

  Widths ``width * (1, 2, 4, 8)``, the first block of stages 2-4 with stride 2
  and a projection shortcut (He et al. 2016, the CIFAR variant without the
  ImageNet stem's 7x7 convolution and max pooling). ``width=64`` and
  ``stage_sizes=(2, 2, 2, 2)`` is ResNet18 (11.2M params for 10 classes);
  smaller widths give the same architecture, narrower.

  Call it with ``train=True`` (batch statistics; ``mutable=["batch_stats"]``)
  or ``train=False`` (running averages).
  """
  conv = functools.partial(nn.Conv, use_bias=not batch_norm)
  layers = [conv(width, (3, 3))]
  layers += [nn.BatchNorm(momentum=0.9, epsilon=1e-5)] if batch_norm else []
  layers.append(nn.relu)
  features = width
  for i, blocks in enumerate(stage_sizes):
    for j in range(blocks):
      out = width * 2 ** i
      layers.append(basic_block(out, 2 if i > 0 and j == 0 else 1, features, batch_norm))
      features = out
  layers += [global_average_pool, nn.Dense(num_classes)]
  return Chain(layers)


def inception_block(features: int, activation: Callable = nn.relu) -> Branches:
  """Four branches concatenated (DGNOpt Fig. 6): 1x1, 3x3 and 5x5 convolutions, 3x3 pooling + 1x1."""
  pool = functools.partial(nn.avg_pool, window_shape=(3, 3), strides=(1, 1), padding="SAME")
  return Branches([[nn.Conv(features, (1, 1))], [nn.Conv(features, (3, 3))],
                   [nn.Conv(features, (5, 5))], [pool, nn.Conv(features, (1, 1))]],
                  activation=activation)


def inception_net(num_classes: int = 10, stem: int = 8, features: int = 4,
                  blocks: int = 1) -> Chain:
  """A small inception network: a 3x3 stem, inception blocks, 2x2 pooling, a dense classifier."""
  layers = [nn.Conv(stem, (3, 3)), nn.relu]
  layers += [inception_block(features) for _ in range(blocks)]
  layers += [functools.partial(nn.avg_pool, window_shape=(2, 2), strides=(2, 2)), flatten,
             nn.Dense(num_classes)]
  return Chain(layers)
