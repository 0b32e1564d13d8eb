"""Flax linen models as games (DGNOpt §3.1): :func:`from_flax`.

``from_flax(model, example_input)`` reads the structure of a Flax model and
builds the game the network defines, on the params pytree ``model.init``
makes (``{"params": ...}``, with ``"batch_stats"`` when there is BatchNorm),
so ``model.apply(params, x)`` keeps working and checkpoints are
interchangeable. No stage function is written by hand.

What is read (the structure is taken from the module tree, not traced; any
other module is traced, :func:`_traced`):

* containers: ``nn.Sequential`` and :class:`models.Chain` (a chain of
  stages), :class:`models.Residual` and :class:`models.Branches` (parallel
  paths, below), nested freely;
* players: ``nn.Dense`` and 2-D ``nn.Conv`` (the ready-made
  :class:`games.Dense` / :class:`games.Conv2D`, so the Kronecker curvatures
  use their structure; a Dense on inputs of rank > 2, a Conv with dilation,
  groups, circular/causal padding or an explicit ``dtype``/``precision``
  becomes a player without a layer, evaluated by Flax, diagonal fallback),
  ``nn.LayerNorm``, ``nn.RMSNorm``, ``nn.GroupNorm`` (evaluated by Flax) and
  ``nn.BatchNorm`` (below), each a player owning its module's params
  (``{"kernel", "bias"}``, ``{"scale", "bias"}``);
* parameter-free callables and modules: elementwise activations (``nn.relu``,
  ``nn.tanh``, ``nn.sigmoid``, ``nn.gelu``, ...) are folded into the stage of
  the player before them (as :func:`games.sequential` does with
  ``Dense(features, "relu")``); anything else (``nn.avg_pool``,
  ``nn.max_pool`` through ``functools.partial``, reshapes, global pooling,
  modules without variables) is a stage without players. Such a callable must
  act on every sample independently, keeping the batch axis first.

Each parametric layer of a chain starts a stage. A :class:`models.Residual`
or :class:`models.Branches` block is a set of parallel paths (the body and
the shortcut; the branches) whose stages are aligned level by level: the
state between levels is the tuple of the paths' states (the augmented state
``[z_t, z_{t-1}]`` of GT-DDP eq. 8) and a level's stage holds the players of
every path at that level (DGNOpt Fig. 2, 3a, 6). A residual block's paths are
aligned at their ends with ``alignment="merge"`` (a projection shortcut plays
beside the body's last layer) or at their starts with ``"split"`` (beside the
first; DGNOpt Fig. 10a); branches of a :class:`models.Branches` block at their
starts, with any parameter-free layers of a branch merged into its player's
stage, so an inception block with one convolution per branch is one
four-player stage. The residual block with body ``[conv, relu, conv]`` is
then exactly :class:`games.ResidualBlock` and the four-branch inception block
:class:`games.InceptionBlock`.

BatchNorm. In train mode (``use_running_average`` False, or None and
``train=True``) a BatchNorm layer normalises with the statistics of the
batch, which couples the samples, while the solvers take per-sample
quadratic forms, JVPs and VJPs of every stage and need samples to propagate
independently in every second-order term (:mod:`linearise`). A BatchNorm
layer is therefore two stages,

    F_stats(x)         = (x, sg(mu_B(x)), sg(var_B(x)))          (no players)
    F_bn((x, m, v), th) = (x - m) * rsqrt(v + eps) * scale + bias

with ``mu_B``, ``var_B`` Flax's batch mean and (biased) variance over all
axes but the channel axis, carried in the state as one copy per sample, and
``sg`` the stop-gradient; the statistics stage's ``Stage.gradient_fn`` is
the same map without the stop-gradient. The forward pass is exactly Flax's
train-mode forward pass. Consequences:

* The first-order terms are exact: ``Q_x`` and ``Q_theta`` (the co-state
  recursion, DGNOpt eq. 5) go through the statistics, so ``Q_theta`` is
  ``jax.grad`` of Flax's train-mode loss and ``olne`` with the identity
  curvature is SGD on it (the normalisation's projection of the gradient of
  the layers before a BatchNorm is kept).
* The second-order terms (the value-Hessian factor ``Z``, the curvatures'
  statistics, the quadratic forms and feedback gains) take the Jacobian with
  the statistics held fixed: ``F_x`` and ``F_theta`` of ``F_bn`` act per
  sample and ``F_stats`` passes the factor's columns through to ``x`` only.
  This is the Gauss-Newton model in which the batch statistics are constants
  of the step, the usual one for curvature in BatchNorm networks; the dense
  reference (:mod:`reference`) makes the same split.
* In the rollout (Alg. 1 lines 8-12) ``F_stats`` recomputes the statistics
  of the rolled-out batch, so the rollout is Flax's train-mode forward pass at
  the new params; the BatchNorm player's feedback ``K dx`` sees their change,
  the players before it model them as fixed.

In eval mode (``use_running_average`` True, or None and ``train=False``) a
BatchNorm layer is one per-sample affine stage on the running averages read
from ``variables`` when the game is built (constants of the game: eval mode
never changes them). The running averages are not params of any player;
:func:`update_batch_stats` updates them the way Flax does.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from typing import Any, Callable, Sequence

from flax import nnx
import flax.linen as nn
import jax
import jax.numpy as jnp

from dgnopt_jax._src import flax_blocks
from dgnopt_jax._src import games as games_lib
from dgnopt_jax._src import guards
from dgnopt_jax._src import losses as losses_lib
from dgnopt_jax._src import nnx_games
from dgnopt_jax._src import running_averages
from dgnopt_jax._src import traced_games

Array = jax.Array
Params = Any
Path = tuple
StageFn = Callable[[Any, tuple], Any]

ALIGNMENTS = ("merge", "split")


class UnsupportedModuleError(ValueError):
  """A Flax module (or callable) that :func:`from_flax` cannot map onto stages."""


def _unsupported(path: Path, what: Any, why: str) -> UnsupportedModuleError:
  where = "/".join(map(str, path)) or "<root>"
  name = type(what).__name__ if isinstance(what, nn.Module) else repr(what)
  return UnsupportedModuleError(
      f"from_flax cannot map {name} at {where!r}: {why}. Supported: nn.Sequential, "
      "dgnopt_jax.models.Chain/Residual/Branches, nn.Dense, nn.Conv, nn.LayerNorm, "
      "nn.RMSNorm, nn.GroupNorm, nn.BatchNorm, parameter-free callables and modules; "
      "write other layers as a stage with dgnopt_jax.games.stage")


# ----------------------------------------------------------------------------
# Elementwise activations (folded into the stage of the player before them).
# ----------------------------------------------------------------------------

_NAMED = {jax.nn.relu: "relu", jnp.tanh: "tanh", jax.nn.sigmoid: "sigmoid", jax.nn.elu: "elu",
          jax.nn.gelu: "gelu", jax.nn.softplus: "softplus", jax.nn.swish: "swish"}
_ELEMENTWISE = frozenset(list(_NAMED) + [
    getattr(jax.nn, name) for name in (
        "relu6", "leaky_relu", "silu", "celu", "selu", "soft_sign", "log_sigmoid",
        "hard_tanh", "hard_sigmoid", "hard_swish", "hard_silu", "sparse_plus", "squareplus",
        "mish", "identity") if hasattr(jax.nn, name)])


def _is_elementwise(fn: Any) -> bool:
  if isinstance(fn, functools.partial):
    return not fn.args and _is_elementwise(fn.func)
  try:
    return fn in _ELEMENTWISE
  except TypeError:  # unhashable callable
    return False


@dataclasses.dataclass(frozen=True)
class _Compose:
  """``fns[-1](...fns[0](x))``: composed activations (hashable, so stages can be scanned)."""

  fns: tuple

  def __call__(self, x: Array) -> Array:
    for fn in self.fns:
      x = fn(x)
    return x


def _then(first: Any, second: Callable) -> Any:
  """The activation ``second o first`` (a name where one exists)."""
  if first in (None, "identity", "linear"):
    return _NAMED.get(second, second) if _hashable(second) else second
  return _Compose((games_lib.get_activation(first), second))


def _hashable(x: Any) -> bool:
  try:
    hash(x)
    return True
  except TypeError:
    return False


# ----------------------------------------------------------------------------
# Stage functions (hashable values: equal configurations give equal stages).
# ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Playerless:
  """A stage without players: ``x' = fn(x)``."""

  fn: Callable

  def __call__(self, x: Any, thetas: tuple) -> Any:
    del thetas
    return self.fn(x)


