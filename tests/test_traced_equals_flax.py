"""Traced games of the models the module-tree reader handles: the same game, the same updates.

``games.from_function(model.apply, variables, x)`` traces the program; the
module-tree reader (``games.from_flax``) builds the game from the module
tree. On nn.Sequential, models.Chain with Residual (identity and projection
shortcuts, both alignments), an inception block and ResNet18 in train mode
(BatchNorm: statistics stages), both give the same stages (the same players,
level by level; pooling and flattening stages of their own; an inception
branch's pooling in the branch's stage) and the same fne/gr updates
(float64), with the value Hessian's Tikhonov term, which is a state cost at
every stage's output and so tells apart games cut differently.
"""

import dataclasses

import optax
import pytest

import dgnopt_jax as dgnopt
from dgnopt_jax import games as G
from dgnopt_jax import models
import helpers as h
import test_from_flax as flax_cases

SLOW = pytest.mark.slow
# (pair, alignment): the models of test_from_flax.PAIRS; "blocks" holds an
# identity and a projection residual block and an inception block.
MODELS = [("mlp", "merge"), ("cnn", "merge"), ("residual", "merge"), ("residual", "split"),
          ("blocks", "merge"), ("blocks", "split"), ("inception", "merge"),
          ("resnet18", "merge"), ("resnet18", "split")]


def model_and_batch(name):
  if name == "inception":
    model = models.inception_net(3, stem=2, features=1, blocks=2)
    shape = (4, 4, 1)
  elif name == "resnet18":
    model = models.resnet18(num_classes=3, width=2)
    shape = (4, 4, 3)
  else:
    pair = "blocks_merge" if name == "blocks" else name
    model, _, shape, _ = flax_cases.PAIRS[pair]()
  x, y = flax_cases.pair_batch(shape)
  kwargs = {"train": True} if name == "resnet18" else {}
  return model, flax_cases.variables_of(model, x, **kwargs), x, y


def traced_game(name, model, variables, x, alignment):
  """The traced game of the model's (train-mode) forward pass."""
  if name == "resnet18":
    apply_fn = lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"])[0]
  else:
    apply_fn = model.apply
  return G.from_function(apply_fn, variables, x, alignment=alignment)


def players_by_stage(game):
  return [tuple(p.path for p in s.players) for s in game.stages]


@pytest.mark.parametrize("name,alignment", MODELS)
def test_same_players_level_by_level(name, alignment):
  model, variables, x, _ = model_and_batch(name)
  traced = traced_game(name, model, variables, x, alignment)
  read = G.from_flax(model, x, alignment=alignment)
  assert players_by_stage(traced) == players_by_stage(read)
  # The statistics stages where the reader has them.
  statistics = lambda game: [s.gradient_fn is not None for s in game.stages]
  assert statistics(traced) == statistics(read)
  # The same Kronecker players (the traced layer's activation stays in the stage function).
  kinds = lambda game: [p.layer and dataclasses.replace(p.layer, activation=None)
                        for p in game.players]
  assert kinds(traced) == kinds(read)
  h.assert_trees_close(traced.apply(variables, x), read.apply(variables, x), 1e-12)


@pytest.mark.parametrize("name,alignment,principle,curvature", [
    pytest.param(n, a, p, c, marks=() if (n, a, p, c) in {("blocks", "split", "gr", "kfac"),
                                                           ("residual", "merge", "fne", "identity"),
                                                           ("mlp", "merge", "gr", "kfac")}
                 else SLOW)
    for n, a in MODELS for p in ("fne", "gr") for c in ("identity", "kfac")])
def test_updates_equal_module_tree_game(name, alignment, principle, curvature):
  model, variables, x, y = model_and_batch(name)
  vxx_reg = 1e-3  # a state cost at every stage's output: the same cut, or different updates
  make = dgnopt.fne if principle == "fne" else dgnopt.gr
  # ResNet18's first steps at the larger rates are rejected (zero updates).
  lr = 0.01 if name == "resnet18" else 0.3 if curvature == "identity" else 0.05
  updates = []
  for game in (traced_game(name, model, variables, x, alignment),
               G.from_flax(model, x, alignment=alignment)):
    tx = make(game, lr, curvature, vxx_reg=vxx_reg)
    state, params, steps = None, variables, []
    for _ in range(2):  # the second step reads the first's curvature state
      u, state = h.step(tx, params, (x, y), state)
      steps.append(u)
      params = optax.apply_updates(params, u)
    updates.append(steps)
  h.assert_trees_close(updates[0], updates[1], 1e-10)
