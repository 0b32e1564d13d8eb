"""Flax NNX modules as games, nnx.Optimizer and flax TrainState loops.

The NNX game computes ``model(x)``, its open-loop solvers are optax's on
``jax.grad`` of the same loss (DGNOpt Theorem 6), its FNE/GR steps equal the
dense reference; ``nnx.Optimizer`` trains inside ``nnx.jit`` and
``dgnopt.apply_game_step`` inside ``jax.jit``, each compiled once and equal to
the plain ``tx.update`` loop.
"""

import flax.linen as nn
from flax import nnx
from flax.training.train_state import TrainState
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import dgnopt_jax as dgnopt
import helpers as h

G = dgnopt.games


class MLP(nnx.Module):
  """Hidden layers in an ``nnx.List``: players ``layers/0``, ``layers/1``, ``head``."""

  def __init__(self, rngs, dtype=jnp.float32):
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=dtype)
    self.layers = nnx.List([nnx.Linear(4, 5, **kw), nnx.Linear(5, 5, **kw)])
    self.head = nnx.Linear(5, 3, **kw)

  def __call__(self, x):
    x = jnp.tanh(self.layers[0](x))
    x = nnx.relu(self.layers[1](x))
    return self.head(x)


class CNN(nnx.Module):
  """8x8x1 images: two convolutions, a max pooling, a Linear head."""

  def __init__(self, rngs, dtype=jnp.float32):
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=dtype)
    self.conv1 = nnx.Conv(1, 2, (3, 3), **kw)
    self.conv2 = nnx.Conv(2, 2, (3, 3), strides=(2, 2), **kw)
    self.head = nnx.Linear(8, 3, **kw)

  def __call__(self, x):
    x = nnx.relu(self.conv1(x))
    x = nnx.relu(self.conv2(x))                       # 4x4x2
    x = nnx.max_pool(x, (2, 2), (2, 2))               # 2x2x2
    return self.head(x.reshape(x.shape[0], -1))


SHAPES = {"mlp": (4,), "cnn": (8, 8, 1)}
MODELS = {"mlp": MLP, "cnn": CNN}


def make(name, dtype=jnp.float64, seed=0):
  """The model with its params moved off Flax's init (biases not zero)."""
  model = MODELS[name](nnx.Rngs(seed), dtype)
  rng = np.random.default_rng(seed)
  params = nnx.as_pure(nnx.state(model, nnx.Param))
  nnx.update(model, jax.tree.map(
      lambda a: jnp.asarray(np.asarray(a) + 0.1 * rng.normal(size=a.shape), dtype), params))
  return model


def params_of(model):
  return nnx.as_pure(nnx.state(model, nnx.Param))


def batch(name, size, seed=1, dtype=jnp.float64):
  x, y = h.classification_batch(SHAPES[name], size, seed=seed)
  return x.astype(dtype), y


def cross_entropy(model):
  """The loss on the pure params state through nnx.merge, independent of the traced game."""
  graphdef, _, rest = nnx.split(model, nnx.Param, ...)

  def loss(params, x, y):
    logits = nnx.merge(graphdef, params, rest)(x)
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, y))

  return loss


# ----------------------------------------------------------------------------
# Structure and forward pass.
# ----------------------------------------------------------------------------


def test_players_are_named_by_module_path():
  mlp, cnn = make("mlp"), make("cnn")
  game = G.from_nnx(mlp, batch("mlp", 3)[0])
  assert [[p.name for p in s.players] for s in game.stages] == [
      ["layers/0"], ["layers/1"], ["head"]]
  assert [p.layer for p in game.players] == [G.Dense(5, None), G.Dense(5, None), G.Dense(3, None)]
  assert game.input_shape == (4,)
  game = G.from_nnx(cnn, batch("cnn", 3)[0])
  assert [p.name for p in game.players] == ["conv1", "conv2", "head"]
  assert [p.layer for p in game.players] == [
      G.Conv2D(2, (3, 3), (1, 1), "SAME", None),
      G.Conv2D(2, (3, 3), (2, 2), "SAME", None), G.Dense(3, None)]
  # from_flax reads an nnx.Module through from_nnx.
  assert [p.path for p in G.from_flax(cnn, batch("cnn", 3)[0]).players] == [
      p.path for p in game.players]


@pytest.mark.parametrize("name", list(MODELS))
def test_apply_equals_the_model(name):
  model = make(name, jnp.float32)
  x, _ = batch(name, 5, dtype=jnp.float32)
  game = G.from_nnx(model, x)
  params = params_of(model)
  np.testing.assert_allclose(game.apply(params, x), model(x), rtol=1e-6, atol=1e-6)
  x_big = jnp.concatenate([x, x[:2]])
  np.testing.assert_allclose(game.apply(params, x_big), model(x_big), rtol=1e-6, atol=1e-6)


