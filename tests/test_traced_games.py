"""games.from_function: games traced from JAX functions and custom Flax modules.

The traced game computes the function it was traced from, its open-loop
solvers are optax's on ``jax.grad`` of the same loss (DGNOpt Theorem 6), its
FNE/GR steps equal the dense reference, and on networks that today's
readers (``games.sequential``, ``games.from_flax``) also handle it gives
their updates.
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

G = dgnopt.games


# ----------------------------------------------------------------------------
# Models written without the library's vocabulary.
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


class Attention(nn.Module):
  """Self-attention over a sequence: 3-D projection kernels, products of two batch values."""

  @nn.compact
  def __call__(self, x):
    x = x + nn.MultiHeadDotProductAttention(num_heads=2, qkv_features=4)(x)
    return nn.Dense(3)(jnp.mean(x, axis=1))


def flax_case(module, shape):
  def make(dtype, seed=0):
    x = jnp.zeros((2,) + shape, dtype)
    variables = module.init(jax.random.PRNGKey(seed), x)
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda a: jnp.asarray(np.asarray(a) + 0.1 * rng.normal(size=a.shape),
                                              dtype), variables)
  return module.apply, make, shape


CASES = {
    "plain_mlp": (plain_mlp, plain_mlp_params, (4,)),
    "compact_mlp": flax_case(CompactMLP(), (4,)),
    "compact_cnn": flax_case(CompactCNN(), (4, 4, 1)),
    "setup_mlp": flax_case(SetupMLP(), (4,)),
    "attention": flax_case(Attention(), (3, 4)),
}


def case(name, dtype=jnp.float64, batch=5):
  apply_fn, make_params, shape = CASES[name]
  params = make_params(dtype)
  x, y = h.classification_batch(shape, batch)
  x = x.astype(dtype)
  return apply_fn, params, x, y


def cross_entropy(apply_fn):
  return lambda p, x, y: jnp.mean(
      optax.softmax_cross_entropy_with_integer_labels(apply_fn(p, x), y))


# ----------------------------------------------------------------------------
# Structure.
# ----------------------------------------------------------------------------


def test_players_stages_and_layers():
  apply_fn, params, x, _ = case("compact_cnn")
  game = G.from_function(apply_fn, params, x)
  # One stage per layer in execution order (Conv_2 runs inside Conv_1's argument).
  assert [[p.name for p in s.players] for s in game.stages] == [
      ["params/Conv_0"], ["params/Conv_2"], ["params/Conv_1"], ["params/Dense_0"]]
  conv = G.Conv2D(2, (3, 3), (1, 1), ((1, 1), (1, 1)), None)
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
  assert [p.layer for p in game.players] == [None] * 4 + [G.Dense(3, None)]


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
  """A 3-D projection kernel and params as tuples: players without a layer."""

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


def test_root_leaves_and_bias_share_a_stage():
  """Flat params: each leaf a player; a bias added to a product joins its stage."""

  def flat(params, x):
    return jnp.tanh(x @ params["w1"] + params["b1"]) @ params["w2"] + params["b2"]

  params = {"w1": jnp.ones((4, 3)), "b1": jnp.zeros(3), "w2": jnp.ones((3, 2)),
            "b2": jnp.zeros(2)}
  game = G.from_function(flat, params, jnp.ones((3, 4)))
  assert [[p.name for p in s.players] for s in game.stages] == [["w1", "b1"], ["w2", "b2"]]


# ----------------------------------------------------------------------------
# The forward pass and the solvers.
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(CASES))
def test_apply_equals_the_function(name):
  apply_fn, params, x, _ = case(name, jnp.float32)
  game = G.from_function(apply_fn, params, x)
  np.testing.assert_allclose(game.apply(params, x), apply_fn(params, x), rtol=1e-6, atol=1e-6)
  # Another batch size, and single samples under vmap, as the solver calls the stages.
  x_big = jnp.concatenate([x, x[:2]])
  np.testing.assert_allclose(game.apply(params, x_big), apply_fn(params, x_big), rtol=1e-6,
                             atol=1e-6)
  single = jax.vmap(lambda xi: game.apply(params, xi[None])[0])(x)
  np.testing.assert_allclose(single, apply_fn(params, x), rtol=1e-6, atol=1e-6)


OPEN_LOOP = [("identity", lambda: optax.sgd(0.1), 0.1),
             ("rmsprop", lambda: optax.rmsprop(1e-2), 1e-2),
             ("adam", lambda: optax.adam(3e-3, b1=0.8, eps_root=1e-9), 3e-3)]


@pytest.mark.parametrize("name", list(CASES))
def test_open_loop_equals_optax(name):
  """OLNE with a diagonal curvature is SGD/RMSProp/Adam on the gradient (DGNOpt Thm. 6)."""
  apply_fn, params, _, _ = case(name)
  shape = CASES[name][2]
  data = [h.classification_batch(shape, 4, seed=20 + i) for i in range(10)]
  game = G.from_function(apply_fn, params, data[0][0])
  loss = cross_entropy(apply_fn)
  for curvature, make_optax, lr in OPEN_LOOP:
    kwargs = {"b1": 0.8, "eps_root": 1e-9} if curvature == "adam" else {}
    tx = dgnopt.olne(game, lr, getattr(dgnopt.curvature, curvature)(**kwargs))
    opt = make_optax()
    ours, theirs = params, params
    state, opt_state = tx.init(params), opt.init(params)
    for batch in data:
      updates, state = h.step(tx, ours, batch, state)
      expected, opt_state = opt.update(jax.grad(loss)(theirs, *batch), opt_state, theirs)
      h.assert_trees_close(updates, expected, 1e-10)
      ours = optax.apply_updates(ours, updates)
      theirs = optax.apply_updates(theirs, expected)


# One FNE and one GR step per model in the default run; the others with -m slow.
@pytest.mark.parametrize("name,principle,curvature", [
    ("plain_mlp", "fne", "kfac"), ("plain_mlp", "gr", "kfac"),
    ("compact_mlp", "fne", "adam"), ("compact_mlp", "gr", "rmsprop"),
    ("compact_cnn", "fne", "identity"), ("compact_cnn", "gr", "kfac"),
    ("setup_mlp", "fne", "kfac"), ("setup_mlp", "gr", "identity"),
    ("attention", "fne", "adam"), ("attention", "gr", "identity"),
    pytest.param("plain_mlp", "fne", "identity", marks=pytest.mark.slow),
    pytest.param("compact_cnn", "fne", "ekfac", marks=pytest.mark.slow),
    pytest.param("compact_mlp", "gr", "kfac", marks=pytest.mark.slow)])
def test_steps_equal_dense_reference(name, principle, curvature):
  apply_fn, params, x, y = case(name, batch=3)
  game = G.from_function(apply_fn, params, x, weight_decay=0.01)
  lr = 0.05
  make = dgnopt.gr if principle == "gr" else dgnopt.fne
  tx = make(game, lr, curvature, damping=0.5, vxx_reg=1e-2)
  h.assert_steps_match_reference(tx, game, params, (x, y), 1, learning_rate=lr,
                                 curvature=curvature, damping=0.5, vxx_reg=1e-2,
                                 principle=principle)


def equivalent_games():
  """(apply_fn, today's game, params, example input) on networks both readers handle."""
  mlp = nn.Sequential([nn.Dense(5), nn.tanh, nn.Dense(5), nn.tanh, nn.Dense(3)])
  residual = models.Chain([nn.Conv(2, (3, 3)), nn.relu,
                           models.Residual([nn.Conv(2, (3, 3)), nn.relu, nn.Conv(2, (3, 3))]),
                           models.global_average_pool, nn.Dense(3)])
  out = {}
  for name, model, shape in (("flax_mlp", mlp, (4,)), ("flax_residual", residual, (4, 4, 1))):
    x, _ = h.classification_batch(shape, 4)
    params = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64),
                          model.init(jax.random.PRNGKey(0), x))
    out[name] = (model.apply, G.from_flax(model, x), params, x)
  sequential = h.tanh_mlp()
  params = h.perturbed_params(sequential)
  out["sequential_mlp"] = (sequential.apply, sequential, params,
                           h.classification_batch((4,), 4)[0])
  return out