@dataclasses.dataclass(frozen=True)
class _Seq:
  """Stage functions applied in order, ``counts[i]`` players each."""

  fns: tuple
  counts: tuple

  def __call__(self, x: Any, thetas: tuple) -> Any:
    start = 0
    for fn, count in zip(self.fns, self.counts):
      x = fn(x, thetas[start:start + count])
      start += count
    return x


@dataclasses.dataclass(frozen=True)
class _FlaxApply:
  """A player evaluated by Flax: ``module.apply({"params": theta}, x)``."""

  module: nn.Module

  def __call__(self, x: Array, thetas: tuple) -> Array:
    return self.module.apply({"params": thetas[0]}, x)


def _batch_moments(x: Array, fast_variance: bool) -> tuple[Array, Array]:
  """Flax's batch statistics over every axis but the last (``_compute_stats``)."""
  axes = tuple(range(x.ndim - 1))
  x = x.astype(jnp.promote_types(x.dtype, jnp.float32))
  mean = x.mean(axes)
  if fast_variance:
    var = jnp.maximum(0.0, jax.lax.square(x).mean(axes) - jax.lax.square(mean))
  else:
    var = jax.lax.square(x - jnp.expand_dims(mean, axes)).mean(axes)
  return mean, var


@dataclasses.dataclass(frozen=True)
class _BatchStats:
  """``x -> (x, sg(mean_B), sg(var_B))``: a train-mode BatchNorm's statistics, one copy per sample.

  ``exact``: without the stop-gradient (``x -> (x, mean_B, var_B)``), the
  stage's ``gradient_fn``. ``path`` and ``momentum`` only say where
  :func:`update_batch_stats` puts the running averages: they are left out of
  the comparison, so that the statistics stages of equal blocks are equal
  and the blocks are solved with ``lax.scan``.
  """

  path: Path = dataclasses.field(compare=False)
  momentum: float = dataclasses.field(compare=False)
  fast_variance: bool
  exact: bool = False

  def __call__(self, x: Array, thetas: tuple) -> tuple[Array, Array, Array]:
    del thetas
    mean, var = _batch_moments(x, self.fast_variance)
    running_averages.record((self, mean, var))
    batch = x.shape[0]
    held = (lambda s: s) if self.exact else jax.lax.stop_gradient
    copies = lambda s: jnp.broadcast_to(held(s), (batch,) + s.shape)
    return x, copies(mean), copies(var)


