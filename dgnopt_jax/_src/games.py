"""Networks as multi-player dynamic games (DGNOpt §3.1, eq. 3).

A game is a sequence of stages. Stage t is the shared dynamics

    x_{t+1} = F_t(x_t, (theta_{t,1}, ..., theta_{t,N_t}))

on a batched state pytree ``x_t`` (every leaf has the batch as its leading
axis, and samples propagate independently), played by ``N_t`` players, each
owning one subtree ``theta_{t,n}`` of an ordinary params pytree. The game ends
with a per-sample terminal loss ``phi(x_T, target)`` shared by all players
(DGNOpt §3.1: phi_n = phi) and per-player stage costs
``l_{t,n}(theta) = weight_decay / 2 * |theta|^2``.

Stages may have no player (a flatten or a pooling step): their value
derivatives are passed through unchanged.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import functools
import math
import numbers
from typing import Any, Callable, Optional, Sequence, Union

import jax
import jax.numpy as jnp

from dgnopt_jax._src import layer_taps
from dgnopt_jax._src import losses as losses_lib

Array = jax.Array
Params = Any
State = Any
Path = tuple

_ACTIVATIONS: dict[str, Callable[[Array], Array]] = {
    "identity": lambda x: x,
    "linear": lambda x: x,
    "tanh": jnp.tanh,
    "relu": jax.nn.relu,
    "sigmoid": jax.nn.sigmoid,
    "elu": jax.nn.elu,
    "gelu": jax.nn.gelu,
    "softplus": jax.nn.softplus,
    "swish": jax.nn.swish,
}


def get_activation(activation: Union[str, Callable, None]) -> Callable[[Array], Array]:
  """Resolves an activation name (or callable, or None for identity)."""
  if activation is None:
    return _ACTIVATIONS["identity"]
  if callable(activation):
    return activation
  if activation not in _ACTIVATIONS:
    raise ValueError(f"unknown activation {activation!r}; known: {sorted(_ACTIVATIONS)}")
  return _ACTIVATIONS[activation]


def _check_layer(layer: Any, **sizes: Any) -> None:
  """Raises a ``ValueError`` naming the first size that is not a positive integer (or pair).

  ``kernel_size``, ``strides`` and ``window`` are pairs; other sizes integers.
  """
  for name, value in sizes.items():
    pair = name in ("kernel_size", "strides", "window")
    values = tuple(value) if pair and isinstance(value, (tuple, list)) else (value,)
    if len(values) != (2 if pair else 1) or not all(
        isinstance(v, numbers.Integral) and not isinstance(v, bool) and v >= 1 for v in values):
      want = "a pair of positive integers" if pair else "a positive integer"
      raise ValueError(f"{type(layer).__name__}: {name} must be {want}, got {value!r}")
  activation = getattr(layer, "activation", None)
  if isinstance(activation, str):
    get_activation(activation)


def _lecun_normal(key: Array, shape: tuple[int, ...], fan_in: int, dtype) -> Array:
  return jax.random.normal(key, shape, dtype) / math.sqrt(max(fan_in, 1))


# ----------------------------------------------------------------------------
# Ready-made layers (players with a known structure).
# ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Dense:
  """Fully connected player: ``x' = activation(flatten(x) @ kernel + bias)``.

  Its per-sample parameter derivative has Kronecker structure
  ``f_theta^T z = [a (x) g, g]`` with ``a = flatten(x)`` and
  ``g = activation'(h) * z``, which the solver uses to form per-sample
  quadratic forms without materialising per-sample gradients.

  With ``rows=True`` it acts on the last ``contracted_axes`` axes of a
  ``(B, ..., K1..Kn)`` state (Flax's ``nn.Dense`` on token rows,
  ``(B, T, K) -> (B, T, O)``; ``nn.DenseGeneral`` and the projections of
  ``nn.MultiHeadDotProductAttention``, ``(B, T, D) -> (B, T, H, hd)`` and
  ``(B, T, H, hd) -> (B, T, D)``): every row ``p`` is an output position,
  as a convolution's, and the per-sample derivative is
  ``sum_p a_p (x) g_p`` (the rows' Kronecker statistics ``a`` (B, P, K),
  ``g`` (B, P, O); GT-DDP eq. 43).

  A kernel of shape ``(K1..Kn, O1..Om)`` (``features = (O1..Om)``) and its
  bias ``(O1..Om)`` are one dense layer in their *matrix view*::

    h.reshape(B, P, O) = x.reshape(B, P, K) @ kernel.reshape(K, O) + bias.reshape(O)

  with ``K = K1...Kn``, ``O = O1...Om`` (row-major, so the reshapes are
  free): the Kronecker statistics, factors and solves all work on the
  ``(K [+1], O)`` matrix ``[kernel; bias]`` (:func:`layer_taps.to_matrix`),
  whatever the kernel's layout.

  Attributes:
    features: the number of outputs, or the output feature shape
      ``(O1..Om)`` (a one-element tuple is stored as its integer).
    activation: name or callable applied to the pre-activation.
    use_bias: whether the player has a bias of shape ``features``.
    rows: act on the last ``contracted_axes`` axes, each remaining row an
      output position; otherwise the whole per-sample input is contracted.
    contracted_axes: the number of trailing input axes the kernel
      contracts (its leading axes). With ``rows=False`` the kernel's input
      axes are the whole per-sample input shape, or one axis of its size
      when this is 1.
  """

  features: Union[int, tuple[int, ...]]
  activation: Union[str, Callable, None] = None
  use_bias: bool = True
  rows: bool = False
  contracted_axes: int = 1

  @property
  def kind(self) -> str:
    """``"dense"`` (one row per sample) or ``"rows"`` (one per output position)."""
    return "rows" if self.rows else "dense"

  def __post_init__(self):
    if isinstance(self.features, (tuple, list)):
      if not self.features:
        raise ValueError("Dense: features must be a positive integer or a non-empty tuple of "
                         "them, got ()")
      for size in self.features:
        _check_layer(self, features=size)
      # One spelling per layer: layers compare by value.
      features = self.features[0] if len(self.features) == 1 else tuple(self.features)
      object.__setattr__(self, "features", features)
    _check_layer(self, features=1 if isinstance(self.features, tuple) else self.features,
                 contracted_axes=self.contracted_axes)

  @property
  def feature_shape(self) -> tuple[int, ...]:
    """The kernel's output axes ``(O1..Om)``."""
    return self.features if isinstance(self.features, tuple) else (self.features,)

  @property
  def output_size(self) -> int:
    """``O``, the columns of the matrix view ``[kernel; bias]``."""
    return math.prod(self.feature_shape)

  @property
  def prefix(self) -> str:
    return "dense"

  def init(self, key: Array, in_shape: tuple[int, ...], dtype=jnp.float32):
    n = self.contracted_axes
    if len(in_shape) < n:
      raise ValueError(f"Dense contracts {n} trailing axes; the per-sample input shape "
                       f"{tuple(in_shape)} has {len(in_shape)}")
    if self.rows:
      kernel_in = tuple(in_shape[len(in_shape) - n:])
    elif n == 1:
      kernel_in = (math.prod(in_shape),)
    elif len(in_shape) == n:
      kernel_in = tuple(in_shape)
    else:
      raise ValueError(f"Dense(rows=False) contracts the whole per-sample input: "
                       f"contracted_axes={n} must be 1 or its rank, {len(in_shape)}")
    fan_in = math.prod(kernel_in)
    params = {"kernel": _lecun_normal(key, kernel_in + self.feature_shape, fan_in, dtype)}
    if self.use_bias:
      params["bias"] = jnp.zeros(self.feature_shape, dtype)
    out_shape = tuple(in_shape[:len(in_shape) - n]) if self.rows else ()
    return params, out_shape + self.feature_shape

  def linear_input(self, x: Array) -> Array:
    """The input's rows ``(B, K)`` (or ``(B, ..., K)`` with ``rows``) of the matrix view."""
    if not self.rows:
      return x.reshape(x.shape[0], -1)
    return x.reshape(x.shape[:x.ndim - self.contracted_axes] + (-1,))

  def preactivation(self, params: Params, x: Array) -> Array:
    a = self.linear_input(x)
    h = a @ params["kernel"].reshape(a.shape[-1], self.output_size)
    if self.use_bias:
      h = h + params["bias"].reshape(self.output_size)
    h = h.reshape(h.shape[:-1] + self.feature_shape)
    return layer_taps.tap(self, params, x, h)

  def __call__(self, params: Params, x: Array) -> Array:
    return get_activation(self.activation)(self.preactivation(params, x))


