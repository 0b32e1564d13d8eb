"""Flax models as games (games.from_flax): forward pass, updates, BatchNorm, errors.

Every check compares with an independent computation: ``model.apply`` (and
its ``mutable=["batch_stats"]`` result), the same network written by hand
with the games API, the dense reference, or ``jax.grad`` of a plain function.
"""

import functools

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
SLOW = pytest.mark.slow
avg_pool = functools.partial(nn.avg_pool, window_shape=(2, 2), strides=(2, 2))
max_pool = functools.partial(nn.max_pool, window_shape=(2, 2), strides=(2, 2))


def images(batch=3, shape=(4, 4, 1), seed=1):
  x = jax.random.normal(jax.random.PRNGKey(seed), (batch,) + shape, jnp.float64)
  return x, jnp.arange(batch) % 3


def variables_of(model, x, seed=0, **kwargs):
  """Variables shaped as ``model.init`` makes them, drawn with numpy in float64.

  Kernels ``N(0, 1/fan_in)`` plus noise, biases and scales non-trivial,
  BatchNorm running variances in [0.5, 1.5]. (Compiling Flax's own
  initialisers takes most of a minute for a ResNet18 on a 2-core CPU.)
  """
  shapes = jax.eval_shape(functools.partial(model.init, **kwargs), jax.random.PRNGKey(0), x)
  rng = np.random.default_rng(seed)

  def draw(path, s):
    names = [getattr(k, "key", None) for k in path]
    if names[0] == "batch_stats":
      low = 0.5 if names[-1] == "var" else -0.5
      return jnp.asarray(rng.uniform(low, low + 1.0, s.shape), jnp.float64)
    fan_in = int(np.prod(s.shape[:-1])) if len(s.shape) > 1 else 0
    base = rng.normal(size=s.shape) / np.sqrt(fan_in) if fan_in else 1.0 * (names[-1] == "scale")
    return jnp.asarray(base + 0.1 * rng.normal(size=s.shape), jnp.float64)

  return jax.tree_util.tree_map_with_path(draw, shapes)


def flax_forward(model, variables, x, train):
  """``model.apply`` as Flax users call it: (output, new batch_stats or None).

  Eager, as ``game.apply`` below: op by op the two are bit for bit equal, and
  eager runs of these small networks take less time than compiling them.
  """
  kwargs = {"train": train} if isinstance(model, models.Chain) else {}
  if "batch_stats" in variables and train:
    out, new = model.apply(variables, x, mutable=["batch_stats"], **kwargs)
    return out, new["batch_stats"]
  return model.apply(variables, x, **kwargs), None


# ----------------------------------------------------------------------------
# Forward pass = model.apply.
# ----------------------------------------------------------------------------


def bn(**kw):
  return nn.BatchNorm(momentum=0.9, epsilon=1e-5, **kw)