def _through_statistics(fn: StageFn) -> StageFn:
  """``fn`` with every BatchNorm statistics stage in it differentiated through the statistics."""
  if isinstance(fn, _BatchStats):
    return dataclasses.replace(fn, exact=True)
  if isinstance(fn, (_Seq, _Level)):
    return dataclasses.replace(fn, fns=tuple(None if f is None else _through_statistics(f)
                                             for f in fn.fns))
  return fn


def _normalise(x: Array, mean: Array, var: Array, theta: Params | None,
               epsilon: float) -> Array:
  """Flax's ``_normalize``: ``(x - mean) * (rsqrt(var + eps) * scale) + bias``."""
  y = x - mean
  mul = jax.lax.rsqrt(var + epsilon)
  theta = theta or {}
  if "scale" in theta:
    mul = mul * theta["scale"]
  y = y * mul
  if "bias" in theta:
    y = y + theta["bias"]
  return y


def _per_sample(stat: Array, x: Array) -> Array:
  """(B, C) statistics broadcast against an (B, ..., C) state."""
  return stat.reshape((stat.shape[0],) + (1,) * (x.ndim - 2) + stat.shape[1:])


@dataclasses.dataclass(frozen=True)
class _BatchNorm:
  """Train mode: ``((x, m, v), theta) -> (x - m) rsqrt(v + eps) scale + bias``, per sample."""

  epsilon: float
  has_params: bool

  def __call__(self, state: tuple, thetas: tuple) -> Array:
    x, mean, var = state
    theta = thetas[0] if self.has_params else None
    return _normalise(x, _per_sample(mean, x), _per_sample(var, x), theta, self.epsilon)


class _RunningBatchNorm:
  """Eval mode: the affine map with the running averages (constants of the game)."""

  def __init__(self, mean: Array, var: Array, epsilon: float, has_params: bool):
    self.mean, self.var, self.epsilon, self.has_params = mean, var, epsilon, has_params

  def __call__(self, x: Array, thetas: tuple) -> Array:
    theta = thetas[0] if self.has_params else None
    return _normalise(x, self.mean, self.var, theta, self.epsilon)


@dataclasses.dataclass(frozen=True)
class _Level:
  """One level of parallel paths: path k's stage (or the identity) on its part of the state.

  The first level fans the input out to every path, the last combines them
  (``"sum"`` or ``"concat"`` on the last axis) and applies ``activation``.
  """

  fns: tuple
  counts: tuple
  first: bool
  last: bool
  combine: str
  activation: Any

  def __call__(self, x: Any, thetas: tuple) -> Any:
    states = (x,) * len(self.fns) if self.first else x
    outs, start = [], 0
    for fn, count, h in zip(self.fns, self.counts, states):
      outs.append(h if fn is None else fn(h, thetas[start:start + count]))
      start += count
    if not self.last:
      return tuple(outs)
    y = jnp.concatenate(outs, axis=-1) if self.combine == "concat" else sum(outs[1:], outs[0])
    return games_lib.get_activation(self.activation)(y)