@dataclasses.dataclass(frozen=True)
class Conv2D:
  """2-D convolution player on NHWC states: ``x' = act(conv(x, kernel) + bias)``."""

  features: int
  kernel_size: tuple[int, int] = (3, 3)
  strides: tuple[int, int] = (1, 1)
  padding: str = "SAME"
  activation: Union[str, Callable, None] = "relu"
  use_bias: bool = True
  kind = "conv"

  def __post_init__(self):
    _check_layer(self, features=self.features, kernel_size=self.kernel_size,
                 strides=self.strides)
    if isinstance(self.padding, str) and self.padding not in ("SAME", "SAME_LOWER", "VALID"):
      raise ValueError(f"Conv2D: padding must be 'SAME', 'VALID' or pairs, got {self.padding!r}")

  @property
  def prefix(self) -> str:
    return "conv2d"

  @property
  def feature_shape(self) -> tuple[int, ...]:
    """The kernel's output axes: ``(features,)``."""
    return (self.features,)

  @property
  def output_size(self) -> int:
    """``O``, the columns of the matrix view ``[kernel.reshape(-1, O); bias]``."""
    return self.features

  def init(self, key: Array, in_shape: tuple[int, ...], dtype=jnp.float32):
    if len(in_shape) != 3:
      raise ValueError(
          f"Conv2D expects per-sample states of shape (height, width, channels); got {in_shape}")
    kh, kw = self.kernel_size
    fan_in = kh * kw * in_shape[-1]
    params = {"kernel": _lecun_normal(key, (kh, kw, in_shape[-1], self.features), fan_in, dtype)}
    if self.use_bias:
      params["bias"] = jnp.zeros((self.features,), dtype)
    out = jax.eval_shape(lambda p, x: self(p, x), params,
                         jax.ShapeDtypeStruct((1,) + tuple(in_shape), dtype))
    return params, tuple(out.shape[1:])

  def __call__(self, params: Params, x: Array) -> Array:
    h = jax.lax.conv_general_dilated(
        x, params["kernel"], window_strides=self.strides, padding=self.padding,
        dimension_numbers=("NHWC", "HWIO", "NHWC"))
    if self.use_bias:
      h = h + params["bias"]
    return get_activation(self.activation)(layer_taps.tap(self, params, x, h))


