"""One game step on a ``flax.training.train_state.TrainState``: :func:`apply_game_step`.

``TrainState.apply_gradients(grads=..., **kwargs)`` calls
``tx.update(grads, opt_state, params)`` and hands its other keywords to
``replace``, so it cannot pass the batch a DGNOpt transformation solves its
game on. :func:`apply_game_step` is its counterpart for those
transformations (and for any ``optax.GradientTransformationExtraArgs`` that
reads its step from params and extra arguments alone).
"""

from __future__ import annotations

from typing import Any, TypeVar

import optax

State = TypeVar("State")


def apply_game_step(state: State, batch: Any, **extra_args: Any) -> State:
  """``state`` after one step of ``state.tx`` on ``batch``, as ``apply_gradients`` does with grads.

  Runs ``updates, opt_state = state.tx.update(None, state.opt_state,
  state.params, batch=batch, **extra_args)``, applies the updates with
  ``optax.apply_updates`` and returns ``state.replace(step=state.step + 1,
  params=..., opt_state=...)``. Pure; jit it whole
  (``jax.jit(dgnopt.apply_game_step)``, the transformation is a static field
  of the state, so it compiles once).

  ``state.params`` must be the params the game was built on: for
  :func:`games.from_flax` and a linen ``model.apply`` traced with
  :func:`games.from_function`, the variables ``{"params": ...}`` that
  ``model.init`` returns (``TrainState.create(apply_fn=model.apply,
  params=variables, tx=tx)``, applied as ``state.apply_fn(state.params,
  x)``), not Flax's usual ``variables["params"]``.

  Args:
    state: a ``TrainState`` (or any ``flax.struct`` dataclass with ``step``,
      ``params``, ``tx``, ``opt_state`` and ``replace``) whose ``tx`` is a
      DGNOpt transformation, alone or first in an ``optax.chain``.
    batch: ``(inputs, targets)`` or ``{"inputs": ..., "targets": ...}``.
    **extra_args: further keywords for ``tx.update`` (``value=`` for
      ``optax.contrib.reduce_on_plateau`` after the step).

  Returns:
    The new state; ``step`` counts calls (the transformation's own
    ``count`` counts applied steps: skipped and rejected ones are not).

  Raises:
    TypeError: ``state`` lacks one of the fields above.
  """
  missing = [f for f in ("step", "params", "tx", "opt_state", "replace")
             if not hasattr(state, f)]
  if missing:
    raise TypeError(f"apply_game_step needs a flax TrainState (fields step, params, tx, "
                    f"opt_state and a replace method); {type(state).__name__} lacks "
                    f"{missing}")
  updates, opt_state = state.tx.update(None, state.opt_state, state.params, batch=batch,
                                       **extra_args)
  params = optax.apply_updates(state.params, updates)
  return state.replace(step=state.step + 1, params=params, opt_state=opt_state)