# ----------------------------------------------------------------------------
# Stage pieces: what a chain of layers becomes before it is cut into stages.
# ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Piece:
  """A stage of a path: its function, players and name; ``stats`` marks a BatchNorm statistics stage."""

  fn: StageFn
  players: tuple = ()
  name: str = ""
  stats: bool = False

  @property
  def num_players(self) -> int:
    return len(self.players)


def _fold(piece: _Piece, activation: Callable) -> _Piece:
  """``activation`` applied after ``piece`` (in a ready-made layer's own activation when it has one)."""
  if len(piece.players) == 1 and piece.fn is games_lib.layer_stage_fn(piece.players[0].layer):
    layer = piece.players[0].layer
    layer = dataclasses.replace(layer, activation=_then(layer.activation, activation))
    player = dataclasses.replace(piece.players[0], layer=layer)
    return _Piece(games_lib.layer_stage_fn(layer), (player,), piece.name)
  fn = _Seq((piece.fn, _Playerless(activation)), (piece.num_players, 0))
  return _Piece(fn, piece.players, piece.name)


def _merge(pieces: Sequence[_Piece]) -> _Piece:
  if len(pieces) == 1:
    return pieces[0]
  players = tuple(p for piece in pieces for p in piece.players)
  names = [piece.name for piece in pieces if piece.players] or [pieces[0].name]
  return _Piece(_Seq(tuple(p.fn for p in pieces), tuple(p.num_players for p in pieces)),
                players, "+".join(names))


def _compact(pieces: list[_Piece]) -> list[_Piece]:
  """A branch's stages with its parameter-free stages merged into the neighbouring player stage.

  BatchNorm statistics stages stay on their own: the statistics must be
  computed from the whole batch, outside the per-sample evaluation of a
  player's stage.
  """
  groups: list[list[_Piece]] = []
  pending: list[_Piece] = []
  for piece in pieces:
    if piece.players and not piece.stats:
      groups.append(pending + [piece])
      pending = []
    elif piece.stats:
      if pending:
        groups.append(pending)
      groups.append([piece])
      pending = []
    else:
      pending.append(piece)
  if pending:
    if groups and not groups[-1][-1].stats:
      groups[-1] = groups[-1] + pending
    else:
      groups.append(pending)
  return [_merge(g) for g in groups]


def _parallel(paths: list[list[_Piece]], combine: str, activation: Any, align: str,
              name: str) -> list[_Piece]:
  """Stages of parallel paths aligned level by level (start or end)."""
  depth = max([len(p) for p in paths] + [1])
  levels = []
  for level in range(depth):
    fns, counts, players = [], [], []
    for path in paths:
      offset = level if align == "start" else level - (depth - len(path))
      piece = path[offset] if 0 <= offset < len(path) else None
      fns.append(None if piece is None else piece.fn)
      counts.append(0 if piece is None else piece.num_players)
      if piece is not None:
        players.extend(piece.players)
    fn = _Level(tuple(fns), tuple(counts), level == 0, level == depth - 1, combine, activation)
    levels.append(_Piece(fn, tuple(players), f"{name}/level_{level}"))
  return levels


# ----------------------------------------------------------------------------
# Reading the module tree.
# ----------------------------------------------------------------------------


@dataclasses.dataclass
class _Context:
  train: bool
  weight_decay: float
  alignment: str
  variables: Any
  shapes: Any


def _module_path(module: nn.Module) -> Path:
  return tuple(module.path)


def _has_variables(module: nn.Module) -> bool:
  return bool(jax.tree.leaves(module.variables))


def _through(ctx: _Context, pieces: list[_Piece], x) -> tuple[list[_Piece], Any]:
  """``pieces`` and the shape of their output on ``x``."""
  for piece in pieces:
    thetas = tuple(games_lib.get_path(ctx.shapes, p.path) for p in piece.players)
    x = jax.eval_shape(piece.fn, x, thetas)
  return pieces, x


def _unbound(module: nn.Module) -> nn.Module:
  return module.clone(parent=None, name=None)


def _player(ctx: _Context, module: nn.Module, layer: Any = None) -> games_lib.Player:
  return games_lib.Player(("params",) + _module_path(module), ctx.weight_decay, layer)


