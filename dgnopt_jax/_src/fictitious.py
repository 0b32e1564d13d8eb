"""Fictitious players (DGNOpt §5.2, eq. 16): a layer's action shared by N cooperating players.

A feedforward network is a game with one player per stage, where the
cooperative machinery of DGNOpt has nothing to act on. DGNOpt eq. 16 divides
the action of each player into N parts whose sum is the original action::

    F_t(x_t, theta_{t,1}, ..., theta_{t,N}) := f_t(x_t, theta_t),   sum_n theta_{t,n} = theta_t

and trains the N fictitious players of every stage cooperatively (group
rationality, :func:`dgnopt_jax.gr`). They exist only during training: for
inference and saving the actions collapse back to ``theta_t`` by the sum.

* :func:`fictitious` turns a game into the game on split params;
* :func:`split_params` splits params for it; :func:`collapse_params` sums
  them back into params of the original game.

Split params hold, at each player's path, a tuple of N subtrees shaped like the
original one: ``{"dense_0": {"kernel", "bias"}}`` becomes
``{"dense_0": ({"kernel", "bias"}, ..., {"kernel", "bias"})}`` and player n
owns the path ``("dense_0", n)``.

Stages of a ready-made dense or convolutional layer (:func:`games.sequential`)
become N identical linear layers whose pre-activations are added before the
layer's activation, ``act(sum_n linear(theta_n, x)) = act(linear(sum_n theta_n, x))``:
every player sees the layer's input and the value derivative at the common
pre-activation, so the stage has ``shared_statistics`` and the Kronecker
curvatures solve it with the shared cooperative factors (GT-DDP Cor. 7). The
players keep the original :class:`games.Player` ``layer``. Any other stage
(blocks with several players, plain functions) evaluates its function on the
summed actions; its players carry no layer, so Kronecker curvatures give them
the diagonal fallback.

Initialisation: ``theta_n = theta / N`` (the last player takes the rounding
remainder, so that the sum is exactly ``theta``). DGNOpt §5.2 fixes only the
sum. The stage function depends on the sum alone, and with the equal split every
player sees the same ``Q_theta`` including its stage cost (below), so the
cooperative update keeps the players equal: no player is privileged and the
statistics the players share stay shared. Putting all of ``theta`` on one player,
or a random split with the same sum, would make the players' stage costs, hence
their updates, differ for no reason given by the game.

Stage cost: the separable cost ``N * weight_decay / 2 * |theta_n|^2`` per
player. Summed over the players it is at least ``weight_decay / 2 * |theta|^2``
(Cauchy-Schwarz), with equality exactly at the equal split, where each player's
gradient ``N * weight_decay * theta_n = weight_decay * theta`` is the original
player's. So the split game's loss at ``split_params(params)`` is the original
game's loss at ``params``.

What the cooperative step amounts to. At the equal split all players of a
layer have the same ``Q_theta``, ``Q_theta_x`` and statistics, and DGNOpt
eq. 22-25 can be solved in closed form:

* curvatures built per player from first-order statistics (identity,
  RMSprop, Adam; KFAC/EKFAC with ``cross_terms=False``): each player takes the
  original player's step at learning rate eta, so the layer moves as in the
  original game at learning rate ``N * eta``;
* the cooperative KFAC/EKFAC factors (shared statistics) and the joint
  ``dense`` curvature: the joint matrix is ``J_N (x) C`` (``J_N`` the all-ones
  matrix; ``dense`` adds the stage costs' ``N * weight_decay * I``), so each
  player's gain is ``(N C + damping I)^-1`` (``dense``:
  ``(N (C + weight_decay I) + damping I)^-1``) applied to the common vector,
  and the layer moves as in the original game with damping ``damping / N`` at
  the same learning rate.

So with the equal split the fictitious players re-scale the step of the
original optimizer; DGNOpt Table 4's faster convergence for larger N is
consistent with that.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Mapping, Sequence, Union

import jax
import jax.numpy as jnp

from dgnopt_jax._src import games as games_lib

Params = Any
Path = tuple
GameOrPaths = Union[games_lib.Game, Sequence[Union[Path, str]]]

_LAYER_KINDS = ("dense", "conv")


def _check_num_players(num_players: int) -> int:
  if isinstance(num_players, bool) or int(num_players) != num_players or num_players < 1:
    raise ValueError(f"num_players must be an integer >= 1, got {num_players!r}")
  return int(num_players)


def _paths(game_or_paths: GameOrPaths) -> tuple[Path, ...]:
  if isinstance(game_or_paths, games_lib.Game):
    return tuple(p.path for p in game_or_paths.players)
  if isinstance(game_or_paths, (str, bytes)):
    raise TypeError("give a game or a sequence of player paths, not a single string")
  return tuple(tuple(p.split("/")) if isinstance(p, str) else tuple(p) for p in game_or_paths)


def _sum_trees(trees: Sequence[Params]) -> Params:
  """Leaf-wise sum, left to right (a new container even for one tree)."""
  return jax.tree.map(lambda *leaves: functools.reduce(jnp.add, leaves), *trees)


def _replace_at(tree: Params, path: Path, fn: Callable[[Params], Params]) -> Params:
  """``tree`` with the subtree at ``path`` replaced by ``fn(subtree)``; containers copied."""
  if not path:
    return fn(tree)
  key, rest = path[0], path[1:]
  if isinstance(tree, Mapping):
    items = dict(tree)
    items[key] = _replace_at(tree[key], rest, fn)
    return items if type(tree) is dict else type(tree)(items)
  if isinstance(tree, (list, tuple)):
    items = list(tree)
    items[key] = _replace_at(tree[key], rest, fn)
    if isinstance(tree, list):
      return items
    return type(tree)(*items) if hasattr(tree, "_fields") else tuple(items)
  raise TypeError(f"cannot descend into a {type(tree).__name__} at key {key!r}")


@functools.lru_cache(maxsize=None)
def _layer_fn(layer: Any) -> Callable:
  """``act(sum_n linear(theta_n, x))``: N linear copies of ``layer`` added; one object per layer."""
  linear = dataclasses.replace(layer, activation=None)
  activation = games_lib.get_activation(layer.activation)

  def fn(x: jax.Array, thetas: tuple) -> jax.Array:
    return activation(functools.reduce(jnp.add, [linear(theta, x) for theta in thetas]))

  return fn


@functools.lru_cache(maxsize=None)
def _summed_fn(fn: Callable, num_players: int, originals: int) -> Callable:
  """``fn`` on the summed actions of ``originals`` groups of ``num_players`` players."""

  def summed(x: Any, thetas: tuple) -> Any:
    return fn(x, tuple(_sum_trees(thetas[k * num_players:(k + 1) * num_players])
                       for k in range(originals)))

  return summed


def _is_layer_stage(stage: games_lib.Stage) -> bool:
  if stage.num_players != 1:
    return False
  layer = stage.players[0].layer
  return (getattr(layer, "kind", None) in _LAYER_KINDS and stage.gradient_fn is None and
          stage.fn is games_lib.layer_stage_fn(layer))


def fictitious(game: games_lib.Game, num_players: int) -> games_lib.Game:
  """The game whose every player is split into ``num_players`` fictitious players (DGNOpt eq. 16).

  Player ``theta_{t}`` at path ``p`` becomes players ``theta_{t,1..N}`` at
  paths ``p + (0,)`` .. ``p + (N-1,)`` of the same stage, whose stage function
  is the original one on ``sum_n theta_{t,n}`` (DGNOpt §5.2). Train the result
  with :func:`dgnopt_jax.gr` on :func:`split_params`; :func:`collapse_params`
  gives back params of ``game``.

  Ready-made dense/conv layer stages become ``act(sum_n linear(theta_n, x))``
  with ``Stage.shared_statistics`` (the players see the same layer input and
  pre-activation value derivative) and keep the original player's ``layer``;
  other stages evaluate their function on the summed actions and their players
  carry no layer. Each player's stage cost is ``N * weight_decay / 2 *
  |theta_n|^2``, which sums to the original cost at the equal split (see the
  module docstring).

  Args:
    game: the original game.
    num_players: N >= 1, the fictitious players per original player. N = 1
      gives the original game on params with one-element tuples.

  Returns:
    A :class:`games.Game` on split params. Its ``init`` is the original
    ``init`` followed by :func:`split_params`.

  Raises:
    ValueError: ``num_players`` is not an integer >= 1.
    TypeError: ``game`` is not a :class:`games.Game`.
  """
  if not isinstance(game, games_lib.Game):
    raise TypeError(f"game must be a dgnopt_jax.games.Game, got {type(game).__name__}")
  n_players = _check_num_players(num_players)
  stages = []
  for stage in game.stages:
    if not stage.players:
      stages.append(stage)
      continue
    gradient_fn = None
    if _is_layer_stage(stage):
      fn, shared, layer = _layer_fn(stage.players[0].layer), True, stage.players[0].layer
    else:
      fn, shared, layer = _summed_fn(stage.fn, n_players, stage.num_players), False, None
      if stage.gradient_fn is not None:
        gradient_fn = _summed_fn(stage.gradient_fn, n_players, stage.num_players)
    players = tuple(games_lib.Player(p.path + (n,), n_players * p.weight_decay,
                                     layer if shared else None)
                    for p in stage.players for n in range(n_players))
    stages.append(games_lib.Stage(fn, players, stage.name, shared, gradient_fn))

  def init_fn(key: jax.Array) -> Params:
    # Split outside the compiled initialiser: XLA may recompute a random leaf
    # in each consumer with different rounding, and the sum would then miss
    # theta by an ulp.
    return split_params(game.init(key), game, n_players)

  return games_lib.Game(tuple(stages), game.loss,
                        None if game.init_fn is None else init_fn, game.input_shape)


def _split_one(theta: Params, num_players: int) -> tuple:
  parts = [jax.tree.map(lambda leaf: leaf / num_players, theta) for _ in range(num_players - 1)]
  if not parts:
    return (jax.tree.map(lambda leaf: leaf, theta),)
  # The last player takes theta minus the others' sum, so that the sum, taken
  # left to right, is exactly theta (the difference is exact: Sterbenz).
  rest = jax.tree.map(jnp.subtract, theta, _sum_trees(parts))
  return tuple(parts) + (rest,)


def split_params(params: Params, game_or_paths: GameOrPaths, num_players: int) -> Params:
  """Params of :func:`fictitious` ``(game, num_players)``: each player's subtree split N ways.

  The subtree ``theta`` at each player's path becomes a tuple of N subtrees
  ``theta_n = theta / N`` (the last one ``theta - sum of the others``), so
  that ``sum_n theta_n`` is exactly ``theta`` (DGNOpt eq. 16). Leaves owned
  by no player are kept as they are.

  Args:
    params: params of the original game.
    game_or_paths: the original game, or its players' paths (tuples or
      ``"a/b"`` strings).
    num_players: N >= 1.

  Returns:
    The split params pytree (new containers; the input is not modified).

  Raises:
    ValueError: a path is missing from ``params`` or N is not an integer >= 1.
  """
  n_players = _check_num_players(num_players)
  for path in _paths(game_or_paths):
    games_lib.get_path(params, path)  # a clear error if it is missing
    params = _replace_at(params, path, lambda theta: _split_one(theta, n_players))
  return params


def collapse_params(split: Params, game_or_paths: GameOrPaths) -> Params:
  """Params of the original game from split params: ``theta = sum_n theta_n`` (DGNOpt eq. 16).

  What inference and checkpoints use after training the fictitious players.
  Also maps updates of the split game to the original params' change.

  Args:
    split: params (or updates) of :func:`fictitious` ``(game, N)``.
    game_or_paths: the original game, or its players' paths.

  Returns:
    A pytree shaped like the original game's params; each player's subtree is
    the left-to-right sum of its N fictitious players'.

  Raises:
    ValueError: a player's subtree is not a non-empty tuple of equally
      structured subtrees.
  """

  def collapse(path, node):
    name = "/".join(map(str, path))
    if not isinstance(node, (tuple, list)) or hasattr(node, "_fields") or not node:
      raise ValueError(
          f"params at {name!r} are not split into fictitious players: expected a tuple "
          f"of the players' subtrees, got {type(node).__name__}; collapse_params takes "
          "the original game (or its paths), not the fictitious one")
    structures = {jax.tree.structure(t) for t in node}
    if len(structures) != 1:
      raise ValueError(f"the fictitious players at {name!r} have different structures: "
                       f"{sorted(map(str, structures))}")
    return _sum_trees(node)

  for path in _paths(game_or_paths):
    node = games_lib.get_path(split, path)
    split = _replace_at(split, path, lambda _, path=path, node=node: collapse(path, node))
  return split