MODELS = {
    "dense_activations": lambda: (nn.Sequential([
        models.flatten, nn.Dense(5), nn.relu, nn.Dense(4), nn.tanh, nn.sigmoid, nn.Dense(4),
        nn.gelu, nn.Dense(3, use_bias=False)]), (4, 4, 1)),
    "conv_pool_flatten": lambda: (nn.Sequential([
        nn.Conv(3, (3, 3)), nn.relu, max_pool, nn.Conv(2, (2, 2), strides=(1, 1), padding="VALID"),
        nn.Conv(2, (3, 3), padding=1, use_bias=False), avg_pool, models.flatten, nn.Dense(3)]),
        (6, 6, 1)),
    "flax_evaluated": lambda: (nn.Sequential([
        nn.Conv(2, (3, 3), kernel_dilation=(2, 2)), nn.Dense(3), nn.LayerNorm(), nn.relu,
        nn.GroupNorm(num_groups=1), nn.RMSNorm(), models.global_average_pool, nn.Dense(3)]),
        (4, 4, 1)),
    "layer_norm": lambda: (nn.Sequential([models.flatten, nn.Dense(4), nn.LayerNorm(), nn.tanh,
                                          nn.Dense(3)]), (4, 4, 1)),
    "batch_norm": lambda: (models.Chain([
        nn.Conv(2, (3, 3)), bn(), nn.relu, models.flatten, nn.Dense(4), bn(use_fast_variance=False),
        nn.tanh, nn.Dense(3)]), (4, 4, 1)),
    "residual": lambda: (models.Chain([
        nn.Conv(3, (3, 3)), nn.relu,
        models.Residual([nn.Conv(3, (3, 3)), nn.relu, nn.Conv(3, (3, 3))]),
        models.Residual([nn.Conv(2, (3, 3)), nn.relu, nn.Conv(2, (3, 3))], [nn.Conv(2, (1, 1))]),
        avg_pool, models.flatten, nn.Dense(3)]), (4, 4, 1)),
    "inception": lambda: (models.inception_net(3, stem=2, features=1, blocks=2), (4, 4, 1)),
    "resnet18_narrow": lambda: (models.resnet18(3, width=2), (8, 8, 1)),
}


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("train", [True, False])
def test_forward_pass_and_batch_stats_equal_flax(name, train):
  model, shape = MODELS[name]()
  x, _ = images(3, shape)
  variables = variables_of(model, x, **({"train": True} if isinstance(model, models.Chain) else {}))
  game = G.from_flax(model, x, train=train, variables=variables)
  assert jax.tree.structure(jax.eval_shape(game.init, jax.random.PRNGKey(0))) == \
      jax.tree.structure(variables)
  ours = game.apply(variables, x)
  theirs, new_stats = flax_forward(model, variables, x, train)
  np.testing.assert_array_equal(ours, theirs)
  updated = G.update_batch_stats(game, variables, x)
  if new_stats is None:
    assert updated is variables or jax.tree.all(jax.tree.map(jnp.array_equal, updated, variables))
  else:
    # Equal to rounding: XLA may fuse the two variance reductions differently.
    h.assert_trees_close(updated["batch_stats"], new_stats, 1e-14)
    assert jax.tree.all(jax.tree.map(jnp.array_equal, updated["params"], variables["params"]))


@SLOW
def test_full_resnet18_forward_and_batch_stats():
  model = models.resnet18(10)
  x, _ = images(2, (32, 32, 3))
  variables = variables_of(model, x, train=True)
  assert sum(a.size for a in jax.tree.leaves(variables["params"])) == 11173962
  for train in (True, False):
    game = G.from_flax(model, x, train=train, variables=variables)
    theirs, new_stats = flax_forward(model, variables, x, train)
    np.testing.assert_array_equal(game.apply(variables, x), theirs)
    if train:
      updated = G.update_batch_stats(game, variables, x)
      h.assert_trees_close(updated["batch_stats"], new_stats, 1e-12)


def test_players_keep_their_layers():
  # Dense/Conv players keep their ready-made layer (Kronecker curvatures use it;
  # the activation stays in the stage), an inception block is one 4-player stage.
  game = G.from_flax(models.inception_net(3, stem=2, features=1), jnp.zeros((1, 4, 4, 1)))
  assert [s.num_players for s in game.stages] == [1, 4, 0, 0, 1]
  assert game.players[0].layer == G.Conv2D(2, (3, 3), activation=None)
  assert all(p.layer == G.Conv2D(1, p.layer.kernel_size, activation=None)
             for p in game.stages[1].players)
  mlp = G.from_flax(mlp_pair()[0], jnp.zeros((1, 4)))
  assert [p.layer for p in mlp.players] == [G.Dense(5), G.Dense(5), G.Dense(3)]


def test_resnet18_players_and_stages():
  game = G.from_flax(models.resnet18(10, width=2), jnp.zeros((1, 8, 8, 3)))
  kinds = [type(p.layer).__name__ for p in game.players]
  # 20 convolutions (17 3x3, 3 projections) + the classifier keep their layer; 20 BatchNorms.
  assert kinds.count("Conv2D") == 20 and kinds.count("Dense") == 1
  assert kinds.count("NoneType") == 20
  assert max(s.num_players for s in game.stages) == 2  # projection beside the body's last layer