def _shape_after(fn: Callable, x: jax.ShapeDtypeStruct, path: Path, what: Any
                 ) -> jax.ShapeDtypeStruct:
  try:
    out = jax.eval_shape(fn, x)
  except Exception as e:  # the callable cannot run outside Flax, or on this shape
    raise _unsupported(path, what, f"evaluating it on a batch of shape {x.shape} failed "
                       f"({type(e).__name__}: {e})") from e
  if not isinstance(out, jax.ShapeDtypeStruct) or out.shape[:1] != x.shape[:1]:
    raise _unsupported(path, what, "it must map a batched array to a batched array with "
                       "the batch axis first")
  return out


def _dense(ctx: _Context, module: nn.Dense, x) -> list[_Piece]:
  name = "/".join(_module_path(module))
  if x.ndim == 2 and module.dtype is None and module.precision is None:
    layer = games_lib.Dense(module.features, None, module.use_bias)
    return [_Piece(games_lib.layer_stage_fn(layer), (_player(ctx, module, layer),), name)]
  return [_Piece(_FlaxApply(_unbound(module)), (_player(ctx, module),), name)]


def _pairs(value: Any, n: int) -> tuple | None:
  if isinstance(value, int):
    return (value,) * n
  if isinstance(value, Sequence) and len(value) == n and all(isinstance(v, int) for v in value):
    return tuple(value)
  return None


def _conv_padding(padding: Any) -> Any:
  if isinstance(padding, str):
    return padding if padding in ("SAME", "VALID") else None
  if isinstance(padding, int):
    return ((padding, padding),) * 2
  if isinstance(padding, Sequence) and len(padding) == 2:
    pairs = []
    for p in padding:
      if isinstance(p, int):
        pairs.append((p, p))
      elif isinstance(p, Sequence) and len(p) == 2:
        pairs.append((int(p[0]), int(p[1])))
      else:
        return None
    return tuple(pairs)
  return None


def _conv(ctx: _Context, module: nn.Conv, x) -> list[_Piece]:
  name = "/".join(_module_path(module))
  kernel = tuple(module.kernel_size) if isinstance(module.kernel_size, Sequence) else None
  strides = _pairs(module.strides if module.strides is not None else 1, 2)
  padding = _conv_padding(module.padding)
  plain = (kernel is not None and len(kernel) == 2 and x.ndim == 4 and strides is not None and
           padding is not None and _pairs(module.input_dilation or 1, 2) == (1, 1) and
           _pairs(module.kernel_dilation or 1, 2) == (1, 1) and
           module.feature_group_count == 1 and module.dtype is None and
           module.precision is None and getattr(module, "mask", None) is None)
  if plain:
    layer = games_lib.Conv2D(module.features, kernel, strides, padding, None, module.use_bias)
    return [_Piece(games_lib.layer_stage_fn(layer), (_player(ctx, module, layer),), name)]
  return [_Piece(_FlaxApply(_unbound(module)), (_player(ctx, module),), name)]


def _batch_norm(ctx: _Context, module: nn.BatchNorm, x, running: bool | None) -> list[_Piece]:
  path = _module_path(module)
  name = "/".join(path)
  axis = module.axis if isinstance(module.axis, int) else None
  if axis not in (-1, x.ndim - 1) or module.axis_name is not None or (
      module.dtype is not None):
    raise _unsupported(path, module, "only BatchNorm over the last (channel) axis, without "
                       "axis_name or dtype, is supported")
  running = module.use_running_average if module.use_running_average is not None else running
  has_params = module.use_scale or module.use_bias
  players = (_player(ctx, module),) if has_params else ()
  if not running:
    stats = _BatchStats(path, float(module.momentum), bool(module.use_fast_variance))
    return [_Piece(stats, (), name + "/stats", stats=True),
            _Piece(_BatchNorm(float(module.epsilon), has_params), players, name)]
  if ctx.variables is None:
    raise _unsupported(path, module, "in eval mode its running averages are constants of the "
                       "game: pass variables=model.init(...) (or the trained variables)")
  stats = games_lib.get_path(ctx.variables, ("batch_stats",) + path)
  fn = _RunningBatchNorm(jnp.asarray(stats["mean"]), jnp.asarray(stats["var"]),
                         float(module.epsilon), has_params)
  return [_Piece(fn, players, name)]


_FLAX_EVALUATED = (nn.LayerNorm, nn.RMSNorm, nn.GroupNorm)


