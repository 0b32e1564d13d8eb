"""games.from_function: games traced from JAX functions and custom Flax modules.

How the tracer cuts a program into players, stages and states, which layers
get Kronecker structure, that on a network written by hand
(``games.sequential``) it gives that game's updates (``games.from_flax``'s
models against hand-written games: tests/test_from_flax.py), and what it
refuses. The models are ``tests/zoo.py``'s; that each
computes its function, that its open-loop solvers are optax's and its FNE/GR
steps the dense reference's, and that it compiles once, is in
``tests/test_model_zoo.py``.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import dgnopt_jax as dgnopt
from dgnopt_jax import models
import helpers as h
import zoo

G = dgnopt.games


case = zoo.case
plain_mlp, plain_mlp_params = zoo.plain_mlp, zoo.plain_mlp_params


def cross_entropy(apply_fn):
  return lambda p, x, y: jnp.mean(
      optax.softmax_cross_entropy_with_integer_labels(apply_fn(p, x), y))


# ----------------------------------------------------------------------------
# Structure.
# ----------------------------------------------------------------------------


def test_players_stages_and_layers():
  apply_fn, params, x, _ = case("compact_cnn")
  game = G.from_function(apply_fn, params, x)
  # One stage per layer in execution order (Conv_2 runs inside Conv_1's argument);
  # the max-pooling and the flattening between the last convolution and the
  # dense layer are stages of their own.
  assert [[p.name for p in s.players] for s in game.stages] == [
      ["params/Conv_0"], ["params/Conv_2"], ["params/Conv_1"], [], [], ["params/Dense_0"]]
  assert [s.name for s in game.stages[3:5]] == ["reduce_window_max", "reshape"]
  conv = G.Conv2D(2, (3, 3), (1, 1), "SAME", None)
  assert [p.layer for p in game.players] == [conv, conv, conv, G.Dense(3, None)]
  assert game.input_shape == (4, 4, 1)
  # The residual stream is carried beside the inner convolution's output.
  state = x
  for s in game.stages[:2]:
    state = s.fn(state, tuple(G.get_path(params, p.path) for p in s.players))
  assert isinstance(state, tuple) and len(state) == 2
  assert [a.shape for a in state] == [(5, 4, 4, 2), (5, 4, 4, 2)]


def test_function_players_through_a_jitted_helper():
  apply_fn, params, x, _ = case("plain_mlp")
  game = G.from_function(apply_fn, params, x)
  assert [[p.name for p in s.players] for s in game.stages] == [["dense0"], ["dense1"], ["out"]]
  assert [p.layer for p in game.players] == [G.Dense(5, None), G.Dense(5, None), G.Dense(3, None)]
  assert game.input_shape == (4,)


def test_setup_module_players():
  apply_fn, params, x, _ = case("setup_mlp")
  game = G.from_function(apply_fn, params, x)
  assert [p.name for p in game.players] == ["params/hidden", "params/norm", "params/head"]
  assert [p.layer for p in game.players] == [G.Dense(4, None), None, G.Dense(3, None)]


def test_attention_players():
  apply_fn, params, x, _ = case("attention")
  game = G.from_function(apply_fn, params, x)
  attention = ["query", "key", "value", "out"]
  assert [p.name for p in game.players] == (
      [f"params/MultiHeadDotProductAttention_0/{n}" for n in attention] + ["params/Dense_0"])
  # query/key/value (B, T, D) @ (D, H, hd) and out (B, T, H, hd) @ (H, hd, D): token rows.
  heads = G.Dense((2, 2), None, rows=True)
  assert [p.layer for p in game.players] == [heads] * 3 + [
      G.Dense(4, None, rows=True, contracted_axes=2), G.Dense(3, None)]


def test_transformer_attention_projections_are_kronecker_players():
  apply_fn, params, x, _ = case("transformer")
  game = G.from_function(apply_fn, params, x)
  layers = {p.name: p.layer for p in game.players}
  heads, out = G.Dense((2, 2), None, rows=True), G.Dense(4, None, rows=True, contracted_axes=2)
  for block in range(2):
    attention = f"params/EncoderBlock_{block}/MultiHeadDotProductAttention_0"
    assert [layers[f"{attention}/{n}"] for n in ("query", "key", "value", "out")] == (
        [heads] * 3 + [out])


def test_integer_inputs_through_an_embedding():
  """Token ids: the solver hands the input over as floats; the program reads them as ids."""

  class Bag(nn.Module):
    @nn.compact
    def __call__(self, tokens):
      return nn.Dense(3)(jnp.mean(nn.Embed(7, 4)(tokens), axis=1))

  model = Bag()
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 7, size=(5, 3)), jnp.int32)
  labels = jnp.arange(5) % 3
  params = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64),
                        model.init(jax.random.PRNGKey(0), tokens))
  game = G.from_function(model.apply, params, tokens)
  np.testing.assert_allclose(game.apply(params, tokens), model.apply(params, tokens), rtol=1e-12)
  updates, _ = h.step(dgnopt.olne(game, 0.1), params, (tokens, labels))
  grads = jax.grad(cross_entropy(model.apply))(params, tokens, labels)
  h.assert_trees_close(updates, jax.tree.map(lambda g: -0.1 * g, grads), 1e-10)
  updates, _ = h.step(dgnopt.fne(game, 0.1, "kfac"), params, (tokens, labels))
  assert all(np.all(np.isfinite(u)) for u in jax.tree.leaves(updates))


def test_generic_players_without_kronecker_structure():
  """Params as tuples (a 3-D projection kernel and its bias): players without a layer."""

  def projection(params, x):
    w, b = params[0]
    hidden = jnp.einsum("bd,dhk->bhk", x, w) + b
    return jnp.tanh(hidden).reshape(x.shape[0], -1) @ params[1]

  params = [(jnp.ones((4, 2, 3)), jnp.zeros((2, 3))), jnp.ones((6, 3))]
  game = G.from_function(projection, params, jnp.ones((3, 4)))
  assert [p.path for p in game.players] == [(0,), (1,)]
  assert all(p.layer is None for p in game.players)


def test_batch_merged_with_other_axes_is_a_generic_player():
  """A Dense on ``(B*S, K)`` rows: its rows are not samples, so no Kronecker statistics."""

  def tokenwise(params, x):
    rows = x.reshape(-1, x.shape[-1]) @ params["proj"]["kernel"]
    return rows.reshape(x.shape[0], -1) @ params["out"]["kernel"]

  params = {"proj": {"kernel": jnp.ones((4, 2))}, "out": {"kernel": jnp.ones((6, 3))}}
  game = G.from_function(tokenwise, params, jnp.ones((5, 3, 4)))
  assert [p.layer for p in game.players] == [None, G.Dense(3, None, use_bias=False)]


@pytest.mark.parametrize("principle,curvature", [("gr", "kfac"), ("fne", "ekfac")])
def test_token_rows_are_kronecker_players_equal_to_the_reference(principle, curvature):
  """``nn.Dense`` on (B, T, K): each row an output position; the step equals the dense reference."""

  class Tokens(nn.Module):
    @nn.compact
    def __call__(self, x):
      hidden = nn.tanh(nn.Dense(3)(x))  # (B, T, 3)
      return nn.Dense(3)(jnp.mean(nn.tanh(nn.Dense(2)(hidden)), axis=1))

  model, (x, y) = Tokens(), h.classification_batch((4, 2), 3)
  params = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64) + 0.1,
                        model.init(jax.random.PRNGKey(0), x))
  game = G.from_function(model.apply, params, x)
  assert [p.layer for p in game.players] == [G.Dense(3, None, rows=True),
                                             G.Dense(2, None, rows=True), G.Dense(3, None)]
  make = dgnopt.gr if principle == "gr" else dgnopt.fne
  tx = make(game, 0.1, curvature, damping=0.5, vxx_reg=1e-2)
  h.assert_steps_match_reference(tx, game, params, (x, y), 2, learning_rate=0.1,
                                 curvature=curvature, damping=0.5, vxx_reg=1e-2,
                                 principle=principle)


class Heads(nn.Module):
  """``nn.DenseGeneral``: a (D, H, hd) kernel on token rows, then one over a sample's axes."""

  @nn.compact
  def __call__(self, x):
    hidden = nn.tanh(nn.DenseGeneral((2, 2))(nn.tanh(nn.Dense(4)(x))))  # (B, T, 2, 2)
    pooled = nn.DenseGeneral(4, axis=(-2, -1))(jnp.mean(hidden, axis=1))  # (B, 2, 2) -> (B, 4)
    return nn.Dense(3)(nn.tanh(pooled))


