"""Residual, inception and parallel blocks as games: forward pass, alignments, reference."""

import jax
import numpy as np
import pytest

import dgnopt_jax as dgnopt
import helpers as h

G = dgnopt.games


def network(alignment):
  return [G.Conv2D(3, (3, 3)), G.ResidualBlock(3, shortcut="identity"),
          G.ResidualBlock(2, shortcut="projection", alignment=alignment),
          G.InceptionBlock(1), G.Parallel(G.Conv2D(2, (3, 3)), G.Conv2D(2, (1, 1), activation="tanh")),
          G.AvgPool(), G.Dense(3)]


def plain_forward(layers, params, x):
  """The network as plain function composition, ignoring the game's stages."""
  for i, layer in enumerate(layers):
    x = layer(params.get(f"{layer.prefix}_{i}") if layer.prefix else None, x)
  return x


@pytest.mark.parametrize("alignment", G.RESIDUAL_ALIGNMENTS)
def test_forward_pass_is_the_network(alignment):
  layers = network(alignment)
  game = G.sequential(layers, (4, 4, 1))
  params = h.perturbed_params(game)
  x, _ = h.classification_batch((4, 4, 1), 3)
  ours = jax.jit(game.apply)(params, x)
  theirs = jax.jit(lambda p, x: plain_forward(layers, p, x))(params, x)
  np.testing.assert_allclose(ours, theirs, atol=1e-14)
  players = [s.num_players for s in game.stages]
  assert 4 in players and players.count(2) == 2


def test_alignments_share_params_but_not_updates():
  def small(alignment):
    return G.sequential([G.Conv2D(2, (3, 3)), G.ResidualBlock(3, shortcut="projection",
                                                              alignment=alignment),
                         G.AvgPool(), G.Dense(3)], (4, 4, 1))
  merge, split = small("merge"), small("split")
  params = h.perturbed_params(merge)
  assert jax.tree.structure(params) == jax.tree.structure(h.perturbed_params(split))
  batch = h.classification_batch((4, 4, 1), 3)
  np.testing.assert_allclose(jax.jit(merge.apply)(params, batch[0]),
                             jax.jit(split.apply)(params, batch[0]))
  u_merge = h.step(dgnopt.fne(merge, 0.5, vxx_reg=1e-3), params, batch)[0]
  u_split = h.step(dgnopt.fne(split, 0.5, vxx_reg=1e-3), params, batch)[0]
  assert h.max_relative_error(u_merge, u_split) > 1e-4


SLOW = pytest.mark.slow


@pytest.mark.parametrize("alignment,principle,curvature,lr", [
    pytest.param(a, p, c, lr, marks=() if (a, p, c) == ("merge", "fne", "identity") else SLOW)
    for a in G.RESIDUAL_ALIGNMENTS for p in ("fne", "gr")
    for c, lr in (("identity", 0.3), ("dense", 0.5))])
def test_blocks_equal_dense_reference(alignment, principle, curvature, lr):
  game = G.sequential(network(alignment), (4, 4, 1))
  params = h.perturbed_params(game)
  batch = h.classification_batch((4, 4, 1), 3)
  make = dgnopt.fne if principle == "fne" else dgnopt.gr
  updates = h.step(make(game, lr, curvature, vxx_reg=1e-3), params, batch)[0]
  ref, _ = h.reference_step(game, params, batch, learning_rate=lr, curvature=curvature,
                            vxx_reg=1e-3, principle=principle)
  h.assert_trees_close(updates, ref, 1e-8)


def test_block_errors():
  with pytest.raises(ValueError, match="identity shortcut needs 4 input channels"):
    G.sequential([G.ResidualBlock(4)], (8, 8, 1)).init(jax.random.PRNGKey(0))
  with pytest.raises(ValueError, match="alignment must be one of"):
    G.ResidualBlock(4, alignment="middle")
  with pytest.raises(ValueError, match="shortcut must be"):
    G.ResidualBlock(4, shortcut="dense")