# ----------------------------------------------------------------------------
# Updates = the same network written by hand = the dense reference.
# ----------------------------------------------------------------------------


def mlp_pair():
  model = nn.Sequential([nn.Dense(5), nn.tanh, nn.Dense(5), nn.tanh, nn.Dense(3)])
  hand = G.sequential([G.Dense(5, "tanh"), G.Dense(5, "tanh"), G.Dense(3)], (4,),
                      paths=[("params", f"layers_{i}") for i in (0, 2, 4)])
  return model, hand, (4,), {}


def cnn_pair():
  model = nn.Sequential([nn.Conv(2, (3, 3)), nn.relu, nn.Conv(2, (3, 3)), nn.relu, avg_pool,
                         models.flatten, nn.Dense(4), nn.relu, nn.Dense(3)])
  hand = G.sequential([G.Conv2D(2, (3, 3)), G.Conv2D(2, (3, 3)), G.AvgPool((2, 2)), G.Flatten(),
                       G.Dense(4, "relu"), G.Dense(3)], (4, 4, 1),
                      paths=[("params", f"layers_{i}") for i in (0, 2, 6, 8)])
  return model, hand, (4, 4, 1), {}


def blocks_pair(alignment):
  """Residual (identity and projection) and inception blocks; the hand game's own params layout."""
  model = models.Chain([
      nn.Conv(3, (3, 3)), nn.relu,
      models.Residual([nn.Conv(3, (3, 3)), nn.relu, nn.Conv(3, (3, 3))]),
      models.Residual([nn.Conv(2, (3, 3)), nn.relu, nn.Conv(2, (3, 3))], [nn.Conv(2, (1, 1))]),
      models.inception_block(1), avg_pool, models.flatten, nn.Dense(3)])
  hand = G.sequential([G.Conv2D(3, (3, 3)), G.ResidualBlock(3),
                       G.ResidualBlock(2, shortcut="projection", alignment=alignment),
                       G.InceptionBlock(1), G.AvgPool(), G.Dense(3)], (4, 4, 1))
  names = {("layers_0",): ("conv2d_0",), ("layers_2", "body_0"): ("residual_1", "conv1"),
           ("layers_2", "body_2"): ("residual_1", "conv2"),
           ("layers_3", "body_0"): ("residual_2", "conv1"),
           ("layers_3", "body_2"): ("residual_2", "conv2"),
           ("layers_3", "shortcut_0"): ("residual_2", "shortcut"),
           ("layers_4", "branches_0_0"): ("inception_3", "b1x1"),
           ("layers_4", "branches_1_0"): ("inception_3", "b3x3"),
           ("layers_4", "branches_2_0"): ("inception_3", "b5x5"),
           ("layers_4", "branches_3_1"): ("inception_3", "pool"),
           ("layers_7",): ("dense_5",)}
  return model, hand, (4, 4, 1), names


def to_hand(tree, names):
  if not names:
    return tree
  out = {}
  for flax_path, hand_path in names.items():
    node = out
    for k in hand_path[:-1]:
      node = node.setdefault(k, {})
    node[hand_path[-1]] = G.get_path(tree, ("params",) + flax_path)
  return out


def residual_pair():
  model = models.Chain([nn.Conv(2, (3, 3)), nn.relu,
                        models.Residual([nn.Conv(2, (3, 3)), nn.relu, nn.Conv(2, (3, 3))],
                                        [nn.Conv(2, (1, 1))]),
                        avg_pool, models.flatten, nn.Dense(3)])
  hand = G.sequential([G.Conv2D(2, (3, 3)), G.ResidualBlock(2, shortcut="projection"),
                       G.AvgPool(), G.Dense(3)], (4, 4, 1))
  names = {("layers_0",): ("conv2d_0",), ("layers_2", "body_0"): ("residual_1", "conv1"),
           ("layers_2", "body_2"): ("residual_1", "conv2"),
           ("layers_2", "shortcut_0"): ("residual_1", "shortcut"), ("layers_5",): ("dense_3",)}
  return model, hand, (4, 4, 1), names