def _chain(ctx: _Context, layers: Sequence[Any], x, path: Path, train: bool | None,
           field: str = "layers") -> tuple[list[_Piece], Any]:
  """Stages of layers applied in order (activations folded into the player before them).

  ``field`` names the container's attribute holding the layers, so that a
  callable is named as Flax would name a module in its place (``layers_3``).
  """
  pieces: list[_Piece] = []
  for i, layer in enumerate(layers):
    where = path + (f"{field}_{i}",)
    if not isinstance(layer, nn.Module) and _is_elementwise(layer):
      x = _shape_after(layer, x, where, layer)
      if pieces and pieces[-1].players and not pieces[-1].stats:
        pieces[-1] = _fold(pieces[-1], layer)
      else:
        pieces.append(_Piece(_Playerless(layer), (), getattr(layer, "__name__", "activation")))
      continue
    new, x = _layer(ctx, layer, x, where, train)
    pieces.extend(new)
  return pieces, x


def _layer(ctx: _Context, layer: Any, x, path: Path, train: bool | None
           ) -> tuple[list[_Piece], Any]:
  """The stage pieces of one layer and its output shape."""
  if not isinstance(layer, nn.Module):
    if not callable(layer):
      raise _unsupported(path, layer, "it is not a Flax module or a callable")
    out = _shape_after(layer, x, path, layer)
    return [_Piece(_Playerless(layer), (), getattr(layer, "__name__", type(layer).__name__))], out
  path = _module_path(layer)

  if isinstance(layer, nn.Sequential):
    return _chain(ctx, layer.layers, x, path, None)
  if isinstance(layer, flax_blocks.Chain):
    return _chain(ctx, layer.layers, x, path, train)
  if isinstance(layer, flax_blocks.Residual):
    body, out = _chain(ctx, layer.body, x, path, train, "body")
    shortcut, _ = _chain(ctx, layer.shortcut, x, path, train, "shortcut")
    if not body:
      raise _unsupported(path, layer, "its body has no layers")
    align = "end" if ctx.alignment == "merge" else "start"
    return _parallel([body, shortcut], "sum", layer.activation, align, "/".join(path)), out
  if isinstance(layer, flax_blocks.Branches):
    if layer.combine not in ("concat", "sum"):
      raise _unsupported(path, layer, f"combine={layer.combine!r}")
    paths, outs = [], []
    for k, branch in enumerate(layer.branches):
      pieces, out = _chain(ctx, branch, x, path, train, f"branches_{k}")
      paths.append(_compact(pieces))
      outs.append(out)
    if layer.combine == "concat":
      out = jax.ShapeDtypeStruct(outs[0].shape[:-1] + (sum(o.shape[-1] for o in outs),),
                                 outs[0].dtype)
    else:
      out = outs[0]
    return _parallel(paths, layer.combine, layer.activation, "start", "/".join(path)), out
  if isinstance(layer, nn.Dense):
    return _through(ctx, _dense(ctx, layer, x), x)
  if isinstance(layer, nn.Conv):
    return _through(ctx, _conv(ctx, layer, x), x)
  if isinstance(layer, nn.BatchNorm):
    running = None if train is None else not train
    if layer.use_running_average is None and running is None:
      raise _unsupported(path, layer, "use_running_average is None and nothing passes it "
                         "(nn.Sequential does not); set it, or use dgnopt_jax.models.Chain")
    return _through(ctx, _batch_norm(ctx, layer, x, running), x)
  if isinstance(layer, _FLAX_EVALUATED):
    piece = _Piece(_FlaxApply(_unbound(layer)), (_player(ctx, layer),), "/".join(path))
    return _through(ctx, [piece], x)
  if not _has_variables(layer):
    module = _unbound(layer)
    fn = functools.partial(module.apply, {})
    try:
      out = jax.eval_shape(fn, x)
    except Exception as e:
      raise _unsupported(path, layer, "it has no variables but cannot be applied on its own "
                         f"({type(e).__name__}: {e}); if it creates submodules inline, write "
                         "it as nn.Sequential") from e
    return [_Piece(_Playerless(fn), (), "/".join(path))], _shape_after(fn, x, path, layer)
  raise _unsupported(path, layer, "it has variables but is not a known layer or container")


# ----------------------------------------------------------------------------
# The game.
# ----------------------------------------------------------------------------


def _call_kwargs(model: nn.Module, train: bool) -> dict:
  """``{"train": train}`` for this library's containers and modules whose ``__call__`` names ``train``."""
  if isinstance(model, (flax_blocks.Chain, flax_blocks.Residual, flax_blocks.Branches)):
    return {"train": train}
  try:
    named = "train" in inspect.signature(type(model).__call__).parameters
  except (TypeError, ValueError):
    named = False
  return {"train": train} if named else {}


def _leaf_paths(tree: Any) -> list[Path]:
  return [tuple(games_lib._key_name(k) for k in kp)
          for kp, _ in jax.tree_util.tree_leaves_with_path(tree)]