@dataclasses.dataclass(frozen=True)
class Flatten:
  """A stage without players: reshapes the per-sample state to a vector."""

  prefix = None

  def __call__(self, params: Params, x: Array) -> Array:
    del params
    return x.reshape(x.shape[0], -1)


@dataclasses.dataclass(frozen=True)
class AvgPool:
  """A stage without players: average pooling over NHWC windows."""

  window: tuple[int, int] = (2, 2)
  prefix = None

  def __post_init__(self):
    _check_layer(self, window=self.window)

  def __call__(self, params: Params, x: Array) -> Array:
    del params
    wh, ww = self.window
    s = jax.lax.reduce_window(x, 0.0, jax.lax.add, (1, wh, ww, 1), (1, wh, ww, 1), "VALID")
    return s / (wh * ww)


Layer = Union[Dense, Conv2D, Flatten, AvgPool]


# ----------------------------------------------------------------------------
# Stages and games.
# ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Player:
  """One player: the params subtree at ``path`` and its stage cost.

  Attributes:
    path: keys leading to the player's subtree in the params pytree.
    weight_decay: coefficient of the stage cost ``weight_decay/2 |theta|^2``.
    layer: the ready-made layer (:class:`Dense`, :class:`Conv2D`) the
      player's params feed, unchanged, inside the stage function; lets the
      solver and the Kronecker curvatures use its structure.
  """

  path: Path
  weight_decay: float = 0.0
  layer: Any = None

  @property
  def name(self) -> str:
    return "/".join(str(p) for p in self.path)


@dataclasses.dataclass(frozen=True, eq=False)
class Stage:
  """Shared dynamics ``F_t(x, thetas) -> x_next`` played by ``players``.

  ``fn`` maps a batched state pytree and a tuple with one params subtree per
  player to the next batched state. Consecutive stages with the same ``fn``
  object, the same player kinds and equal shapes are solved with ``lax.scan``.
  ``shared_statistics`` says that every player's layer sees the same input and
  the same value derivative at its pre-activation (identical linear layers
  whose outputs are added, GT-DDP Fig. 7a), so that their Kronecker factors
  coincide (GT-DDP Cor. 7).

  ``gradient_fn``, where given, computes the same values as ``fn`` but
  differentiates through a coupling of the samples that ``fn``'s
  linearisation holds fixed (a train-mode BatchNorm's batch statistics,
  :func:`from_flax`). Its VJP gives the first-order terms, the co-state
  ``Q_x = F_x^T V_x'`` and the gradient ``Q_theta = F_theta^T V_x'``
  (DGNOpt eq. 5), so that they are the exact gradient of the loss; every
  second-order term (``Z``, the curvature, the forms, the feedback) keeps the
  per-sample Jacobians of ``fn``.
  """

  fn: Callable[[State, tuple], State]
  players: tuple[Player, ...] = ()
  name: str = ""
  shared_statistics: bool = False
  gradient_fn: Optional[Callable[[State, tuple], State]] = None

  @property
  def num_players(self) -> int:
    return len(self.players)

  def signature(self) -> tuple:
    """What must agree for two stages to share one scanned body."""
    return ((self.fn, self.shared_statistics, self.gradient_fn) +
            tuple((p.weight_decay, p.layer) for p in self.players))