PAIRS = {"mlp": mlp_pair, "residual": residual_pair, "cnn": cnn_pair, "blocks_merge": lambda: blocks_pair("merge"),
         "blocks_split": lambda: blocks_pair("split")}


def pair_batch(shape):
  if len(shape) == 3:
    return images(3, shape)
  return jax.random.normal(jax.random.PRNGKey(1), (3,) + shape, jnp.float64), jnp.arange(3) % 3


def default_or_slow(*default):
  return lambda *case: () if case in default else SLOW


def flax_update(pair, principle, curvature):
  """One fne/gr step on the game from_flax reads: (updates, game, variables, batch, lr)."""
  model, _, shape, _ = PAIRS[pair]()
  x, y = pair_batch(shape)
  alignment = pair.split("_")[1] if pair.startswith("blocks") else "merge"
  game = G.from_flax(model, x, alignment=alignment)
  variables = variables_of(model, x)
  make = dgnopt.fne if principle == "fne" else dgnopt.gr
  lr = 0.3 if curvature == "identity" else 0.05
  ours = h.step(make(game, lr, curvature, vxx_reg=1e-3), variables, (x, y))[0]
  return ours, game, variables, (x, y), lr


@pytest.mark.parametrize("pair,principle,curvature", [
    pytest.param(p, pr, c, marks=default_or_slow(("residual", "gr", "identity"))(p, pr, c))
    for p in PAIRS for pr in ("fne", "gr") for c in ("identity", "kfac")])
def test_updates_equal_hand_written_game(pair, principle, curvature):
  ours, _, variables, batch, lr = flax_update(pair, principle, curvature)
  _, hand, _, names = PAIRS[pair]()
  make = dgnopt.fne if principle == "fne" else dgnopt.gr
  theirs = h.step(make(hand, lr, curvature, vxx_reg=1e-3), to_hand(variables, names), batch)[0]
  h.assert_trees_close(to_hand(ours, names), theirs, 1e-12)


@pytest.mark.parametrize("pair,principle,curvature", [
    pytest.param(p, pr, c, marks=default_or_slow(("mlp", "gr", "identity"))(p, pr, c))
    for p in PAIRS for pr in ("fne", "gr") for c in ("identity", "kfac")])
def test_updates_equal_dense_reference(pair, principle, curvature):
  ours, game, variables, batch, lr = flax_update(pair, principle, curvature)
  ref, _ = h.reference_step(game, variables, batch, learning_rate=lr, curvature=curvature,
                            vxx_reg=1e-3, principle=principle)
  h.assert_trees_close(ours, ref, 1e-8)


@SLOW
@pytest.mark.parametrize("curvature", ["identity", "kfac"])
def test_layer_norm_players_equal_reference(curvature):
  # LayerNorm players carry no layer: the Kronecker curvatures give them the diagonal.
  model = nn.Sequential([nn.Dense(4), nn.LayerNorm(), nn.tanh, nn.Dense(3)])
  x = jax.random.normal(jax.random.PRNGKey(2), (4, 3), jnp.float64)
  y = jnp.arange(4) % 3
  game = G.from_flax(model, x)
  assert [p.layer is None for p in game.players] == [False, True, False]
  variables = variables_of(model, x)
  tx = dgnopt.fne(game, 0.2, curvature, vxx_reg=1e-3)
  state, ref_state = None, None
  for _ in range(2 if curvature == "kfac" else 1):
    updates, state = h.step(tx, variables, (x, y), state)
    ref, ref_state = h.reference_step(game, variables, (x, y), ref_state, learning_rate=0.2,
                                      curvature=curvature, vxx_reg=1e-3)
    h.assert_trees_close(updates, ref, 1e-8)
    variables = jax.tree.map(jnp.add, variables, updates)


