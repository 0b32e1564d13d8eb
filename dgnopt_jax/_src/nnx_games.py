"""Flax NNX modules as games: :func:`from_nnx`.

An ``nnx.Module`` holds its variables; the game is the traced program of
(:func:`traced_games.from_function`)

    apply_fn(params, x) = nnx.merge(graphdef, params, rest)(x),

where ``graphdef, params, rest = nnx.split(model, wrt, ...)``. The game's
params are the pure ``nnx.State`` of the ``wrt`` variables (``nnx.Param`` by
default): ``nnx.as_pure(nnx.state(model, nnx.Param))``, the arrays
``nnx.Optimizer(model, tx, wrt=nnx.Param)`` hands to ``tx.update``, nested by
attribute name and list index, so the players are named by module path
(``"encoder/layers/0"``). Everything else in ``rest`` (a BatchNorm's running
averages in eval mode, random-number streams that are not drawn from,
counters that are not changed) is a constant of the game, read when it is
built.

A stage function is a pure function of the state and the players' params;
NNX modules may instead change their variables when called (a train-mode
BatchNorm updates its running averages, a Dropout draws from its stream and
advances its counter, a module counts its calls). The forward pass is
therefore traced once with every variable as an input, and a variable whose
value after the call is not the one it came in with is an error naming its
module path and type, before any stage is cut (``model.eval()`` makes
BatchNorm read its running averages and Dropout the identity). The
submodules' calls are traced under ``jax.named_scope`` of their module path,
so that :func:`traced_games.from_function`'s errors name it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from typing import Any, Callable, Iterator

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from dgnopt_jax._src import games as games_lib
from dgnopt_jax._src import losses as losses_lib
from dgnopt_jax._src import traced_games


@contextlib.contextmanager
def _module_scopes(model: nnx.Module) -> Iterator[None]:
  """Calls of ``model``'s submodules traced under ``jax.named_scope`` of their module path.

  NNX modules set no name scope, so without this an equation's name stack
  (what :func:`games.from_function` names in its errors) says nothing of the
  module it comes from. For the duration of the trace, ``__call__`` of each
  submodule's class is wrapped to enter the scope of the module path of the
  instance it is called on (relative to the enclosing module being called),
  and restored on exit. Patching the classes (an instance's ``__call__`` is
  looked up on its type) is the one hook NNX leaves; it holds only while
  ``apply_fn`` is traced, so calls of those classes traced in another thread
  at the same moment would be scoped too, which changes names, not results.
  """
  modules = [(path, m) for path, m in nnx.iter_graph(model) if isinstance(m, nnx.Module)]
  paths = {id(m): path for path, m in modules}
  classes = {type(m) for _, m in modules}
  originals = {cls: (cls.__dict__.get("__call__"), getattr(cls, "__call__", None))
               for cls in classes}
  active: list[tuple] = []

  def wrap(call: Callable) -> Callable:
    @functools.wraps(call)
    def scoped(self, *args, **kwargs):
      path = paths.get(id(self))
      if path is None or (active and active[-1] == path):
        return call(self, *args, **kwargs)
      outer = active[-1] if active else ()
      relative = path[len(outer):] if path[:len(outer)] == outer else path
      active.append(path)
      try:
        with jax.named_scope("/".join(map(str, relative)) or type(self).__name__):
          return call(self, *args, **kwargs)
      finally:
        active.pop()
    return scoped

  for cls, (_, call) in originals.items():
    if call is not None:
      cls.__call__ = wrap(call)
  try:
    yield
  finally:
    for cls, (own, call) in originals.items():
      if own is not None:
        cls.__call__ = own
      elif call is not None:
        del cls.__call__


def _variables_by_path(state: Any) -> list[tuple[str, nnx.Variable]]:
  """``(module path, variable)`` of every variable of ``state``, in flattening order."""
  flat, _ = jax.tree_util.tree_flatten_with_path(
      state, is_leaf=lambda v: isinstance(v, nnx.Variable))
  return [("/".join(str(games_lib._key_name(k)) for k in path), v)  # pylint: disable=protected-access
          for path, v in flat]


def _check_pure_forward(graphdef: Any, state: Any, x_avals: Any, name: str) -> None:
  """Raises a ``ValueError`` naming the variables the forward pass changes.

  ``state`` holds all the model's variables; the forward pass is traced with
  each as an input, and a variable is unchanged when the outputs for it are
  its inputs themselves.
  """

  def forward(variables, x):
    model = nnx.merge(graphdef, variables)
    model(x)
    return nnx.state(model)

  avals = jax.tree.map(lambda v: jax.ShapeDtypeStruct(np.shape(v), jnp.result_type(v)), state)
  closed = jax.make_jaxpr(forward)(avals, x_avals)
  jaxpr = closed.jaxpr
  before = _variables_by_path(state)
  num_vars = len(jax.tree.leaves(state))
  after_state = jax.eval_shape(forward, avals, x_avals)
  after = _variables_by_path(after_state)
  if [p for p, _ in after] != [p for p, _ in before] or num_vars != len(jaxpr.outvars):
    added = sorted({p for p, _ in after} - {p for p, _ in before})
    raise ValueError(
        f"games.from_nnx: calling {name} adds variables {added}; a game's stages are pure "
        "functions of the params and the batch: create every variable in the module's "
        "__init__ (or call the model once before building the game)")
  # One entry per array leaf (a variable may hold several, or none).
  owners = [(path, var) for path, var in before for _ in jax.tree.leaves(var)]
  changed = list(dict.fromkeys(
      f"{path!r} ({type(var).__name__})"
      for (path, var), invar, outvar in zip(owners, jaxpr.invars, jaxpr.outvars)
      if outvar is not invar))
  if changed:
    raise ValueError(
        f"games.from_nnx: calling {name} changes the variables {', '.join(changed)}; a "
        "game's stages are pure functions of the params and the batch, so a forward pass "
        "that updates state (train-mode BatchNorm statistics, Dropout drawing from its "
        "random stream, counters) is not supported: call model.eval() before building the "
        "game (BatchNorm then reads its running averages, Dropout is the identity), or "
        "build such layers with use_running_average=True / deterministic=True")


def from_nnx(model: nnx.Module, example_input: Any,
             loss: losses_lib.LossLike = "softmax_cross_entropy", *,
             weight_decay: float = 0.0, wrt: Any = nnx.Param) -> games_lib.Game:
  """The game a Flax NNX module defines, traced on an example batch (module docstring).

  Args:
    model: an ``nnx.Module`` whose call ``model(x)`` maps a batch to outputs,
      every sample on its own (in eval mode where it has BatchNorm or Dropout).
    example_input: a batch (array or pytree of arrays, or
      ``jax.ShapeDtypeStruct``s), the batch as every leaf's leading axis;
      integer token ids are fine.
    loss: terminal loss name, :class:`TerminalLoss` or per-sample callable.
    weight_decay: stage-cost coefficient ``weight_decay/2 |theta|^2`` of every player.
    wrt: the NNX filter of the variables the players own, as given to
      ``nnx.Optimizer(..., wrt=...)``; the other variables are constants.

  Returns:
    A :class:`games.Game` on the params ``nnx.as_pure(nnx.state(model,
    wrt))`` (an ``nnx.State`` of arrays), one player per module owning
    ``wrt`` variables (``"layers/0"``: ``{"kernel", "bias"}``), with the
    Kronecker structure of ``nnx.Linear`` / ``nnx.Conv`` layers as
    :func:`games.from_function` finds it; ``game.apply(params, x)`` equals
    ``model(x)``. The model is not changed.

  Raises:
    TypeError: ``model`` is not an ``nnx.Module``.
    ImportError: the installed Flax predates ``nnx.as_pure`` (Flax 0.12),
      the pure params ``nnx.Optimizer`` hands to ``tx.update``.
    ValueError: the forward pass changes or adds variables (named by module
      path and type), no variable matches ``wrt``, or anything
      :func:`games.from_function` refuses.
  """
  if not isinstance(model, nnx.Module):
    raise TypeError(f"games.from_nnx: model must be a flax.nnx.Module, got "
                    f"{type(model).__name__}")
  if not hasattr(nnx, "as_pure"):
    raise ImportError("games.from_nnx needs flax>=0.12 (nnx.as_pure, the pure params "
                      "nnx.Optimizer passes to tx.update)")
  name = type(model).__name__
  graphdef, state = nnx.split(model)
  x_leaves, x_tree = jax.tree.flatten(example_input)
  x_avals = jax.tree.unflatten(x_tree, [jax.ShapeDtypeStruct(np.shape(a), jnp.result_type(a))
                                        for a in x_leaves])
  _check_pure_forward(graphdef, state, x_avals, name)
  graphdef, params, rest = nnx.split(model, wrt, ...)
  params = nnx.as_pure(params)
  if not jax.tree.leaves(params):
    raise ValueError(f"games.from_nnx: {name} has no variables matching wrt={wrt!r}, so the "
                     "game would have no players")

  def apply_fn(params: Any, x: Any) -> Any:
    merged = nnx.merge(graphdef, params, rest)
    with _module_scopes(merged):
      return merged(x)

  game = traced_games.from_function(apply_fn, params, example_input, loss,
                                    weight_decay=weight_decay)
  return dataclasses.replace(game, stages=tuple(
      dataclasses.replace(s, fn=_arrays_only(s.fn, s.players)) for s in game.stages))


def _is_variable(v: Any) -> bool:
  return isinstance(v, nnx.Variable)


def _arrays_only(fn: Callable, players: tuple) -> Callable:
  """``fn`` refusing players' params that hold ``nnx.Variable``s instead of arrays.

  ``nnx.split(model, nnx.Param)`` gives a state of ``nnx.Param`` objects; the
  game plays on their arrays (the updates it returns are shaped like those),
  so such params are a ``TypeError`` saying what to pass, met where the
  solver first evaluates a stage, rather than a mismatch later.
  """

  def stage_fn(x: Any, thetas: tuple) -> Any:
    held = [p.name for p, theta in zip(players, thetas)
            if any(map(_is_variable, jax.tree.leaves(theta, is_leaf=_is_variable)))]
    if held:
      raise TypeError(
          f"the params of players {held} hold nnx.Variable objects; the game of an "
          "nnx.Module plays on arrays: pass nnx.as_pure(nnx.state(model, nnx.Param)) "
          "(what nnx.Optimizer passes)")
    return fn(x, thetas)

  return stage_fn