@functools.lru_cache(maxsize=None)
def layer_stage_fn(layer: Any) -> Callable[[State, tuple], State]:
  """The stage function of a ready-made layer; one object per layer config."""
  if getattr(layer, "prefix", None) is None:
    return lambda x, thetas: layer(None, x)
  return lambda x, thetas: layer(thetas[0], x)


def stage(fn: Callable[[State, tuple], State],
          players: Sequence[Union[Player, str, Path]] = (),
          *, weight_decay: float = 0.0, name: str = "",
          gradient_fn: Optional[Callable[[State, tuple], State]] = None) -> Stage:
  """Builds a stage from a plain JAX function.

  Args:
    fn: ``fn(x, thetas) -> x_next`` on batched state pytrees, where ``thetas``
      is a tuple with one params subtree per player, in the order of
      ``players``. Samples must propagate independently in its derivatives
      (batch statistics under ``jax.lax.stop_gradient``; see ``gradient_fn``).
    players: each a :class:`Player`, a path tuple, or a ``"a/b"`` string naming
      the params subtree the player owns.
    weight_decay: stage cost coefficient for players given as paths.
    name: a readable name.
    gradient_fn: the same function differentiated through a coupling of the
      samples that ``fn`` holds fixed (``fn`` with its
      ``jax.lax.stop_gradient`` on batch statistics removed); it gives the
      first-order terms (:class:`Stage`). None: ``fn`` gives them.

  Returns:
    A :class:`Stage`.
  """
  if gradient_fn is not None and not callable(gradient_fn):
    raise TypeError(f"gradient_fn must be callable or None, got {type(gradient_fn).__name__}")
  resolved = []
  for p in players:
    if isinstance(p, Player):
      resolved.append(p)
    elif isinstance(p, str):
      resolved.append(Player(tuple(p.split("/")), weight_decay))
    else:
      resolved.append(Player(tuple(p), weight_decay))
  return Stage(fn, tuple(resolved), name, gradient_fn=gradient_fn)


@dataclasses.dataclass(frozen=True, eq=False)
class Game:
  """A network written as a multi-player dynamic game (DGNOpt eq. 3).

  Attributes:
    stages: the shared dynamics F_0 .. F_{T-1}.
    loss: the terminal cost shared by all players.
    init_fn: optional ``key -> params`` making params that fit the game.
    input_shape: optional per-sample input shape, checked on every batch.
  """

  stages: tuple[Stage, ...]
  loss: losses_lib.TerminalLoss
  init_fn: Callable[[Array], Params] | None = None
  input_shape: tuple[int, ...] | None = None

  def __post_init__(self):
    object.__setattr__(self, "loss", losses_lib.get_loss(self.loss))
    object.__setattr__(self, "stages", tuple(self.stages))
    seen = {}
    for t, s in enumerate(self.stages):
      for p in s.players:
        if p.path in seen:
          raise ValueError(
              f"player {p.name!r} appears at stages {seen[p.path]} and {t}; each "
              "params subtree must belong to exactly one player")
        seen[p.path] = t

  @property
  def num_streams(self) -> int:
    """Value streams carried by FNE: the largest number of players at a stage."""
    return max([s.num_players for s in self.stages] + [1])

  @property
  def players(self) -> tuple[Player, ...]:
    return tuple(p for s in self.stages for p in s.players)

  def init(self, key: Array) -> Params:
    if self.init_fn is None:
      raise ValueError("this game was built without an init function; make params yourself")
    return self.init_fn(key)

  def apply(self, params: Params, inputs: State) -> State:
    """The network's forward pass: ``x_T`` from ``x_0 = inputs``."""
    x = inputs
    for s in self.stages:
      x = s.fn(x, tuple(get_path(params, p.path) for p in s.players))
    return x

  def loss_value(self, params: Params, inputs: State, targets: Array) -> Array:
    """Batch-mean terminal loss plus the players' stage costs."""
    out = self.apply(params, inputs)
    value = jnp.mean(jax.vmap(self.loss.per_sample)(out, targets))
    for p in self.players:
      if p.weight_decay:
        sq = sum(jnp.sum(l ** 2) for l in jax.tree.leaves(get_path(params, p.path)))
        value = value + 0.5 * p.weight_decay * sq
    return value


