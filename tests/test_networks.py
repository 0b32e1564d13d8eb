"""The networks by name equal the same networks written out layer by layer."""

import jax
import numpy as np
import pytest

from dgnopt_jax import games as G


def _written_out(name, num_classes):
  if name == "mlp":
    layers = [G.Dense(32, "tanh") for _ in range(4)] + [G.Dense(num_classes)]
  elif name == "cnn":
    layers = [G.Conv2D(8, (3, 3), activation="relu") for _ in range(4)]
    layers += [G.AvgPool((2, 2)), G.Dense(32, "relu"), G.Dense(num_classes)]
  elif name == "resnet":
    layers = [G.Conv2D(12, (3, 3), activation="relu")]
    layers += [G.ResidualBlock(12) for _ in range(3)] + [G.AvgPool((2, 2)), G.Dense(num_classes)]
  else:
    layers = [G.Conv2D(8, (3, 3), activation="relu"), G.InceptionBlock(4),
              G.Conv2D(8, (3, 3), activation="relu"), G.AvgPool((2, 2)),
              G.Dense(32, "relu"), G.Dense(num_classes)]
  return layers


@pytest.mark.parametrize("name", G.NETWORKS)
def test_network_by_name_equals_the_written_out_network(name):
  shape = (8, 8, 1) if name in G.IMAGE_NETWORKS else (64,)
  game = G.network_from_name(name, shape, 10)
  written = G.sequential(_written_out(name, 10), shape)
  params = written.init(jax.random.PRNGKey(0))
  x = np.random.default_rng(0).normal(size=(3,) + shape).astype(np.float32)
  assert jax.tree.structure(game.init(jax.random.PRNGKey(0))) == jax.tree.structure(params)
  assert len(game.stages) == len(written.stages)
  np.testing.assert_allclose(game.apply(params, x), written.apply(params, x), rtol=1e-6)
  assert game.apply(params, x).shape == (3, 10)


def test_unknown_network_names_the_known_ones():
  with pytest.raises(ValueError, match=r"unknown network 'vgg'.*'mlp'"):
    G.network_from_name("vgg", (64,), 10)