# ----------------------------------------------------------------------------
# BatchNorm: gradient through the statistics, curvature with them held fixed.
# ----------------------------------------------------------------------------


def bn_model():
  return models.Chain([nn.Conv(2, (3, 3)), bn(), nn.relu, models.flatten, nn.Dense(3)])


def bn_hand_game():
  """The same network written with games.stage: a statistics stage and a per-sample normalisation."""
  def statistics(held):
    def stats(x, th):
      del th
      mean = jnp.mean(x, (0, 1, 2))
      var = jnp.maximum(0.0, jnp.mean(x * x, (0, 1, 2)) - mean * mean)
      copy = lambda s: jnp.broadcast_to(held(s), (x.shape[0],) + s.shape)
      return x, copy(mean), copy(var)
    return stats

  def normalise(state, th):
    x, mean, var = state
    mean, var = mean[:, None, None, :], var[:, None, None, :]
    return jax.nn.relu((x - mean) * (jax.lax.rsqrt(var + 1e-5) * th[0]["scale"]) + th[0]["bias"])

  conv, dense = G.Conv2D(2, (3, 3), activation=None), G.Dense(3)
  p = lambda name, layer=None: G.Player(("params", name), 0.0, layer)
  stages = [G.stage(lambda x, th: conv(th[0], x), [p("layers_0", conv)]),
            G.stage(statistics(jax.lax.stop_gradient), gradient_fn=statistics(lambda s: s)),
            G.stage(normalise, [p("layers_1")]),
            G.stage(lambda x, th: x.reshape(x.shape[0], -1)),
            G.stage(lambda x, th: dense(th[0], x), [p("layers_4", dense)])]
  return G.Game(stages, "softmax_cross_entropy")


@pytest.mark.parametrize("principle,curvature", [
    ("fne", "identity"), pytest.param("gr", "identity", marks=SLOW),
    pytest.param("fne", "kfac", marks=SLOW), pytest.param("gr", "adam", marks=SLOW)])
def test_batch_norm_updates_equal_hand_written_game_and_reference(principle, curvature):
  model = bn_model()
  x, y = images(4)
  game = G.from_flax(model, x)
  variables = variables_of(model, x, train=True)
  make = dgnopt.fne if principle == "fne" else dgnopt.gr
  # The power iteration of the convexity safeguard runs to convergence, so the
  # fast path's w equals the reference's eigensolve (Adam's tr(G) > 1 here).
  ours = h.step(make(game, 0.1, curvature, vxx_reg=1e-3, coupling_iterations=100),
                variables, (x, y))[0]
  theirs = h.step(make(bn_hand_game(), 0.1, curvature, vxx_reg=1e-3, coupling_iterations=100),
                  variables, (x, y))[0]
  ref, _ = h.reference_step(game, variables, (x, y), learning_rate=0.1, curvature=curvature,
                            vxx_reg=1e-3, principle=principle)
  if curvature == "adam":
    # The convolution's bias before the BatchNorm has a zero gradient (the
    # normalisation removes any shift); Adam divides its roundoff (1e-17) by
    # |g| + eps, so its update is noise of ~1e-10 in every computation.
    for tree in (ours, theirs, ref):
      assert float(jnp.max(jnp.abs(tree["params"]["layers_0"]["bias"]))) < 1e-8
      tree["params"]["layers_0"]["bias"] = jnp.zeros(2)
  h.assert_trees_close(ours, theirs, 1e-12)
  # The dense reference (explicit batch Jacobians, the first-order terms
  # through the statistics) agrees with the per-sample fast path.
  h.assert_trees_close(ours, ref, 1e-8)
  assert jax.tree.all(jax.tree.map(lambda u: bool(jnp.all(u == 0)), ours["batch_stats"]))