def test_eval_mode_batch_norm_and_dropout_are_constants_of_the_game():
  class Normed(nnx.Module):
    def __init__(self, rngs):
      self.dense = nnx.Linear(4, 5, rngs=rngs)
      self.bn = nnx.BatchNorm(5, rngs=rngs)
      self.drop = nnx.Dropout(0.5, rngs=rngs)
      self.head = nnx.Linear(5, 3, rngs=rngs)

    def __call__(self, x):
      return self.head(self.drop(nnx.relu(self.bn(self.dense(x)))))

  model = Normed(nnx.Rngs(0))
  x, _ = batch("mlp", 5, dtype=jnp.float32)
  model(x)  # train mode: the running averages move off their initial values
  model.eval()
  game = G.from_nnx(model, x)
  assert [p.name for p in game.players] == ["dense", "bn", "head"]
  np.testing.assert_allclose(game.apply(params_of(model), x), model(x), rtol=1e-6, atol=1e-6)


def test_integer_inputs_through_an_embedding():
  class Bag(nnx.Module):
    def __init__(self, rngs):
      self.embed = nnx.Embed(7, 4, rngs=rngs, param_dtype=jnp.float64)
      self.head = nnx.Linear(4, 3, rngs=rngs, param_dtype=jnp.float64)

    def __call__(self, tokens):
      return self.head(jnp.mean(self.embed(tokens), axis=1))

  model = Bag(nnx.Rngs(0))
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 7, size=(5, 3)), jnp.int32)
  labels = jnp.arange(5) % 3
  game = G.from_nnx(model, tokens)
  params = params_of(model)
  np.testing.assert_allclose(game.apply(params, tokens), model(tokens), rtol=1e-12)
  updates, _ = h.step(dgnopt.olne(game, 0.1), params, (tokens, labels))
  grads = jax.grad(cross_entropy(model))(params, tokens, labels)
  h.assert_trees_close(updates, jax.tree.map(lambda g: -0.1 * g, grads), 1e-10)


# ----------------------------------------------------------------------------
# The solvers.
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(MODELS))
def test_open_loop_equals_optax(name):
  """OLNE with a diagonal curvature is SGD/RMSProp/Adam on the gradient (DGNOpt Thm. 6)."""
  model = make(name)
  params = params_of(model)
  data = [batch(name, 4, seed=20 + i) for i in range(10)]
  game = G.from_nnx(model, data[0][0])
  loss = cross_entropy(model)
  h.assert_open_loop_equals_optax(game, params, loss, data)


# One FNE and one GR step in the default run; the Kronecker curvatures with -m slow.
@pytest.mark.parametrize("name,principle,curvature", [
    ("mlp", "gr", "adam"), ("cnn", "fne", "identity"),
    pytest.param("mlp", "fne", "kfac", marks=pytest.mark.slow),
    pytest.param("cnn", "gr", "kfac", marks=pytest.mark.slow)])
def test_steps_equal_dense_reference(name, principle, curvature):
  model = make(name)
  x, y = batch(name, 3)
  game = G.from_nnx(model, x, weight_decay=0.01)
  lr = 0.05
  make_tx = dgnopt.gr if principle == "gr" else dgnopt.fne
  tx = make_tx(game, lr, curvature, damping=0.5, vxx_reg=1e-2)
  h.assert_steps_match_reference(tx, game, params_of(model), (x, y), 1, learning_rate=lr,
                                 curvature=curvature, damping=0.5, vxx_reg=1e-2,
                                 principle=principle)


# ----------------------------------------------------------------------------
# Training loops.
# ----------------------------------------------------------------------------


def test_nnx_optimizer_trains_inside_nnx_jit_compiled_once():
  model = make("mlp")
  data = [batch("mlp", 6, seed=40 + i) for i in range(20)]
  game = G.from_nnx(model, data[0][0])
  tx = optax.chain(dgnopt.fne(game, 0.1, "kfac"), optax.clip_by_global_norm(1.0))
  # The plain loop on the pure params state, from the same params.
  params = params_of(model)
  state = tx.init(params)
  for b in data:
    updates, state = h.step(tx, params, b, state)
    params = optax.apply_updates(params, updates)

  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  traces = []

  @nnx.jit
  def train_step(model, optimizer, x, y):
    traces.append(1)
    optimizer.update(model, None, batch=(x, y))

  loss0 = float(game.loss_value(params_of(model), *data[0]))
  for b in data:
    train_step(model, optimizer, *b)
  assert len(traces) == 1
  assert int(optimizer.step[...]) == 20
  h.assert_trees_close(params_of(model), params, 1e-10)
  assert float(game.loss_value(params_of(model), *data[0])) < loss0


def test_train_state_step_equals_the_plain_loop_compiled_once():
  model = nn.Sequential([nn.Dense(5), nn.tanh, nn.Dense(3)])
  data = [batch("mlp", 6, seed=60 + i) for i in range(20)]
  variables = jax.tree.map(lambda a: a.astype(jnp.float64),
                           model.init(jax.random.PRNGKey(0), data[0][0]))
  game = G.from_flax(model, data[0][0])
  tx = optax.chain(dgnopt.gr(game, 0.05, "adam"), optax.clip_by_global_norm(1.0))
  params, opt_state = variables, tx.init(variables)
  for b in data:
    updates, opt_state = h.step(tx, params, b, opt_state)
    params = optax.apply_updates(params, updates)

  traces = []

  def counted(state, b):
    traces.append(1)
    return dgnopt.apply_game_step(state, b)

  step = jax.jit(counted)
  train_state = TrainState.create(apply_fn=model.apply, params=variables, tx=tx)
  for b in data:
    train_state = step(train_state, b)
  assert len(traces) == 1
  assert int(train_state.step) == 20
  h.assert_trees_close(train_state.params, params, 1e-10)
  h.assert_trees_close(train_state.opt_state, opt_state, 1e-10)


