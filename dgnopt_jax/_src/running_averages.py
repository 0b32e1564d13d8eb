"""The running averages of a game's batch statistics: :func:`update_batch_stats`.

:func:`update_batch_stats` evaluates the game's forward pass inside
:func:`recording`; the last stage of a traced game whose ``apply_fn``
returns Flax's mutated collections (:func:`games.from_flax` in train mode)
hands :func:`record` the update of those collections. Outside
:func:`recording`, recording does nothing, so the solvers' own evaluations
of the stages are unaffected.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Any, Iterator

import jax

Params = Any


class _Stack(threading.local):
  records: list


_STACK = _Stack()


@contextlib.contextmanager
def recording() -> Iterator[list]:
  """A list that collects, in order, what the stages evaluated inside the block record."""
  stack = getattr(_STACK, "records", None)
  if stack is None:
    stack = _STACK.records = []
  records: list = []
  stack.append(records)
  try:
    yield records
  finally:
    stack.pop()


def record(item: Any) -> None:
  """Adds ``item`` to the innermost :func:`recording` (nothing outside one)."""
  stack = getattr(_STACK, "records", None)
  if stack:
    stack[-1].append(item)


def update_batch_stats(game: Any, params: Params, inputs: jax.Array) -> Params:
  """Params with the running averages of every train-mode BatchNorm updated as Flax does.

  For each BatchNorm layer of a :func:`games.from_flax` game in train mode,
  with ``(mu_B, var_B)`` the batch statistics of this forward pass::

    mean <- momentum * mean + (1 - momentum) * mu_B
    var  <- momentum * var  + (1 - momentum) * var_B

  that is, the collections ``model.apply(params, inputs,
  mutable=["batch_stats"])`` returns replace those of ``params`` (Flax's own
  update, for any module). The same holds for a :func:`games.from_function`
  game whose ``apply_fn`` returns Flax's mutated collections. Leaves outside
  them are kept; a game without such collections returns ``params``
  unchanged. Use it beside the optimizer's update, which leaves the running
  averages alone (no player owns them)::

    updates, opt_state = tx.update(None, opt_state, params, batch=(x, y))
    params = optax.apply_updates(update_batch_stats(game, params, x), updates)

  Args:
    game: a game from :func:`games.from_flax` or :func:`games.from_function`.
    params: its params (the model's variables).
    inputs: the batch the step trains on.

  Returns:
    A pytree like ``params``.
  """
  with recording() as records:
    game.apply(params, inputs)
  for update in records:  # Flax's mutated collections on (params, inputs)
    params = update(params, inputs)
  return params