def sequential(layers: Sequence[Any], input_shape: Sequence[int],
               loss: losses_lib.LossLike = "softmax_cross_entropy", *,
               weight_decay: float = 0.0, dtype=jnp.float32,
               paths: Sequence[Path] | None = None) -> Game:
  """A feedforward network as a game with one player per parametric layer.

  Args:
    layers: ready-made layers (:class:`Dense`, :class:`Conv2D`,
      :class:`Flatten`, :class:`AvgPool`), each one stage, and blocks
      (:class:`ResidualBlock`: two stages; :class:`InceptionBlock`: a
      4-player stage; :class:`Parallel`: a 2-player stage).
    input_shape: per-sample input shape, e.g. ``(64,)`` or ``(8, 8, 1)``.
    loss: terminal loss name, :class:`TerminalLoss` or per-sample callable.
    weight_decay: stage-cost coefficient for every player.
    dtype: dtype of the params made by ``game.init``.
    paths: optional params path of each parametric layer, in order, e.g.
      ``[("params", "Dense_0"), ("params", "Dense_1")]`` to play on the params
      of an equivalent Flax model (same ``kernel``/``bias`` layout).

  Returns:
    A :class:`Game` whose params are ``{"<kind>_<i>": {"kernel", "bias"}}``
    (or nested at ``paths``).

  Example::

    game = sequential([Dense(32, "tanh"), Dense(32, "tanh"), Dense(10)], (64,))
    params = game.init(jax.random.PRNGKey(0))
  """
  input_shape = tuple(int(d) for d in input_shape)
  parametric = [l for l in layers if getattr(l, "prefix", None) is not None]
  if paths is not None and len(paths) != len(parametric):
    raise ValueError(f"paths names {len(paths)} players but there are {len(parametric)} "
                     "parametric layers")
  path_iter = iter(tuple(p) for p in paths) if paths is not None else None
  stages = []
  names = []
  for i, layer in enumerate(layers):
    if getattr(layer, "prefix", None) is None:
      stages.append(Stage(layer_stage_fn(layer), (), name=type(layer).__name__.lower()))
      names.append(None)
      continue
    path = next(path_iter) if path_iter is not None else (f"{layer.prefix}_{i}",)
    names.append(path)
    if hasattr(layer, "to_stages"):
      stages.extend(layer.to_stages(path, weight_decay))
    else:
      stages.append(Stage(layer_stage_fn(layer), (Player(path, weight_decay, layer),),
                          name="/".join(path)))

  def init_fn(key: Array) -> Params:
    params = {}
    shape = input_shape
    keys = jax.random.split(key, max(len(layers), 1))
    for layer, path, k in zip(layers, names, keys):
      if path is None:
        out = jax.eval_shape(lambda x: layer(None, x),
                             jax.ShapeDtypeStruct((1,) + shape, dtype))
        shape = tuple(out.shape[1:])
      else:
        node = params
        for key_ in path[:-1]:
          node = node.setdefault(key_, {})
        node[path[-1]], shape = layer.init(k, shape, dtype)
    return params

  # One compiled initialiser rather than one small compilation per random leaf.
  return Game(tuple(stages), losses_lib.get_loss(loss), jax.jit(init_fn), input_shape)


def with_weight_decay(game: Game, weight_decay: float) -> Game:
  """The game with the stage cost ``weight_decay/2 |theta|^2`` on every player.

  Equal to building it with ``weight_decay=`` (:func:`sequential`): the
  stage functions are kept, so repeated stages still share a scanned body.

  Args:
    game: a game whose players have no stage cost yet.
    weight_decay: the coefficient, >= 0.

  Returns:
    A :class:`Game`.

  Raises:
    ValueError: a player already has a stage cost (set it in one place).
  """
  priced = [p.name for p in game.players if p.weight_decay]
  if priced:
    raise ValueError(
        f"weight_decay={weight_decay!r} is given to the transformation, but players "
        f"{priced} of the game already have a stage cost (weight_decay when the game "
        "was built); set it in one place")
  stages = tuple(dataclasses.replace(s, players=tuple(
      dataclasses.replace(p, weight_decay=weight_decay) for p in s.players))
                 for s in game.stages)
  return dataclasses.replace(game, stages=stages)