@pytest.mark.parametrize("name", ["sequential_mlp", "flax_mlp", "flax_residual"])
@pytest.mark.parametrize("curvature", ["identity", "kfac"])
def test_updates_equal_todays_game(name, curvature):
  """The traced game is the same game: the same FNE updates over three steps."""
  apply_fn, todays, params, x = equivalent_games()[name]
  traced = G.from_function(apply_fn, params, x)
  assert [[p.path for p in s.players] for s in traced.stages if s.players] == \
      [[p.path for p in s.players] for s in todays.stages if s.players]
  batch = (x, jnp.arange(x.shape[0]) % 3)
  runs = []
  for game in (traced, todays):
    tx = dgnopt.fne(game, 0.1, curvature)
    state, p, updates = tx.init(params), params, []
    for _ in range(3):
      u, state = h.step(tx, p, batch, state)
      updates.append(u)
      p = optax.apply_updates(p, u)
    runs.append(updates)
  for a, b in zip(*runs):
    h.assert_trees_close(a, b, 1e-10)


def test_train_step_compiles_once():
  traces = []

  def counted(params, x):
    traces.append(x.shape)
    return plain_mlp(params, x)

  params = plain_mlp_params(jnp.float64)
  x, y = h.classification_batch((4,), 6)
  game = G.from_function(counted, params, x)
  tx = dgnopt.fne(game, 0.1, "kfac")
  compiles = []

  def update(p, s, b):
    compiles.append(1)
    return tx.update(None, s, p, batch=b)

  step = jax.jit(update)
  state = tx.init(params)
  for i in range(4):
    updates, state = step(params, state, (x + 0.01 * i, y))
    params = optax.apply_updates(params, updates)
    if i == 0:
      traced_shapes = len(traces)
  assert len(compiles) == 1
  assert len(traces) == traced_shapes  # no tracing of apply_fn after the first step
  assert traced_shapes <= 3  # the example batch, a second batch size, single samples


# ----------------------------------------------------------------------------
# Errors.
# ----------------------------------------------------------------------------


def test_batch_mean_is_an_error():
  class Centred(nn.Module):
    @nn.compact
    def __call__(self, x):
      x = nn.Dense(4)(x)
      x = x - jnp.mean(x, axis=0, keepdims=True)
      return nn.Dense(3)(x)

  model = Centred()
  x = jnp.ones((3, 4))
  with pytest.raises(ValueError, match=r"reduce_sum at Centred .*batch axis"):
    G.from_function(model.apply, model.init(jax.random.PRNGKey(0), x), x)


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