def test_batch_norm_open_loop_sgd_is_sgd_on_the_train_mode_gradient():
  model = bn_model()
  x, y = images(4)
  variables = variables_of(model, x, train=True)
  game = G.from_flax(model, x)
  updates = h.step(dgnopt.olne(game, 0.1), variables, (x, y))[0]["params"]

  def flax_loss(params):
    logits, _ = model.apply({"params": params, "batch_stats": variables["batch_stats"]}, x,
                            mutable=["batch_stats"])
    return jnp.mean(-jax.nn.log_softmax(logits)[jnp.arange(4), y])

  true = jax.grad(flax_loss)(variables["params"])
  h.assert_trees_close(updates, jax.tree.map(lambda g: -0.1 * g, true), 1e-10)
  # The dense reference's co-state goes through the statistics as well.
  ref = h.reference_step(game, variables, (x, y), learning_rate=0.1, feedback=False)[0]
  h.assert_trees_close(ref["params"], jax.tree.map(lambda g: -0.1 * g, true), 1e-10)

  def fixed_statistics_loss(params):
    """The network by hand, with jax.lax.stop_gradient on the batch statistics."""
    def batch_norm(z, p):
      axes = tuple(range(z.ndim - 1))
      mean = jax.lax.stop_gradient(jnp.mean(z, axes))
      var = jax.lax.stop_gradient(jnp.var(z, axes))
      return (z - mean) / jnp.sqrt(var + 1e-5) * p["scale"] + p["bias"]
    z = jax.lax.conv_general_dilated(x, params["layers_0"]["kernel"], (1, 1), "SAME",
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
    z = jax.nn.relu(batch_norm(z + params["layers_0"]["bias"], params["layers_1"]))
    logits = z.reshape(z.shape[0], -1) @ params["layers_4"]["kernel"] + params["layers_4"]["bias"]
    return jnp.mean(-jax.nn.log_softmax(logits)[jnp.arange(4), y])

  # The terms through the statistics matter for the layer before the
  # BatchNorm (the comparison above would fail without them) ...
  fixed = jax.grad(fixed_statistics_loss)(variables["params"])
  assert h.max_relative_error(fixed["layers_0"], true["layers_0"]) > 1e-3
  assert h.max_relative_error(updates["layers_0"],
                              jax.tree.map(lambda g: -0.1 * g, fixed["layers_0"])) > 1e-3


def flax_train_mode_gradient(model, variables, x, y):
  """``jax.grad`` of the cross-entropy of Flax's train-mode forward pass."""
  def loss(params):
    logits, _ = model.apply({"params": params, "batch_stats": variables["batch_stats"]}, x,
                            mutable=["batch_stats"], train=True)
    return jnp.mean(-jax.nn.log_softmax(logits)[jnp.arange(x.shape[0]), y])
  return jax.grad(loss)(variables["params"])


def mixed_levels_model():
  """A residual block whose levels hold a BatchNorm's statistics beside a convolution.

  The body ``[conv, bn, relu, conv]`` and the projection shortcut
  ``[conv, bn]`` have their statistics at different depths: the shortcut's
  are computed beside the body's normalisation or last convolution, and
  each BatchNorm's statistics are a stage of their own.
  """
  return models.Chain([
      nn.Conv(2, (3, 3)), nn.relu,
      models.Residual([nn.Conv(2, (3, 3)), bn(), nn.relu, nn.Conv(2, (3, 3))],
                      [nn.Conv(2, (1, 1)), bn()]),
      avg_pool, models.flatten, nn.Dense(3)])


def test_batch_norm_beside_players_gives_the_train_mode_gradient():
  model = mixed_levels_model()
  x, y = images(3)
  game = G.from_flax(model, x)
  variables = variables_of(model, x, train=True)
  assert sum(s.gradient_fn is not None for s in game.stages) == 2
  true = flax_train_mode_gradient(model, variables, x, y)
  olne = h.step(dgnopt.olne(game, 0.1), variables, (x, y))[0]["params"]
  h.assert_trees_close(olne, jax.tree.map(lambda g: -0.1 * g, true), 1e-10)


@SLOW
@pytest.mark.parametrize("principle", ["fne", "gr"])
def test_batch_norm_beside_players_equals_reference(principle):
  model = mixed_levels_model()
  x, y = images(3)
  game = G.from_flax(model, x)
  variables = variables_of(model, x, train=True)
  make = dgnopt.fne if principle == "fne" else dgnopt.gr
  ours = h.step(make(game, 0.3, vxx_reg=1e-3), variables, (x, y))[0]
  ref, _ = h.reference_step(game, variables, (x, y), learning_rate=0.3, vxx_reg=1e-3,
                            principle=principle)
  h.assert_trees_close(ours, ref, 1e-8)


@SLOW
def test_resnet18_open_loop_sgd_is_sgd_on_the_train_mode_gradient():
  model = models.resnet18(3, width=2)
  x, y = images(4, (8, 8, 1))
  game = G.from_flax(model, x)
  variables = variables_of(model, x, train=True)
  olne = h.step(dgnopt.olne(game, 0.1), variables, (x, y))[0]["params"]
  true = flax_train_mode_gradient(model, variables, x, y)
  h.assert_trees_close(olne, jax.tree.map(lambda g: -0.1 * g, true), 1e-10)


@SLOW
def test_train_step_with_batch_norm_keeps_flax_working():
  model = bn_model()
  x, y = images(8)
  variables = variables_of(model, x, train=True)
  game = G.from_flax(model, x, weight_decay=1e-4)
  tx = dgnopt.gr(game, 0.1, vxx_reg=1e-4)
  opt_state = tx.init(variables)

  @jax.jit
  def train_step(params, opt_state, x, y):
    updates, opt_state = tx.update(None, opt_state, params, batch=(x, y))
    return optax.apply_updates(G.update_batch_stats(game, params, x), updates), opt_state

  before = game.loss_value(variables, x, y)
  params = variables
  for _ in range(5):
    expected_stats = flax_forward(model, params, x, True)[1]
    params, opt_state = train_step(params, opt_state, x, y)
    h.assert_trees_close(params["batch_stats"], expected_stats, 1e-12)
  assert game.loss_value(params, x, y) < before
  out = model.apply(params, x, train=False)  # the checkpoint still is the Flax model's
  assert out.shape == (8, 3) and bool(jnp.all(jnp.isfinite(out)))


# ----------------------------------------------------------------------------
# Errors.
# ----------------------------------------------------------------------------


class Scale(nn.Module):
  @nn.compact
  def __call__(self, x):
    return x * self.param("w", nn.initializers.ones, (x.shape[-1],))


def test_modules_the_reader_does_not_map_are_traced():
  """A custom module, an inline layer, an embedding: from_flax traces them (games.from_function)."""
  x, labels = jax.random.normal(jax.random.PRNGKey(3), (4, 4), jnp.float64), jnp.arange(4) % 3
  sequential = nn.Sequential([nn.Dense(4), Scale(), nn.Dense(3)])
  game = G.from_flax(sequential, x)
  variables = jax.tree.map(lambda a: a + 0.1, game.init(jax.random.PRNGKey(0)))
  assert [p.name for p in game.players] == [
      "params/layers_0", "params/layers_1", "params/layers_2"]
  assert [p.layer for p in game.players] == [G.Dense(4, None), None, G.Dense(3, None)]
  h.assert_trees_close(game.apply(variables, x), sequential.apply(variables, x), 1e-12)
  # Independent checks: OLNE is optax on jax.grad, an FNE step the dense reference.
  loss = lambda v, x, y: optax.softmax_cross_entropy_with_integer_labels(
      sequential.apply(v, x), y).mean()
  h.assert_open_loop_equals_optax(game, variables, loss, [(x, labels)] * 3)
  tx = dgnopt.fne(game, 0.1, "kfac", damping=0.5, vxx_reg=1e-2)
  h.assert_steps_match_reference(tx, game, variables, (x, labels), 1, learning_rate=0.1,
                                 curvature="kfac", damping=0.5, vxx_reg=1e-2,
                                 principle="fne")
  for model, inputs in [(Scale(), x), (nn.Sequential([nn.Dense(4), lambda z: nn.Dense(3)(z)]), x),
                        (nn.Sequential([nn.Embed(4, 3), nn.Dense(3)]),
                         jnp.arange(2, dtype=jnp.int32))]:
    game = G.from_flax(model, inputs)
    params = game.init(jax.random.PRNGKey(1))
    h.assert_trees_close(game.apply(params, inputs), model.apply(params, inputs), 1e-12)


def test_unsupported_programs_are_named():
  x = jnp.zeros((2, 4))
  with pytest.raises(G.UnsupportedModuleError, match=r"eval mode.*batch_stats.*variables="):
    G.from_flax(models.Chain([nn.Dense(4), nn.BatchNorm(), Scale(), nn.Dense(3)]), x,
                train=False)
  with pytest.raises(ValueError, match=r"reduce_sum"):
    G.from_flax(nn.Sequential([nn.Dense(4), lambda z: z.sum(0)]), x)
  with pytest.raises(ValueError, match="alignment must be one of"):
    G.from_flax(nn.Dense(3), x, alignment="middle")


def test_repeated_residual_blocks_are_one_scanned_segment():
  # Four equal residual blocks read from Flax are one block of two stages
  # repeated four times, solved with lax.scan like the hand-written network
  # (compile time does not grow with depth: benchmarks/compile_depth.py).
  from dgnopt_jax._src import segments as segments_lib
  model = models.Chain([nn.Conv(3, (3, 3)), nn.relu] +
                       [models.basic_block(3, batch_norm=False) for _ in range(4)] +
                       [models.global_average_pool, nn.Dense(3)])
  x, _ = images(2, (4, 4, 1))
  game = G.from_flax(model, x)
  variables = variables_of(model, x)
  segments = segments_lib.plan_segments(game, variables, x)
  assert (2, 4) in [(s.period, s.repeats) for s in segments]
  assert sum(s.period * s.repeats for s in segments) == len(game.stages)


def batch_norm_blocks_model():
  return models.Chain([nn.Conv(3, (3, 3)), nn.relu] + [models.basic_block(3) for _ in range(4)] +
                      [models.global_average_pool, nn.Dense(3)])


def test_repeated_batch_norm_blocks_are_one_scanned_segment():
  # With train-mode BatchNorm a basic block is six stages (conv, statistics,
  # normalisation, twice); the BatchNorms' paths differ from block to block.
  from dgnopt_jax._src import segments as segments_lib
  model = batch_norm_blocks_model()
  x, _ = images(2, (4, 4, 1))
  game = G.from_flax(model, x)
  segments = segments_lib.plan_segments(game, variables_of(model, x, train=True), x)
  assert (6, 4) in [(s.period, s.repeats) for s in segments]


@SLOW
def test_scanned_batch_norm_blocks_equal_gradient_and_unrolled_blocks(monkeypatch):
  from dgnopt_jax._src import segments as segments_lib
  model = batch_norm_blocks_model()
  x, y = images(3, (4, 4, 1))
  game = G.from_flax(model, x)
  variables = variables_of(model, x, train=True)
  true = flax_train_mode_gradient(model, variables, x, y)
  olne = h.step(dgnopt.olne(game, 0.1), variables, (x, y))[0]["params"]
  h.assert_trees_close(olne, jax.tree.map(lambda g: -0.1 * g, true), 1e-10)
  scanned = h.step(dgnopt.fne(game, 0.3, vxx_reg=1e-3), variables, (x, y))[0]
  monkeypatch.setattr(segments_lib, "MIN_BLOCK_REPEATS", 99)
  unrolled = h.step(dgnopt.fne(game, 0.3, vxx_reg=1e-3), variables, (x, y))[0]
  h.assert_trees_close(scanned, unrolled, 1e-12)