def player_paths(game: Game, names: Sequence[Union[str, Path]], what: str) -> frozenset:
  """The paths of the players that ``names`` (paths or ``"a/b"`` strings, or prefixes of them) cover.

  Raises:
    ValueError: a name covers no player (naming the players there are).
  """
  chosen = set()
  for name in names:
    prefix = tuple(name.split("/")) if isinstance(name, str) else tuple(name)
    hit = [p.path for p in game.players if p.path[:len(prefix)] == prefix]
    if not hit:
      raise ValueError(
          f"{what} names {'/'.join(map(str, prefix))!r}, which is no player's params (nor "
          f"a prefix of them); the players are {[p.name for p in game.players]}")
    chosen.update(hit)
  return frozenset(chosen)


def _bind_stage(stage: Stage, keep: tuple[int, ...], constants: dict) -> Stage:
  """``stage`` played by its players ``keep``; the others' params are the fixed ``constants``."""

  def bind(fn):
    if fn is None:
      return None

    def bound(x, thetas):
      full, own = [], iter(thetas)
      for n in range(stage.num_players):
        full.append(constants[n] if n in constants else next(own))
      return fn(x, tuple(full))

    return bound

  return Stage(bind(stage.fn), tuple(stage.players[n] for n in keep), stage.name,
               shared_statistics=stage.shared_statistics and not constants,
               gradient_fn=bind(stage.gradient_fn))


def with_constants(game: Game, constant_paths: frozenset, params: Params) -> Game:
  """The game in which the players at ``constant_paths`` are fixed constants.

  Their params are read from ``params`` (this step's values) and held fixed:
  each stage that had such a player is played by the others alone, as a
  stage without players is when it has none left; the DGNOpt step changes
  only the remaining players. Stages without such players are kept as they
  are (and still share scanned bodies).

  Args:
    game: the game.
    constant_paths: player paths (from :func:`player_paths`).
    params: the params pytree whose values the constants take.

  Returns:
    A :class:`Game` with the same stages and loss.
  """
  if not constant_paths:
    return game
  stages = []
  for s in game.stages:
    fixed = {n: get_path(params, p.path) for n, p in enumerate(s.players)
             if p.path in constant_paths}
    if not fixed:
      stages.append(s)
      continue
    keep = tuple(n for n in range(s.num_players) if n not in fixed)
    stages.append(_bind_stage(s, keep, fixed))
  return dataclasses.replace(game, stages=tuple(stages))


# ----------------------------------------------------------------------------
# Params paths.
# ----------------------------------------------------------------------------


def get_path(tree: Params, path: Path) -> Params:
  """The subtree of ``tree`` at ``path``; a clear error if it is missing.

  A mapping that is not a ``dict`` (a Flax NNX ``nnx.State``, a
  ``FrozenDict``) comes back as nested ``dict``s holding the same leaves: a
  player's params are then plain dicts wherever they are read (the layers'
  ``{"kernel", "bias"}`` structure, the curvature statistics), whatever
  mapping the params pytree is made of.
  """
  node = tree
  for i, key in enumerate(path):
    try:
      node = node[key]
    except (KeyError, TypeError, IndexError):
      where = "/".join(str(k) for k in path[:i]) or "<root>"
      keys = list(node.keys()) if hasattr(node, "keys") else type(node).__name__
      raise ValueError(
          f"params do not match the game: player {'/'.join(map(str, path))!r} needs "
          f"key {key!r} under {where!r}, which has {keys}") from None
  return _as_dicts(node)


def _as_dicts(node: Params) -> Params:
  """``node`` with every non-``dict`` mapping in it (from its root down) made a ``dict``."""
  if isinstance(node, collections.abc.Mapping) and not isinstance(node, dict):
    return {k: _as_dicts(v) for k, v in node.items()}
  return node


def _key_name(entry: Any) -> Any:
  for attr in ("key", "idx", "name"):
    if hasattr(entry, attr):
      return getattr(entry, attr)
  return entry


def scatter_players(params: Params, values: dict[Path, Params], fill: Callable) -> Params:
  """A pytree shaped like ``params`` holding ``values[path]`` under each player.

  Leaves owned by no player get ``fill(leaf)``.
  """

  def leaf(keypath, x):
    names = tuple(_key_name(e) for e in keypath)
    for depth in range(len(names), -1, -1):
      prefix = names[:depth]
      if prefix in values:
        return get_path(values[prefix], names[depth:])
    return fill(x)

  return jax.tree_util.tree_map_with_path(leaf, params)


