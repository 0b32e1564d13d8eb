"""How a DGNOpt transformation composes with optax's wrappers.

A DGNOpt step is computed from ``params`` and ``batch`` (the game), never
from incoming gradients: ``update`` takes ``updates=None``. Three kinds of
optax composition would therefore change meaning without a word, and are
refused when the state is built (``init``), before any step:

* a transformation placed before it in ``optax.chain`` / ``optax.named_chain``
  would act on updates the step does not read (with ``None`` it acts on
  nothing);
* ``optax.MultiSteps`` accumulates gradients over micro-batches and calls the
  inner update on each micro-batch, keeping the inner state of the last only:
  the step would be the game's on the last micro-batch, the others dropped.
  The step's backward recursion and rollout need every sample's trajectory
  at once, so the micro-batches cannot be accumulated either;
* ``optax.apply_if_finite`` checks the incoming gradients, not the step;
  the transformation checks its own step (``nonfinite``);
* ``optax.transforms.freeze`` after it in a chain would zero part of a step
  that was solved with those players moving; ``frozen=`` on the
  transformation solves the game with them held fixed.

optax builds these wrappers from closures, so the composition is not visible
to the inner transformation except through the calls that reach it: its
``init`` is called from the wrapper's ``init``. :func:`check_enclosing_wrappers`
walks up the Python call stack from ``init`` through optax's frames and
recognises the wrappers by their code objects (taken from optax's public
constructors, so they follow optax's own implementation). A wrapper it does
not know is let through.

``optax.masked`` and ``optax.multi_transform`` hand the inner transformation
params with the other labels' leaves replaced by ``optax.MaskedNode``; the
game needs every layer's params for its forward pass and rollout, so they are
refused where a player's params are masked (:func:`check_not_masked`).
``optax.tree.map_params`` calls ``init`` on a placeholder for the params
(:func:`is_params_placeholder`).
"""

from __future__ import annotations

import functools
import sys
import types
from typing import Any

import jax
import optax

from dgnopt_jax._src import games as games_lib

OPTAX_GUIDE = "docs/OPTAX.md"


@functools.lru_cache(maxsize=None)
def _wrapper_codes() -> dict[types.CodeType, str]:
  """The code objects of the ``init`` functions of the optax wrappers that are refused."""
  codes = {}

  def add(make, name):
    try:
      codes[make().__code__] = name
    except Exception:  # pylint: disable=broad-except  # an optax without this wrapper
      pass

  add(lambda: optax.MultiSteps.init, "optax.MultiSteps")
  add(lambda: optax.apply_if_finite(optax.identity(), 1).init, "optax.apply_if_finite")
  add(lambda: optax.chain(optax.identity()).init, "optax.chain")
  add(lambda: optax.named_chain(("x", optax.identity())).init, "optax.named_chain")
  return codes


@functools.lru_cache(maxsize=None)
def _freeze_codes() -> tuple[types.CodeType, types.CodeType] | None:
  """``optax.masked``'s ``init`` code and ``optax.set_to_zero``'s ``update`` code: a freeze."""
  try:
    return (optax.masked(optax.identity(), True).init.__code__,
            optax.set_to_zero().update.__code__)
  except Exception:  # pylint: disable=broad-except
    return None


def _is_freeze(init: Any) -> bool:
  """Whether a chain element's ``init`` is ``optax.masked(optax.set_to_zero(), mask)``."""
  codes = _freeze_codes()
  code = getattr(init, "__code__", None)
  if codes is None or code is not codes[0]:
    return False
  update = _closure_value(init, "inner")
  update = getattr(update, "update", None)
  # optax.masked wraps its inner transformation for extra arguments: unwrap it.
  wrapped = _closure_value(update, "tx")
  if wrapped is not None:
    update = getattr(wrapped, "update", None)
  return getattr(update, "__code__", None) is codes[1]


def _closure_value(fn: Any, name: str) -> Any:
  """The value of the free variable ``name`` of the function ``fn`` (None if it has none)."""
  code, closure = getattr(fn, "__code__", None), getattr(fn, "__closure__", None)
  if code is None or not closure or name not in code.co_freevars:
    return None
  try:
    return closure[code.co_freevars.index(name)].cell_contents
  except ValueError:  # an empty cell
    return None


def _later_elements(frame: types.FrameType, position: int) -> list:
  local = frame.f_locals
  if "init_fns" in local:
    return list(local["init_fns"])[position + 1:]
  return [tx.init for _, tx in list(local.get("transforms", ()))[position + 1:]]


def _chain_position(frame: types.FrameType, below: types.FrameType | None) -> int | None:
  """Where in a chain the element being initialised stands (None if unknown)."""
  local = frame.f_locals
  if "init_fns" in local and below is not None and "fn" in below.f_locals:
    try:
      return [id(f) for f in local["init_fns"]].index(id(below.f_locals["fn"]))
    except ValueError:
      return None
  if "transforms" in local and "tx" in local:  # named_chain: a loop over (name, tx)
    return next((i for i, (_, tx) in enumerate(local["transforms"]) if tx is local["tx"]),
                None)
  return None


