"""The main job's DIGITS networks as games made two ways, to be timed side by side.

Shared by ``compile_depth.py`` and ``step_time.py`` (imported as a sibling
module). Each network is the same function of the same kind of params:

* ``network``: the hand-written game, :func:`dgnopt_jax.games.network_from_name`;
* ``flax``: the network written as a Flax model (``nn.Sequential`` for the
  MLP; ``models.Chain`` with ``models.basic_block`` for the residual CNN),
  the traced game of its ``apply`` (:func:`dgnopt_jax.games.from_flax`).
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import numpy as np

from dgnopt_jax import games
from dgnopt_jax import models

GAME_KINDS = ("network", "flax")
FLAX_NETWORKS = ("mlp", "resnet")


def flax_model(name: str, num_classes: int, residual_blocks: int = 3) -> nn.Module:
  """The Flax model computing ``games.network_from_name(name, ...)``'s network."""
  if name == "mlp":
    layers = []
    for _ in range(4):
      layers += [nn.Dense(32), nn.tanh]
    return nn.Sequential(layers + [nn.Dense(num_classes)])
  if name == "resnet":
    pool = functools.partial(nn.avg_pool, window_shape=(2, 2), strides=(2, 2))
    return models.Chain(
        [nn.Conv(12, (3, 3)), nn.relu] +
        [models.basic_block(12, batch_norm=False) for _ in range(residual_blocks)] +
        [pool, models.flatten, nn.Dense(num_classes)])
  raise ValueError(f"no Flax model of {name!r}; choose one of {FLAX_NETWORKS}")


def game_and_params(kind: str, name: str, x: np.ndarray, num_classes: int,
                    residual_blocks: int = 3, seed: int = 0):
  """(game, params) of network ``name`` made the ``kind`` way (module docstring)."""
  key = jax.random.PRNGKey(seed)
  if kind == "network":
    game = games.network_from_name(name, x.shape[1:], num_classes,
                                   residual_blocks=residual_blocks)
    return game, game.init(key)
  if kind not in GAME_KINDS:
    raise ValueError(f"unknown game kind {kind!r}; choose from {GAME_KINDS}")
  model = flax_model(name, num_classes, residual_blocks)
  params = model.init(key, x)
  return games.from_flax(model, x), params