class MergeHeads(nn.Module):
  """``nn.DenseGeneral(axis=(-2, -1))`` on (B, T, H, hd) rows: a (H, hd, 2, 3) kernel."""

  @nn.compact
  def __call__(self, x):
    hidden = nn.tanh(nn.Dense(2)(x))  # (B, T, 2, 2)
    hidden = nn.tanh(nn.DenseGeneral((2, 3), axis=(-2, -1))(hidden))  # (B, T, 2, 3)
    return nn.Dense(3)(jnp.mean(hidden, axis=1).reshape(x.shape[0], -1))


DENSE_GENERAL = {
    "heads": (Heads(), (3, 4), [G.Dense(4, None, rows=True), G.Dense((2, 2), None, rows=True),
                                G.Dense(4, None, contracted_axes=2), G.Dense(3, None)]),
    "merge_heads": (MergeHeads(), (3, 2, 2), [G.Dense(2, None, rows=True),
                                              G.Dense((2, 3), None, rows=True, contracted_axes=2),
                                              G.Dense(3, None)]),
}


@pytest.mark.parametrize("principle,curvature", [("gr", "kfac"), ("fne", "ekfac"),
                                                 ("fne", "adam")])
@pytest.mark.parametrize("name", sorted(DENSE_GENERAL))
def test_dense_general_kernels_are_kronecker_players_equal_to_the_reference(
    name, principle, curvature):
  """Multi-axis kernels in their (K, O) matrix view; the steps equal the dense reference.

  Without the V_xx Tikhonov term, so that the value correction and the
  rollout's feedback come from the players' per-sample gradients in that
  view (the Kronecker eigenbasis, the rank-one dense factors).
  """
  model, shape, layers = DENSE_GENERAL[name]
  x, y = h.classification_batch(shape, 3)
  params = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64) + 0.1,
                        model.init(jax.random.PRNGKey(0), x))
  game = G.from_function(model.apply, params, x)
  assert [p.layer for p in game.players] == layers
  np.testing.assert_allclose(game.apply(params, x), model.apply(params, x), rtol=1e-12)
  make = dgnopt.gr if principle == "gr" else dgnopt.fne
  tx = make(game, 0.5, curvature, damping=0.5, coupling_iterations=100)
  h.assert_steps_match_reference(tx, game, params, (x, y), 2, learning_rate=0.5,
                                 curvature=curvature, damping=0.5, principle=principle)