def from_flax(model: nn.Module, example_input: Array | jax.ShapeDtypeStruct,
              loss: losses_lib.LossLike = "softmax_cross_entropy", *,
              weight_decay: float = 0.0, train: bool = True, alignment: str = "merge",
              variables: Params | None = None) -> games_lib.Game:
  """The game a Flax linen model defines, on the params ``model.init`` makes.

  An ``nnx.Module`` is read by :func:`games.from_nnx` (its game's params are
  the pure ``nnx.State`` of its ``nnx.Param`` variables); ``train``,
  ``alignment`` and ``variables`` do not apply to it.

  A module this reader does not map (a custom ``@nn.compact`` or
  setup-style module, attention, an embedding, a layer outside the list in
  the module docstring) is traced instead: the game of ``model.apply``'s
  program (:func:`games.from_function`, docs/GAMES.md), with the same
  params, ``init`` and BatchNorm rule. The reader is kept for the models it
  maps: its pooling and flattening stages of their own give updates the
  traced cut does not where ``vxx_reg > 0``.

  Args:
    model: an unbound Flax linen module: ``nn.Sequential``, a
      :class:`dgnopt_jax.models.Chain` / ``Residual`` / ``Branches``, a
      supported layer (module docstring), nested freely, or any other
      module (traced).
    example_input: a batch (or ``jax.ShapeDtypeStruct``) of the model's input;
      its per-sample shape becomes the game's ``input_shape``.
    loss: terminal loss name, :class:`TerminalLoss` or per-sample callable.
    weight_decay: stage-cost coefficient ``weight_decay/2 |theta|^2`` of every player.
    train: the mode of BatchNorm layers whose ``use_running_average`` is
      None (train: batch statistics; eval: running averages). Also passed to
      the model as ``train=`` when it is a :mod:`dgnopt_jax.models` container
      or its ``__call__`` has a ``train`` parameter. A traced module in eval
      mode must not read running averages (an error names them; close over
      them with :func:`games.from_function`).
    alignment: where a residual block's shortcut players play, ``"merge"``
      (beside the body's last layer) or ``"split"`` (beside its first), as
      :class:`games.ResidualBlock`.
    variables: the model's variables; needed only in eval mode with
      BatchNorm (the running averages are constants of the game).

  Returns:
    A :class:`games.Game` whose params are the pytree ``model.init(key, x)``
    makes (``game.init(key)`` calls it), with one player per parametric layer
    at ``("params",) + module path``; ``game.apply(params, x)`` equals
    ``model.apply(params, x)`` (train mode: the output of
    ``model.apply(params, x, mutable=["batch_stats"])``).

  Raises:
    ValueError: a traced module whose program the tracer refuses (an
      operation across the batch, tied weights, ...), naming the module
      path and the primitive.
    ValueError: an unknown alignment, or params that no stage uses.
  """
  if isinstance(model, nnx.Module):
    if not train or alignment != "merge" or variables is not None:
      raise TypeError("from_flax: an nnx.Module holds its variables and its mode "
                      "(model.eval()); train=, alignment= and variables= are for linen "
                      "models (see games.from_nnx)")
    return nnx_games.from_nnx(model, example_input, loss, weight_decay=weight_decay)
  if not isinstance(model, nn.Module):
    raise TypeError(f"model must be a flax.linen.Module or flax.nnx.Module, got "
                    f"{type(model).__name__}")
  if alignment not in ALIGNMENTS:
    raise ValueError(f"alignment must be one of {ALIGNMENTS}, got {alignment!r}")
  x = jax.ShapeDtypeStruct(tuple(example_input.shape), example_input.dtype)
  kwargs = _call_kwargs(model, train)
  with guards.python_branching(f"the Flax model {type(model).__name__}"):
    shapes = jax.eval_shape(lambda k, v: model.init(k, v, **kwargs), jax.random.PRNGKey(0), x)
  # Shapes are inferred on params of the input's dtype (the ready-made
  # convolution does not promote mixed dtypes as Flax does).
  like_input = jax.tree.map(
      lambda s: jax.ShapeDtypeStruct(s.shape, x.dtype)
      if jnp.issubdtype(s.dtype, jnp.floating) else s, shapes)
  ctx = _Context(train, weight_decay, alignment, variables, like_input)
  try:
    pieces, _ = _layer(ctx, model.bind(shapes), x, (), train)
  except UnsupportedModuleError:
    return _traced(model, x, kwargs, like_input, loss, weight_decay, alignment, train)

  stages = []
  for p in pieces:
    exact = _through_statistics(p.fn)
    stages.append(games_lib.Stage(p.fn, p.players, p.name,
                                  gradient_fn=None if exact == p.fn else exact))
  owned = {p.path for s in stages for p in s.players}
  for leaf in _leaf_paths(shapes.get("params", {})):
    full = ("params",) + leaf
    if not any(full[:len(o)] == o for o in owned):
      raise _unsupported(full[1:-1], model, f"params {'/'.join(map(str, full))!r} belong to "
                         "no mapped layer (created inline inside a callable?)")

  input_shape = tuple(x.shape[1:])
  dtype = x.dtype

  def init_fn(key: Array) -> Params:
    return model.init(key, jnp.zeros((1,) + input_shape, dtype), **kwargs)

  game = games_lib.Game(tuple(stages), losses_lib.get_loss(loss), jax.jit(init_fn), input_shape)
  out = jax.eval_shape(game.apply, like_input, x)
  expected = jax.eval_shape(lambda p, v: model.apply(p, v, mutable=["batch_stats"], **kwargs)[0],
                            shapes, x)
  if out.shape != expected.shape:
    raise ValueError(f"the game's output shape {out.shape} differs from the model's "
                     f"{expected.shape}; the model is not what from_flax read")
  return game


