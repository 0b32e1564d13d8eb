"""What a game's forward pass records for the running averages of its batch statistics.

:func:`games.update_batch_stats` evaluates the game's forward pass inside
:func:`recording`; the stages that compute batch statistics (a
:func:`games.from_flax` BatchNorm's statistics stage, a traced game whose
``apply_fn`` returns Flax's mutated collections) hand :func:`record` what it
needs to update the running averages. Outside :func:`recording`, recording
does nothing, so the solvers' own evaluations of the stages are unaffected.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Any, Iterator


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
