"""The model zoo (``tests/zoo.py``) as traced games, each model against independent computations.

For every model, written as JAX and Flax users write it (a plain function, a
custom ``@nn.compact`` MLP and CNN with an inline residual and max pooling,
setup-style modules, a block with a projection shortcut, attention, the
example's transformer on token ids, an MLP, a CNN and ``models.resnet18``
with train-mode BatchNorm): the game computes the function, its
open-loop solvers are optax's on ``jax.grad`` of the same loss (DGNOpt
Theorem 6), its FNE and GR steps equal the dense reference, and its jitted
train step compiles once.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import dgnopt_jax as dgnopt
import helpers as h
import zoo

G = dgnopt.games


# The transformer's checks take 20-80 s each on a 2-core CPU (19 stages, each
# compiled on its own; the dense reference's Jacobians), the BatchNorm
# models' 5-200 s: they run with -m slow, the transformer's and the
# BatchNorm MLP's forward pass and one GR step of the BatchNorm MLP in the
# default run (tests/test_batch_statistics.py has the rest of BatchNorm's).
SLOW = {"transformer", "batch_norm_mlp", "batch_norm_cnn", "resnet18"}


def zoo_names(slow=SLOW):
  return [pytest.param(n, marks=pytest.mark.slow) if n in slow else n for n in zoo.CASES]


def cross_entropy(apply_fn):
  return lambda p, x, y: jnp.mean(
      optax.softmax_cross_entropy_with_integer_labels(apply_fn(p, x), y))


@pytest.mark.parametrize("name", zoo_names({"batch_norm_cnn", "resnet18"}))
def test_apply_equals_the_function(name):
  apply_fn, params, x, _ = zoo.case(name, jnp.float32)
  game = G.from_function(apply_fn, params, x)
  np.testing.assert_allclose(game.apply(params, x), apply_fn(params, x), rtol=1e-6, atol=1e-6)
  # Another batch size, and single samples under vmap, as the solver calls the stages
  # (batches of one: their own batch statistics where the model has some).
  x_big = jnp.concatenate([x, x[:2]])
  np.testing.assert_allclose(game.apply(params, x_big), apply_fn(params, x_big), rtol=1e-6,
                             atol=1e-6)
  single = jax.vmap(lambda xi: game.apply(params, xi[None])[0])(x)
  np.testing.assert_allclose(single, jax.vmap(lambda xi: apply_fn(params, xi[None])[0])(x),
                             rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", zoo_names())
def test_open_loop_equals_optax(name):
  """OLNE with a diagonal curvature is SGD/RMSProp/Adam on the gradient (DGNOpt Thm. 6)."""
  apply_fn, params, _, _ = zoo.case(name)
  data = zoo.batches(name, 10)
  game = G.from_function(apply_fn, params, data[0][0])
  loss = cross_entropy(apply_fn)
  # resnet18 at width 2 normalises its last stages over 4 samples of 1x1
  # pixels: two SGD trajectories 1e-13 apart drift ~10x apart per step, so
  # optax steps at OLNE's params.
  h.assert_open_loop_equals_optax(game, params, loss, data, one_trajectory=name == "resnet18")


# In the default run a step of each model, FNE and GR each on several (the
# BatchNorm CNN's, ResNet18's and the transformer's with -m slow; tests/conftest.py
# marks more slow); the others with -m slow.
@pytest.mark.parametrize("name,principle,curvature", [
    ("plain_mlp", "fne", "kfac"), ("plain_mlp", "gr", "kfac"),
    ("compact_mlp", "fne", "adam"), ("compact_mlp", "gr", "rmsprop"),
    ("compact_cnn", "fne", "identity"), ("compact_cnn", "gr", "kfac"),
    ("setup_mlp", "fne", "kfac"), ("setup_mlp", "gr", "identity"),
    ("setup_projection", "fne", "adam"), ("setup_projection", "gr", "identity"),
    ("attention", "fne", "adam"), ("attention", "gr", "identity"),
    pytest.param("batch_norm_mlp", "fne", "kfac", marks=pytest.mark.slow),
    ("batch_norm_mlp", "gr", "identity"),
    pytest.param("batch_norm_cnn", "fne", "kfac", marks=pytest.mark.slow),
    pytest.param("batch_norm_cnn", "gr", "identity", marks=pytest.mark.slow),
    pytest.param("resnet18", "fne", "kfac", marks=pytest.mark.slow),
    pytest.param("resnet18", "gr", "identity", marks=pytest.mark.slow),
    pytest.param("transformer", "fne", "adam", marks=pytest.mark.slow),
    pytest.param("transformer", "gr", "kfac", marks=pytest.mark.slow),
    pytest.param("transformer", "fne", "ekfac", marks=pytest.mark.slow),
    pytest.param("plain_mlp", "fne", "identity", marks=pytest.mark.slow),
    pytest.param("compact_cnn", "fne", "ekfac", marks=pytest.mark.slow),
    pytest.param("compact_mlp", "gr", "kfac", marks=pytest.mark.slow),
    pytest.param("setup_projection", "fne", "kfac", marks=pytest.mark.slow),
    pytest.param("transformer", "fne", "identity", marks=pytest.mark.slow),
    pytest.param("transformer", "gr", "adam", marks=pytest.mark.slow)])
def test_steps_equal_dense_reference(name, principle, curvature):
  apply_fn, params, x, y = zoo.case(name, batch=3)
  game = G.from_function(apply_fn, params, x, weight_decay=0.01)
  lr = 0.05
  make = dgnopt.gr if principle == "gr" else dgnopt.fne
  tx = make(game, lr, curvature, damping=0.5, vxx_reg=1e-2)
  h.assert_steps_match_reference(tx, game, params, (x, y), 1, learning_rate=lr,
                                 curvature=curvature, damping=0.5, vxx_reg=1e-2,
                                 principle=principle)


# The default run compiles a function and a residual block with a projection
# shortcut; the other models with -m slow.
@pytest.mark.parametrize("name", zoo_names(set(zoo.CASES) - {"plain_mlp", "setup_projection"}))
def test_train_step_compiles_once(name):
  """20 jitted FNE steps on new data: one trace of the step, no tracing of the model after it."""
  apply_fn, params, _, _ = zoo.case(name)
  model_traces = []

  def counted(p, x):
    model_traces.append(x.shape)
    return apply_fn(p, x)

  data = zoo.batches(name, 20, batch=6)
  game = G.from_function(counted, params, data[0][0])
  tx = dgnopt.fne(game, 0.1, "kfac")
  step_traces = []

  def update(p, s, b):
    step_traces.append(1)
    return tx.update(None, s, p, batch=b)

  step = jax.jit(update)
  state = tx.init(params)
  for i, batch in enumerate(data):
    updates, state = step(params, state, batch)
    params = optax.apply_updates(params, updates)
    if i == 0:
      traced = len(model_traces)
  assert len(step_traces) == 1
  assert len(model_traces) == traced  # no tracing of apply_fn after the first step
  assert traced <= 3  # the example batch, a second batch size, single samples
  assert np.isfinite(float(state.loss)) and int(state.count) + int(state.rejected) == 20