def _traced(model: nn.Module, x: jax.ShapeDtypeStruct, kwargs: dict, like_input: Params,
            loss: losses_lib.LossLike, weight_decay: float, alignment: str,
            train: bool) -> games_lib.Game:
  """The game of a module the reader does not map: its forward pass traced (:mod:`traced_games`).

  A custom ``@nn.compact`` or setup-style module, an attention block, an
  embedding: ``traced_games.from_function`` of ``model.apply`` (in train
  mode with Flax's mutable ``batch_stats``, so BatchNorm follows the same
  statistics rule), on params of the example's float dtype (a traced program
  has fixed dtypes: the game's ``init``, ``model.init``, casts its floating
  params to it). Its errors name the module path and the primitive.
  """
  mutable = [c for c in like_input if c != "params"] if train else []

  def apply_fn(variables: Params, inputs: Any) -> Any:
    if mutable:
      return model.apply(variables, inputs, mutable=mutable, **kwargs)
    return model.apply(variables, inputs, **kwargs)

  game = traced_games.from_function(apply_fn, like_input, jnp.zeros(x.shape, x.dtype), loss,
                                    weight_decay=weight_decay, alignment=alignment)
  input_shape, dtype = tuple(x.shape[1:]), x.dtype

  def init_fn(key: Array) -> Params:  # in the dtypes the program was traced on
    variables = model.init(key, jnp.zeros((1,) + input_shape, dtype), **kwargs)
    return jax.tree.map(lambda v, like: v.astype(like.dtype), variables, like_input)

  return dataclasses.replace(game, init_fn=jax.jit(init_fn), input_shape=input_shape)


def update_batch_stats(game: games_lib.Game, params: Params, inputs: Array) -> Params:
  """Params with the running averages of every train-mode BatchNorm updated as Flax does.

  For each BatchNorm layer of a :func:`from_flax` game in train mode, with
  ``(mu_B, var_B)`` the batch statistics of this forward pass::

    mean <- momentum * mean + (1 - momentum) * mu_B
    var  <- momentum * var  + (1 - momentum) * var_B

  the ``"batch_stats"`` collection that
  ``model.apply(params, inputs, mutable=["batch_stats"])`` returns. Leaves
  outside ``"batch_stats"`` are kept; a game without train-mode BatchNorm
  returns ``params`` unchanged. For a :func:`games.from_function` game whose
  ``apply_fn`` returns Flax's mutated collections (``model.apply(v, x,
  train=True, mutable=["batch_stats"])``), the collections it returns on
  ``(params, inputs)`` replace those of ``params``: Flax's own update, for
  any module. Use it beside the optimizer's update, which
  leaves the running averages alone (no player owns them)::

    updates, opt_state = tx.update(None, opt_state, params, batch=(x, y))
    params = optax.apply_updates(update_batch_stats(game, params, x), updates)

  Args:
    game: a game from :func:`from_flax` or :func:`games.from_function`.
    params: its params (the model's variables).
    inputs: the batch the step trains on.

  Returns:
    A pytree like ``params``.
  """
  with running_averages.recording() as records:
    game.apply(params, inputs)
  if not records:
    return params
  new = jax.tree.map(lambda a: a, params)  # fresh containers
  for item in records:
    if callable(item):  # a traced game's update of Flax's collections
      new = item(new, inputs)
      continue
    stats, mean, var = item
    node = new["batch_stats"]
    for key in stats.path:
      node = node[key]
    m = stats.momentum
    node["mean"] = m * node["mean"] + (1 - m) * mean
    node["var"] = m * node["var"] + (1 - m) * var
  return new