@pytest.mark.parametrize("name", sorted(DENSE_GENERAL))
def test_dense_general_diagonal_forms_from_taps_equal_the_reference(name, monkeypatch):
  """The per-sample forms that several devices use (layer taps, params copies), in the matrix view."""
  from dgnopt_jax._src import linearise
  monkeypatch.setattr(linearise, "partition_safe", lambda: True)
  model, shape, _ = DENSE_GENERAL[name]
  x, y = h.classification_batch(shape, 3)
  params = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64) + 0.1,
                        model.init(jax.random.PRNGKey(0), x))
  game = G.from_function(model.apply, params, x)
  tx = dgnopt.fne(game, 0.5, "adam", damping=0.5, coupling_iterations=100)
  h.assert_steps_match_reference(tx, game, params, (x, y), 2, learning_rate=0.5,
                                 curvature="adam", damping=0.5, principle="fne")


def test_root_leaves_and_bias_share_a_stage():
  """Flat params: each leaf a player; a bias added to a product joins its stage."""

  def flat(params, x):
    return jnp.tanh(x @ params["w1"] + params["b1"]) @ params["w2"] + params["b2"]

  params = {"w1": jnp.ones((4, 3)), "b1": jnp.zeros(3), "w2": jnp.ones((3, 2)),
            "b2": jnp.zeros(2)}
  game = G.from_function(flat, params, jnp.ones((3, 4)))
  assert [[p.name for p in s.players] for s in game.stages] == [["w1", "b1"], ["w2", "b2"]]


