"""Flax linen containers that :func:`games.from_flax` maps onto stages.

Three containers, each an ordinary ``flax.linen.Module`` with params laid
out as Flax names its submodules:

* :class:`Chain`: layers applied in order (like ``nn.Sequential``, but the
  ``train`` flag reaches the BatchNorm layers and nested containers);
* :class:`Residual`: ``act(body(x) + shortcut(x))``, the shortcut an identity
  (no layers) or a projection (e.g. a strided 1x1 convolution and a BatchNorm);
* :class:`Branches`: parallel branches on the same input, concatenated on the
  channel axis (an inception block) or added.

A layer is a Flax module or a parameter-free callable (``nn.relu``,
``functools.partial(nn.avg_pool, ...)``, a reshape). A BatchNorm layer whose
``use_running_average`` is None is called with ``use_running_average=not train``.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

Layer = Callable[..., Any]


def call_layer(layer: Layer, x: jax.Array, train: bool) -> jax.Array:
  """Applies one layer of a container, handing ``train`` on where it is used."""
  if isinstance(layer, nn.BatchNorm) and layer.use_running_average is None:
    return layer(x, use_running_average=not train)
  if isinstance(layer, (Chain, Residual, Branches)):
    return layer(x, train=train)
  return layer(x)


def call_layers(layers: Sequence[Layer], x: jax.Array, train: bool) -> jax.Array:
  for layer in layers:
    x = call_layer(layer, x, train)
  return x


def _activate(activation: Callable | None, x: jax.Array) -> jax.Array:
  return x if activation is None else activation(x)


class Chain(nn.Module):
  """``layers`` applied in order; params ``{"layers_0": ..., "layers_1": ...}``."""

  layers: Sequence[Layer]

  def __call__(self, x: jax.Array, train: bool = True) -> jax.Array:
    return call_layers(self.layers, x, train)


class Residual(nn.Module):
  """``activation(body(x) + shortcut(x))``; no shortcut layers: the identity.

  Params ``{"body_0": ..., "shortcut_0": ...}``.
  """

  body: Sequence[Layer]
  shortcut: Sequence[Layer] = ()
  activation: Callable | None = nn.relu

  def __call__(self, x: jax.Array, train: bool = True) -> jax.Array:
    h = call_layers(self.body, x, train)
    r = call_layers(self.shortcut, x, train)
    return _activate(self.activation, h + r)


class Branches(nn.Module):
  """Parallel branches on one input, combined: ``activation(concat_or_sum(branch_k(x)))``.

  Each branch is a sequence of layers (an empty one is the identity); params
  ``{"branches_<k>_<i>": ...}``. ``combine`` is ``"concat"`` (last axis) or ``"sum"``.
  """

  branches: Sequence[Sequence[Layer]]
  activation: Callable | None = None
  combine: str = "concat"

  def __call__(self, x: jax.Array, train: bool = True) -> jax.Array:
    outs = [call_layers(branch, x, train) for branch in self.branches]
    if self.combine == "concat":
      y = jnp.concatenate(outs, axis=-1)
    elif self.combine == "sum":
      y = sum(outs[1:], outs[0])
    else:
      raise ValueError(f"combine must be 'concat' or 'sum', got {self.combine!r}")
    return _activate(self.activation, y)
