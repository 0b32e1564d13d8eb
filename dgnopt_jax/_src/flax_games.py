"""Flax linen models as games (DGNOpt §3.1): :func:`from_flax`.

``from_flax(model, example_input)`` builds the game a Flax linen model
defines, on the variables ``model.init`` makes (``{"params": ...}``, with
``"batch_stats"`` when there is BatchNorm), so ``model.apply(params, x)``
keeps working and checkpoints are interchangeable. The game is the traced
game of ``model.apply`` (:func:`games.from_function`, :mod:`traced_games`):
any module, compact or setup-style, this library's containers
(:class:`models.Chain`, ``Residual``, ``Branches``) and ``nn.Sequential``
alike. What this front end adds to the tracer:

* **Mode.** ``train=`` is passed to the model where its ``__call__`` names
  it. In train mode the model is applied with Flax's mutable
  ``batch_stats`` (every collection but ``"params"``): a BatchNorm
  normalises with the batch's statistics, which the tracer cuts into a
  statistics stage (the BatchNorm rule: first-order terms through the
  statistics, second-order terms with them held fixed; docs/GAMES.md), and
  :func:`games.update_batch_stats` replaces the running averages by Flax's own
  update. In eval mode the running averages are constants of the game, read
  from ``variables`` when the game is built (eval mode never changes them).
* **Dtypes.** The program is traced on params of the example's float dtype;
  ``game.init`` calls ``model.init`` and casts its floating leaves to it.
* **Players.** One per module owning params (``("params",) + module
  path``): ``nn.Dense`` and 2-D ``nn.Conv`` are Kronecker players
  (:class:`games.Dense`, token rows included, / :class:`games.Conv2D`), any
  other parametric module a generic player. An elementwise activation
  continues its layer's stage, a pooling or a flattening between two layers
  is a stage of its own, a residual block's or an inception block's paths
  play level by level (``alignment``), as the hand-written
  :class:`games.ResidualBlock` and :class:`games.InceptionBlock`.
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any

from flax import nnx
import flax.linen as nn
import jax
import jax.numpy as jnp

from dgnopt_jax._src import flax_blocks
from dgnopt_jax._src import games as games_lib
from dgnopt_jax._src import guards
from dgnopt_jax._src import losses as losses_lib
from dgnopt_jax._src import nnx_games
from dgnopt_jax._src import traced_games

Array = jax.Array
Params = Any

ALIGNMENTS = ("merge", "split")


class UnsupportedModuleError(ValueError):
  """A Flax model that :func:`from_flax` cannot make a game of, as it is called."""


def _call_kwargs(model: nn.Module, train: bool) -> dict:
  """``{"train": train}`` for this library's containers and modules whose ``__call__`` names ``train``."""
  if isinstance(model, (flax_blocks.Chain, flax_blocks.Residual, flax_blocks.Branches)):
    return {"train": train}
  try:
    named = "train" in inspect.signature(type(model).__call__).parameters
  except (TypeError, ValueError):
    named = False
  return {"train": train} if named else {}


def from_flax(model: nn.Module, example_input: Array | jax.ShapeDtypeStruct,
              loss: losses_lib.LossLike = "softmax_cross_entropy", *,
              weight_decay: float = 0.0, train: bool = True, alignment: str = "merge",
              variables: Params | None = None) -> games_lib.Game:
  """The game a Flax model defines, on the params ``model.init`` makes.

  An ``nnx.Module`` is read by :func:`games.from_nnx` (its game's params are
  the pure ``nnx.State`` of its ``nnx.Param`` variables); ``train``,
  ``alignment`` and ``variables`` do not apply to it. A linen module is
  traced (module docstring, docs/GAMES.md).

  Args:
    model: an unbound Flax linen module (any: ``nn.Sequential``, a
      :class:`dgnopt_jax.models.Chain` / ``Residual`` / ``Branches``, a custom
      ``@nn.compact`` or setup-style module), or an ``nnx.Module``.
    example_input: a batch (or ``jax.ShapeDtypeStruct``) of the model's input;
      its per-sample shape becomes the game's ``input_shape``.
    loss: terminal loss name, :class:`TerminalLoss` or per-sample callable.
    weight_decay: stage-cost coefficient ``weight_decay/2 |theta|^2`` of every player.
    train: the mode: passed to the model as ``train=`` when it is a
      :mod:`dgnopt_jax.models` container or its ``__call__`` has a ``train``
      parameter; in train mode BatchNorm layers normalise with the batch's
      statistics, in eval mode with the running averages of ``variables``.
    alignment: where a residual block's shortcut players play, ``"merge"``
      (beside the body's last layer) or ``"split"`` (beside its first), as
      :class:`games.ResidualBlock`.
    variables: the model's variables; needed only in eval mode when the
      model has collections besides ``"params"`` (BatchNorm's running
      averages are then constants of the game).

  Returns:
    A :class:`games.Game` whose params are the pytree ``model.init(key, x)``
    makes (``game.init(key)`` calls it, cast to the example's float dtype),
    with one player per parametric module at ``("params",) + module path``;
    ``game.apply(params, x)`` equals ``model.apply(params, x)`` (train mode:
    the output of ``model.apply(params, x, mutable=["batch_stats"])``).

  Raises:
    ValueError: a program the tracer refuses (an operation across the
      batch, tied weights, ...), naming the module path and the primitive.
    UnsupportedModuleError: eval mode with running averages and no ``variables``.
    ValueError: an unknown alignment.
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
  # The program is traced on params of the input's float dtype.
  like_input = jax.tree.map(
      lambda s: jax.ShapeDtypeStruct(s.shape, x.dtype)
      if jnp.issubdtype(s.dtype, jnp.floating) else s, shapes)
  others = [c for c in like_input if c != "params"]
  if train:
    def apply_fn(params: Params, inputs: Any) -> Any:
      if others:  # Flax's mutated collections: update_batch_stats
        return model.apply(params, inputs, mutable=others, **kwargs)
      return model.apply(params, inputs, **kwargs)
  else:
    if others and variables is None:
      raise UnsupportedModuleError(
          f"from_flax: in eval mode the collections {others} of {type(model).__name__} "
          "(BatchNorm's running averages) are constants of the game: pass "
          "variables=model.init(...) (or the trained variables)")
    constants = {c: variables[c] for c in others}

    def apply_fn(params: Params, inputs: Any) -> Any:
      return model.apply({**params, **constants}, inputs, **kwargs)

  game = traced_games.from_function(apply_fn, like_input, jnp.zeros(x.shape, x.dtype), loss,
                                    weight_decay=weight_decay, alignment=alignment)
  input_shape, dtype = tuple(x.shape[1:]), x.dtype

  def init_fn(key: Array) -> Params:  # in the dtypes the program was traced on
    initial = model.init(key, jnp.zeros((1,) + input_shape, dtype), **kwargs)
    return jax.tree.map(lambda v, like: v.astype(like.dtype), initial, like_input)

  return dataclasses.replace(game, init_fn=jax.jit(init_fn), input_shape=input_shape)