# ----------------------------------------------------------------------------
# Blocks spanning several players or stages (DGNOpt §3.1, Fig. 2, 3a, 6, 10a).
# ----------------------------------------------------------------------------


def _linear_layer(layer: Any) -> Any:
  return layer if isinstance(layer, (Dense, Conv2D)) else None


def _conv(features: int, kernel_size: tuple[int, int], activation=None) -> Conv2D:
  return Conv2D(features, kernel_size, (1, 1), "SAME", activation)


@dataclasses.dataclass(frozen=True)
class Parallel:
  """Two layers sharing input and output, ``x' = a(x) + b(x)``: a two-player stage.

  The cooperative block of DGNOpt Fig. 3a / GT-DDP Fig. 7a; params
  ``{"a": ..., "b": ...}``. Two identical linear layers without activation
  share their Kronecker statistics (``Stage.shared_statistics``).
  """

  a: Any
  b: Any
  prefix = "parallel"

  def init(self, key: Array, in_shape: tuple[int, ...], dtype=jnp.float32):
    ka, kb = jax.random.split(key)
    pa, out_a = self.a.init(ka, in_shape, dtype)
    pb, out_b = self.b.init(kb, in_shape, dtype)
    if out_a != out_b:
      raise ValueError(f"Parallel layers must have equal output shapes, got {out_a} and {out_b}")
    return {"a": pa, "b": pb}, out_a

  def __call__(self, params: Params, x: Array) -> Array:
    return self.a(params["a"], x) + self.b(params["b"], x)

  def to_stages(self, path: Path, weight_decay: float) -> list[Stage]:
    fn = _parallel_fn(self)
    linear = _linear_layer(self.a)
    shared = (linear is not None and self.a == self.b and
              self.a.activation in (None, "identity", "linear"))
    return [Stage(fn, (Player(path + ("a",), weight_decay, linear),
                       Player(path + ("b",), weight_decay, _linear_layer(self.b))),
                  name="/".join(map(str, path)), shared_statistics=shared)]


@functools.lru_cache(maxsize=None)
def _parallel_fn(block: Parallel):
  return lambda x, th: block.a(th[0], x) + block.b(th[1], x)


RESIDUAL_ALIGNMENTS = ("merge", "split")


@dataclasses.dataclass(frozen=True)
class ResidualBlock:
  """``z' = act(conv2(act(conv1(z))) + shortcut(z))`` as two stages (DGNOpt Fig. 2).

  The first stage lifts the state to ``x = (z_mid, z_res)`` (the augmented
  state ``[z_t, z_{t-1}]`` of GT-DDP eq. 8), the second merges the paths. A
  projection shortcut (1x1 convolution) is a second player; the alignment
  (DGNOpt Fig. 10a) says where it plays:

  * ``"merge"``: beside ``conv2`` at the merging stage,
    ``F_t = (act(conv1(z)), z)``, ``F_{t+1} = act(conv2(z_mid) + shortcut(z_res))``;
  * ``"split"``: beside ``conv1`` at the lifting stage,
    ``F_t = (act(conv1(z)), shortcut(z))``, ``F_{t+1} = act(conv2(z_mid) + z_res)``.

  Both alignments compute the same network on the same params
  ``{"conv1", "conv2"[, "shortcut"]}``; they differ in the game, hence in the
  DGNOpt update. With an identity shortcut they coincide.
  """

  features: int
  kernel_size: tuple[int, int] = (3, 3)
  shortcut: str = "identity"
  activation: Union[str, Callable, None] = "relu"
  alignment: str = "merge"
  prefix = "residual"

  def __post_init__(self):
    _check_layer(self, features=self.features, kernel_size=self.kernel_size)
    if self.shortcut not in ("identity", "projection"):
      raise ValueError(f"shortcut must be 'identity' or 'projection', got {self.shortcut!r}")
    if self.alignment not in RESIDUAL_ALIGNMENTS:
      raise ValueError(f"alignment must be one of {RESIDUAL_ALIGNMENTS}, got {self.alignment!r}")

  @property
  def conv1(self) -> Conv2D:
    return _conv(self.features, self.kernel_size, self.activation)

  @property
  def conv2(self) -> Conv2D:
    return _conv(self.features, self.kernel_size, None)

  @property
  def projection(self) -> Conv2D:
    return _conv(self.features, (1, 1), None)

  def init(self, key: Array, in_shape: tuple[int, ...], dtype=jnp.float32):
    if self.shortcut == "identity" and in_shape[-1] != self.features:
      raise ValueError(
          f"an identity shortcut needs {self.features} input channels, got {in_shape[-1]}; "
          "use shortcut='projection'")
    k1, k2, k3 = jax.random.split(key, 3)
    params = {"conv1": self.conv1.init(k1, in_shape, dtype)[0]}
    mid = in_shape[:-1] + (self.features,)
    params["conv2"] = self.conv2.init(k2, mid, dtype)[0]
    if self.shortcut == "projection":
      params["shortcut"] = self.projection.init(k3, in_shape, dtype)[0]
    return params, mid

  def _shortcut(self, params: Params | None, z: Array) -> Array:
    return z if params is None else self.projection(params, z)

  def __call__(self, params: Params, x: Array) -> Array:
    res = self._shortcut(params.get("shortcut"), x)
    h = self.conv2(params["conv2"], self.conv1(params["conv1"], x)) + res
    return get_activation(self.activation)(h)

  def to_stages(self, path: Path, weight_decay: float) -> list[Stage]:
    lift, merge = _residual_fns(self)
    layers = {"conv1": self.conv1, "conv2": self.conv2, "shortcut": self.projection}
    p = lambda name: Player(path + (name,), weight_decay, layers[name])
    projected = self.shortcut == "projection"
    name = "/".join(map(str, path))
    if projected and self.alignment == "split":
      return [Stage(lift, (p("conv1"), p("shortcut")), name + "/lift"),
              Stage(merge, (p("conv2"),), name + "/merge")]
    if projected:
      return [Stage(lift, (p("conv1"),), name + "/lift"),
              Stage(merge, (p("conv2"), p("shortcut")), name + "/merge")]
    return [Stage(lift, (p("conv1"),), name + "/lift"), Stage(merge, (p("conv2"),), name + "/merge")]