def _refusal(wrapper: str, name: str) -> str:
  if wrapper == "optax.MultiSteps":
    return (
        f"optax.MultiSteps cannot wrap dgnopt_jax.{name}: it calls the inner update on "
        "every micro-batch and keeps the inner state of the last one only, so the step "
        "would be the game's on the last micro-batch, the others dropped; and a DGNOpt "
        "step cannot be accumulated over micro-batches (its backward recursion and "
        "rollout need every sample's trajectory at once). Pass the whole batch to one "
        "update (its cost and memory are linear in the batch; split it over devices "
        "with dgnopt_jax.sharding if it does not fit one), or accumulate an open-loop "
        "baseline, which is optax's own optimizer: optax.MultiSteps(optax.adam(...)). "
        f"See {OPTAX_GUIDE}.")
  if wrapper == "optax.apply_if_finite":
    return (
        f"optax.apply_if_finite cannot wrap dgnopt_jax.{name}: it checks the incoming "
        "gradients, which a DGNOpt step does not take (updates=None). The "
        "transformation checks its own step: with nonfinite='skip' (the default) a step "
        "whose loss, update or updated params are not finite is skipped (zero updates, "
        "statistics unchanged) and counted in state.skipped; nonfinite='raise' raises "
        f"instead. See {OPTAX_GUIDE}.")
  return (
      f"dgnopt_jax.{name} must come first in {wrapper}: it computes its step from params "
      "and batch and takes updates=None, so a transformation before it would act on "
      "updates it does not read. Put transformations meant for the step after it, "
      f"e.g. optax.chain(dgnopt.{name}(...), optax.clip_by_global_norm(1.0)); weight "
      f"decay is weight_decay= on dgnopt.{name}. See {OPTAX_GUIDE}.")


def check_enclosing_wrappers(name: str, depth: int = 12) -> None:
  """Raises a TypeError when ``init`` is called by an optax wrapper that is refused.

  Args:
    name: the transformation's name (``"fne"``, ``"gr"``, ``"olne"``), for the message.
    depth: how many frames above the caller to look at; the walk stops at the
      first frame that is neither optax's nor dgnopt_jax's.
  """
  codes = _wrapper_codes()
  frame = sys._getframe(2)  # pylint: disable=protected-access  # the caller's caller
  below = None
  for _ in range(depth):
    if frame is None:
      return
    module = frame.f_globals.get("__name__", "")
    if not (module.startswith("optax") or module.startswith("dgnopt_jax")):
      return
    wrapper = codes.get(frame.f_code)
    if wrapper in ("optax.chain", "optax.named_chain"):
      position = _chain_position(frame, below)
      if position:
        raise TypeError(_refusal(wrapper, name))
      if position == 0 and any(_is_freeze(f) for f in _later_elements(frame, 0)):
        raise TypeError(
            f"optax.transforms.freeze after dgnopt_jax.{name} would zero part of a step "
            "solved with those players moving (the others' feedback accounts for their "
            f"change); name them in frozen= on dgnopt.{name} instead, which solves the game "
            f"with them held fixed. See {OPTAX_GUIDE}.")
    elif wrapper is not None:
      raise TypeError(_refusal(wrapper, name))
    below, frame = frame, frame.f_back


def is_params_placeholder(params: Any) -> bool:
  """Whether ``params`` is the placeholder ``optax.tree.map_params`` initialises with."""
  placeholder = getattr(getattr(optax.tree_utils, "_state_utils", None), "_ParamsPlaceholder",
                        None)
  return placeholder is not None and isinstance(params, placeholder)


def _is_masked(node: Any) -> bool:
  return isinstance(node, optax.MaskedNode)


def check_not_masked(game: games_lib.Game, params: Any, name: str) -> None:
  """Raises a TypeError naming the player whose params ``optax.masked`` hid.

  Args:
    game: the game.
    params: the params ``init`` or ``update`` received.
    name: the transformation's name, for the message.
  """
  masked = jax.tree.leaves(params, is_leaf=_is_masked)
  if not any(_is_masked(leaf) for leaf in masked):
    return
  for player in game.players:
    node = params
    for key in player.path:
      if _is_masked(node) or not hasattr(node, "keys") or key not in node:
        break
      node = node[key]
    hidden = [l for l in jax.tree.leaves(node, is_leaf=_is_masked) if _is_masked(l)]
    if _is_masked(node) or hidden:
      raise TypeError(
          f"player {player.name!r} of dgnopt_jax.{name}'s game has its params masked "
          "(optax.MaskedNode): optax.masked and optax.multi_transform hide the other "
          "labels' params from the inner transformation, and the game needs every "
          "layer's params for its forward pass and rollout. To keep layers fixed, name "
          f"them in frozen= on dgnopt.{name} (they become constants of the game); to "
          "train them with another optimizer, update them with it separately on their "
          f"gradients. See {OPTAX_GUIDE}.")