# ----------------------------------------------------------------------------
# The same updates as a hand-written game. (Every model's forward pass, open-loop
# and FNE/GR steps and compilation: tests/test_model_zoo.py.)
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("curvature", ["identity", "kfac"])
def test_updates_equal_hand_written_game(curvature):
  """The traced game of a ``games.sequential`` MLP's apply is that game: the same FNE updates."""
  todays = h.tanh_mlp()
  params = h.perturbed_params(todays)
  x = h.classification_batch((4,), 4)[0]
  traced = G.from_function(todays.apply, params, x)
  assert [[p.path for p in s.players] for s in traced.stages] == \
      [[p.path for p in s.players] for s in todays.stages]
  batch = (x, jnp.arange(x.shape[0]) % 3)
  runs = []
  for game in (traced, todays):
    tx = dgnopt.fne(game, 0.1, curvature, vxx_reg=1e-3)
    state, p, updates = tx.init(params), params, []
    for _ in range(3):
      u, state = h.step(tx, p, batch, state)
      updates.append(u)
      p = optax.apply_updates(p, u)
    runs.append(updates)
  for a, b in zip(*runs):
    h.assert_trees_close(a, b, 1e-10)


# ----------------------------------------------------------------------------
# Errors.
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("mixing,primitive", [
    (lambda x: x @ x.T @ x, "dot_general"),
    (lambda x: jnp.cumsum(x, axis=0), "cumsum"),
    (lambda x: x[::-1], "rev"),
    (lambda x: jax.nn.softmax(x, axis=0), "reduce_max")])
def test_operations_across_samples_are_errors(mixing, primitive):
  params = {"w": jnp.ones((4, 3))}
  with pytest.raises(ValueError, match=primitive):
    G.from_function(lambda p, x: mixing(x) @ p["w"], params, jnp.ones((3, 4)))


def test_tied_weights_are_an_error():
  def tied(params, x):
    h_ = jnp.tanh(x @ params["embed"]["kernel"])
    h_ = jnp.tanh(h_ @ params["mid"]["kernel"])
    return h_ @ params["embed"]["kernel"].T

  params = {"embed": {"kernel": jnp.ones((4, 4))}, "mid": {"kernel": jnp.ones((4, 4))}}
  with pytest.raises(ValueError, match=r"'embed/kernel' are used by two layers"):
    G.from_function(tied, params, jnp.ones((3, 4)))


def test_unused_params_are_an_error():
  params = {"a": {"kernel": jnp.ones((4, 3))}, "unused": {"kernel": jnp.ones((2, 2))}}
  with pytest.raises(ValueError, match=r"unused/kernel"):
    G.from_function(lambda p, x: x @ p["a"]["kernel"], params, jnp.ones((3, 4)))


def test_params_of_another_dtype_are_an_error():
  apply_fn, params, x, _ = case("plain_mlp")
  game = G.from_function(apply_fn, params, x)
  with pytest.raises(TypeError, match=r"player 'dense0' .*float32.*traced on.*float64"):
    game.apply(jax.tree.map(lambda a: a.astype(jnp.float32), params), x)


def test_function_without_players_is_an_error():
  with pytest.raises(ValueError, match="no players"):
    G.from_function(lambda p, x: jnp.tanh(x), {}, jnp.ones((3, 4)))


def test_program_changing_with_the_batch_size_is_an_error():
  def branching(params, x):
    y = x @ params["w"]
    return jnp.tanh(y) if x.shape[0] == 3 else y

  with pytest.raises(ValueError, match="do not depend on the batch size"):
    G.from_function(branching, {"w": jnp.ones((4, 3))}, jnp.ones((3, 4)))