# ----------------------------------------------------------------------------
# Errors.
# ----------------------------------------------------------------------------


class WithBatchNorm(nnx.Module):
  def __init__(self, rngs):
    self.dense = nnx.Linear(4, 3, rngs=rngs)
    self.norm = nnx.BatchNorm(3, rngs=rngs)

  def __call__(self, x):
    return self.norm(self.dense(x))


class WithDropout(nnx.Module):
  def __init__(self, rngs):
    self.dense = nnx.Linear(4, 3, rngs=rngs)
    self.drop = nnx.Dropout(0.5, rngs=rngs)

  def __call__(self, x):
    return self.drop(self.dense(x))


class Counting(nnx.Module):
  def __init__(self, rngs):
    self.dense = nnx.Linear(4, 3, rngs=rngs)
    self.calls = nnx.Variable(jnp.zeros((), jnp.int32))

  def __call__(self, x):
    self.calls[...] += 1
    return self.dense(x)


@pytest.mark.parametrize("module,named", [
    (WithBatchNorm, r"'norm/mean' \(BatchStat\), 'norm/var' \(BatchStat\)"),
    (WithDropout, r"'drop/rngs/count' \(RngCount\)"),
    (Counting, r"'calls' \(Variable\)")])
def test_forward_passes_that_change_variables_are_errors(module, named):
  with pytest.raises(ValueError, match=r"calling \w+ changes the variables " + named +
                     r".*model\.eval\(\)"):
    G.from_nnx(module(nnx.Rngs(0)), jnp.ones((3, 4), jnp.float32))


class BatchSoftmax(nnx.Module):
  """A softmax over the batch axis: samples coupled other than by a batch statistic."""

  def __init__(self, rngs):
    self.dense = nnx.Linear(4, 4, rngs=rngs)

  def __call__(self, x):
    return jax.nn.softmax(self.dense(x), axis=0)


class Stacked(nnx.Module):
  def __init__(self, rngs):
    self.blocks = nnx.List([nnx.Linear(4, 4, rngs=rngs), BatchSoftmax(rngs)])
    self.head = nnx.Linear(4, 3, rngs=rngs)

  def __call__(self, x):
    for block in self.blocks:
      x = block(x)
    return self.head(x)


def test_errors_of_the_traced_program_name_the_module_path():
  original = BatchSoftmax.__call__
  with pytest.raises(ValueError, match=r"reduce_max at Stacked/blocks/1 .*BatchSoftmax.__call__"
                     r".*batch axis"):
    G.from_nnx(Stacked(nnx.Rngs(0)), jnp.ones((3, 4)))
  assert BatchSoftmax.__call__ is original and "__call__" not in vars(nnx.List)


def test_gradients_passed_to_the_nnx_optimizer_are_refused():
  model = make("mlp")
  x, y = batch("mlp", 4)
  optimizer = nnx.Optimizer(model, dgnopt.fne(G.from_nnx(model, x), 0.1), wrt=nnx.Param)
  grads = nnx.grad(lambda m: jnp.mean(optax.softmax_cross_entropy_with_integer_labels(
      m(x), y)))(model)
  with pytest.raises(TypeError, match=r"optimizer\.update\(model, None, batch=\.\.\.\)"):
    optimizer.update(model, grads, batch=(x, y))


def test_bad_models_and_arguments_are_errors():
  with pytest.raises(TypeError, match="must be a flax.nnx.Module, got Sequential"):
    G.from_nnx(nn.Sequential([nn.Dense(3)]), jnp.ones((3, 4)))
  model = make("mlp")
  with pytest.raises(TypeError, match=r"model\.eval\(\).*for linen models"):
    G.from_flax(model, jnp.ones((3, 4)), train=False)

  class NoParams(nnx.Module):
    def __call__(self, x):
      return jnp.tanh(x)

  with pytest.raises(ValueError, match=r"NoParams has no variables matching wrt"):
    G.from_nnx(NoParams(), jnp.ones((3, 4)))
  linear = nnx.Linear(4, 3, rngs=nnx.Rngs(0))
  x, y = jnp.ones((3, 4), jnp.float32), jnp.arange(3)
  tx = dgnopt.fne(G.from_nnx(linear, x), 0.1)
  variables = nnx.state(linear, nnx.Param)  # nnx.Param objects, not their arrays
  with pytest.raises(TypeError, match=r"\['kernel', 'bias'\] hold nnx.Variable.*nnx.as_pure"):
    tx.update(None, tx.init(variables), variables, batch=(x, y))
  with pytest.raises(TypeError, match=r"dict lacks \['step', 'params', 'tx'"):
    dgnopt.apply_game_step({"params": params_of(model)}, batch("mlp", 3))