@functools.lru_cache(maxsize=None)
def _residual_fns(block: ResidualBlock):
  act = get_activation(block.activation)
  split = block.shortcut == "projection" and block.alignment == "split"
  merge_short = block.shortcut == "projection" and block.alignment == "merge"

  def lift(x, th):
    res = block.projection(th[1], x) if split else x
    return (block.conv1(th[0], x), res)

  def merge(x, th):
    z_mid, z_res = x
    res = block.projection(th[1], z_res) if merge_short else z_res
    return act(block.conv2(th[0], z_mid) + res)

  return lift, merge


@dataclasses.dataclass(frozen=True)
class InceptionBlock:
  """Four parallel branches concatenated: a 4-player stage (DGNOpt Fig. 6).

  Branches: 1x1 conv, 3x3 conv, 5x5 conv, 3x3 average pooling then 1x1 conv,
  each with ``features`` channels; ``x' = act(concat(branches))``. Params
  ``{"b1x1", "b3x3", "b5x5", "pool"}``.
  """

  features: int
  activation: Union[str, Callable, None] = "relu"
  prefix = "inception"
  names = ("b1x1", "b3x3", "b5x5", "pool")

  def __post_init__(self):
    _check_layer(self, features=self.features)

  def branches(self) -> tuple[Conv2D, ...]:
    return (_conv(self.features, (1, 1)), _conv(self.features, (3, 3)),
            _conv(self.features, (5, 5)), _conv(self.features, (1, 1)))

  def init(self, key: Array, in_shape: tuple[int, ...], dtype=jnp.float32):
    keys = jax.random.split(key, 4)
    params = {n: b.init(k, in_shape, dtype)[0]
              for n, b, k in zip(self.names, self.branches(), keys)}
    return params, in_shape[:-1] + (4 * self.features,)

  def _forward(self, thetas: Sequence[Params], x: Array) -> Array:
    b1, b3, b5, bp = self.branches()
    pooled = jax.lax.reduce_window(x, 0.0, jax.lax.add, (1, 3, 3, 1), (1, 1, 1, 1), "SAME") / 9.0
    outs = [b1(thetas[0], x), b3(thetas[1], x), b5(thetas[2], x), bp(thetas[3], pooled)]
    return get_activation(self.activation)(jnp.concatenate(outs, axis=-1))

  def __call__(self, params: Params, x: Array) -> Array:
    return self._forward([params[n] for n in self.names], x)

  def to_stages(self, path: Path, weight_decay: float) -> list[Stage]:
    return [Stage(_inception_fn(self), tuple(Player(path + (n,), weight_decay, b)
                                             for n, b in zip(self.names, self.branches())),
                  "/".join(map(str, path)))]


@functools.lru_cache(maxsize=None)
def _inception_fn(block: InceptionBlock):
  return lambda x, th: block._forward(th, x)
