"""games.from_function: repeated traced stages share one function and are scanned.

Stages whose programs are the same up to the names of their values (equal
layers, the stages of equal residual blocks) get one stage function object,
so that ``segments.plan_segments`` solves a run of them with ``lax.scan``.
Checked here: the plans of traced residual networks (a plain function and a
compact Flax module), that stages differing in a literal, a constant or a
custom JVP rule keep their own functions, and that the scanned game's
updates are those of the same game unrolled and of the dense reference.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import dgnopt_jax as dgnopt
from dgnopt_jax._src import segments as segments_lib
from dgnopt_jax._src import traced_games
import helpers as h

G = dgnopt.games
BLOCKS = 4


def dense(rng, fan_in, fan_out):
  return {"kernel": jnp.asarray(rng.normal(size=(fan_in, fan_out)) / np.sqrt(fan_in)),
          "bias": jnp.asarray(0.1 * rng.normal(size=fan_out))}


def residual_params(width=3, in_dim=4, classes=3, blocks=BLOCKS, seed=0):
  rng = np.random.default_rng(seed)
  return {"stem": dense(rng, in_dim, width),
          "blocks": [{"a": dense(rng, width, width), "b": dense(rng, width, width)}
                     for _ in range(blocks)],
          "head": dense(rng, width, classes)}


def residual_net(params, x, scales=None, offsets=None, activations=None):
  """A plain residual MLP: ``h + W_b act(W_a h + a) + b`` per block (per-block variations optional)."""
  hidden = jnp.tanh(x @ params["stem"]["kernel"] + params["stem"]["bias"])
  for i, block in enumerate(params["blocks"]):
    act = activations[i] if activations else jax.nn.relu
    inner = act(hidden @ block["a"]["kernel"] + block["a"]["bias"])
    branch = inner @ block["b"]["kernel"] + block["b"]["bias"]
    if scales:
      branch = branch * scales[i]  # a Python float: a literal of the program
    if offsets:
      branch = branch + np.full(branch.shape[-1], offsets[i])  # a constant of the program
    hidden = hidden + branch
  return hidden @ params["head"]["kernel"] + params["head"]["bias"]


class Block(nn.Module):
  @nn.compact
  def __call__(self, x):
    return x + nn.Conv(2, (3, 3))(nn.relu(nn.Conv(2, (3, 3))(x)))


class Tower(nn.Module):
  """A compact CNN: a stem, ``BLOCKS`` identical residual blocks, a dense head.

  The reshape before the head is a stage of its own (a parameter-free
  operation from the whole state to the whole state), so every block repeats.
  """

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(2, (3, 3))(x))
    for _ in range(BLOCKS):
      x = Block()(x)
    return nn.Dense(3)(x.reshape((x.shape[0], -1)))


def tower():
  x, _ = h.classification_batch((4, 4, 1), 3)
  model = Tower()
  params = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64),
                        model.init(jax.random.PRNGKey(0), x))
  return model.apply, params, x


def repeats(game, params, x):
  return [(s.period, s.repeats) for s in segments_lib.plan_segments(game, params, x)
          if s.repeats > 1]


# ----------------------------------------------------------------------------
# Plans.
# ----------------------------------------------------------------------------


def test_identical_blocks_share_functions_and_are_scanned():
  params = residual_params()
  x, _ = h.classification_batch((4,), 3)
  game = G.from_function(residual_net, params, x)
  fns = [s.fn for s in game.stages]
  # stem, (a, b) per block, head: the blocks' stages share two functions.
  assert len(fns) == 2 + 2 * BLOCKS and len(set(fns)) == 4
  assert fns[1:-1] == [fns[1], fns[2]] * BLOCKS
  assert repeats(game, params, x) == [(2, BLOCKS)]
  np.testing.assert_allclose(game.apply(params, x), residual_net(params, x), rtol=1e-12)
  # The scanned game's gradient: OLNE with the identity curvature is SGD (DGNOpt Thm. 6).
  y = jnp.arange(x.shape[0]) % 3
  loss = lambda p: jnp.mean(optax.softmax_cross_entropy_with_integer_labels(
      residual_net(p, x), y))
  updates = h.step(dgnopt.olne(game, 0.1), params, (x, y))[0]
  h.assert_trees_close(updates, jax.tree.map(lambda g: -0.1 * g, jax.grad(loss)(params)), 1e-10)


def test_identical_flax_blocks_are_scanned():
  apply_fn, params, x = tower()
  game = G.from_function(apply_fn, params, x)
  assert repeats(game, params, x) == [(2, BLOCKS)]
  np.testing.assert_allclose(game.apply(params, x), apply_fn(params, x), rtol=1e-12)
  x_big = jnp.concatenate([x, x])  # another batch size, traced again
  np.testing.assert_allclose(game.apply(params, x_big), apply_fn(params, x_big), rtol=1e-12)


def test_different_blocks_are_not_scanned():
  params = residual_params()
  x, _ = h.classification_batch((4,), 3)
  activations = [jax.nn.relu, jax.nn.relu, jnp.tanh, jax.nn.relu]
  fn = lambda p, x_: residual_net(p, x_, activations=activations)
  game = G.from_function(fn, params, x)
  assert repeats(game, params, x) == []
  np.testing.assert_allclose(game.apply(params, x), fn(params, x), rtol=1e-12)


@pytest.mark.parametrize("variation", ["scales", "offsets"])
def test_blocks_differing_in_a_literal_or_constant_keep_their_functions(variation):
  """A scale (a literal) or an offset (a constant array) of one block differs: not merged."""
  params = residual_params()
  x, _ = h.classification_batch((4,), 3)
  values = {"scales": [1.0, 1.0, 0.5, 1.0], "offsets": [0.0, 0.0, 0.25, 0.0]}[variation]
  fn = lambda p, x_: residual_net(p, x_, **{variation: values})
  game = G.from_function(fn, params, x)
  fns = [s.fn for s in game.stages]
  assert fns[2] is fns[4] and fns[6] is not fns[2]  # blocks 0 and 1 alike, block 2 not
  assert repeats(game, params, x) == []
  np.testing.assert_allclose(game.apply(params, x), fn(params, x), rtol=1e-12)
  # With every block alike the same function is shared.
  same = lambda p, x_: residual_net(p, x_, **{variation: [values[0]] * BLOCKS})
  assert repeats(G.from_function(same, params, x), params, x) == [(2, BLOCKS)]


@jax.custom_jvp
@jax.jit
def relu(x):  # jax.nn.relu's primal, traced to the same jaxpr
  return jnp.maximum(x, 0)


relu.defjvps(lambda g, ans, x: g)  # a straight-through derivative


def test_blocks_differing_in_a_custom_jvp_rule_keep_their_functions(monkeypatch):
  params = residual_params()
  x, y = h.classification_batch((4,), 3)
  activations = [jax.nn.relu, jax.nn.relu, relu, jax.nn.relu]
  fn = lambda p, x_: residual_net(p, x_, activations=activations)
  game = G.from_function(fn, params, x)
  assert repeats(game, params, x) == []
  # The gradient through the straight-through block is its own (OLNE is SGD).
  loss = lambda p: jnp.mean(optax.softmax_cross_entropy_with_integer_labels(fn(p, x), y))
  updates = h.step(dgnopt.olne(game, 0.1), params, (x, y))[0]
  h.assert_trees_close(updates, jax.tree.map(lambda g: -0.1 * g, jax.grad(loss)(params)), 1e-10)
  # Only the rule tells the blocks apart: without comparing rules they would merge.
  monkeypatch.setattr(traced_games, "_JVP_ORDERS", 0)
  assert repeats(G.from_function(fn, params, x), params, x) == [(2, BLOCKS)]


# ----------------------------------------------------------------------------
# Updates: scanned = unrolled = dense reference.
# ----------------------------------------------------------------------------


def scanned_and_unrolled(monkeypatch, game, params, batch, make):
  scanned = h.step(make(), params, batch)[0]
  monkeypatch.setattr(segments_lib, "MIN_BLOCK_REPEATS", 99)
  monkeypatch.setattr(segments_lib, "MIN_STAGE_REPEATS", 99)
  assert repeats(game, params, batch[0]) == []
  return scanned, h.step(make(), params, batch)[0]


# Each check compiles two steps (15-35 s on a 2-core CPU): they run with -m slow;
# the default run compares the scanned game with the dense reference (below).
@pytest.mark.slow
@pytest.mark.parametrize("principle,curvature", [
    ("fne", "kfac"), ("fne", "identity"),
    ("gr", "identity"), ("gr", "kfac")])
def test_scanned_steps_equal_unrolled_steps(monkeypatch, principle, curvature):
  params = residual_params()
  x, y = h.classification_batch((4,), 5)
  game = G.from_function(residual_net, params, x, weight_decay=0.01)
  assert repeats(game, params, x) == [(2, BLOCKS)]
  assert all(p.layer is not None for p in game.players)  # Kronecker players throughout
  make = dgnopt.gr if principle == "gr" else dgnopt.fne
  scanned, unrolled = scanned_and_unrolled(
      monkeypatch, game, params, (x, y), lambda: make(game, 0.2, curvature, vxx_reg=1e-3))
  assert h.max_relative_error(scanned, jax.tree.map(jnp.zeros_like, scanned)) > 0
  h.assert_trees_close(scanned, unrolled, 1e-10)


@pytest.mark.slow
def test_scanned_flax_kfac_steps_equal_unrolled_steps(monkeypatch):
  """Convolutions' Kronecker taps in the scanned body (35 s on a 2-core CPU)."""
  apply_fn, params, x = tower()
  y = jnp.arange(x.shape[0]) % 3
  game = G.from_function(apply_fn, params, x)
  assert repeats(game, params, x) == [(2, BLOCKS)]
  assert all(p.layer is not None for p in game.players)
  scanned, unrolled = scanned_and_unrolled(
      monkeypatch, game, params, (x, y), lambda: dgnopt.fne(game, 0.2, "kfac", vxx_reg=1e-3))
  h.assert_trees_close(scanned, unrolled, 1e-10)


def test_scanned_step_equals_dense_reference():
  params = residual_params(width=2, in_dim=3, classes=2)
  x, y = h.classification_batch((3,), 3, classes=2)
  game = G.from_function(residual_net, params, x, weight_decay=0.01)
  assert repeats(game, params, x) == [(2, BLOCKS)]
  tx = dgnopt.fne(game, 0.05, "identity", damping=0.5, vxx_reg=1e-2)
  h.assert_steps_match_reference(tx, game, params, (x, y), 1, learning_rate=0.05,
                                 curvature="identity", damping=0.5, vxx_reg=1e-2,
                                 principle="fne")
