"""Optimizers by name: ``[<solver>-]<curvature>[/<period>][@<lr>]``.

One name stands for one optimizer, so that a list of them (a command line, an
experiment's table, a benchmark's columns) needs no code per entry. The
grammar is in :func:`optimizer_from_name`.
"""

from __future__ import annotations

import inspect
import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from dgnopt_jax._src import games as games_lib
from dgnopt_jax._src import kronecker
from dgnopt_jax._src import transform

OPTAX_OPTIMIZERS = ("sgd", "rmsprop", "adam")
SOLVERS = ("olne", "fne", "gr")
CURVATURES = ("identity", "sgd", "rmsprop", "adam", "kfac", "ekfac", "dense")
# The learning rate of a name without ``@lr`` when none is passed, by curvature
# (``sgd``: optax's own).
DEFAULT_LEARNING_RATES = {"identity": 0.1, "sgd": 0.1, "rmsprop": 1e-3, "adam": 1e-3,
                          "kfac": 0.03, "ekfac": 0.03, "dense": 0.3}
_SOLVER_FUNCTIONS = {"olne": transform.olne, "fne": transform.fne, "gr": transform.gr}
_STATISTICS_PERIOD_CURVATURES = {"kfac": kronecker.kfac, "ekfac": kronecker.ekfac}


class OptimizerName(NamedTuple):
  """A parsed optimizer name (the grammar is in :func:`optimizer_from_name`).

  Attributes:
    name: the name as given, without surrounding white space.
    solver: ``"olne"``, ``"fne"``, ``"gr"``, or None for optax's own.
    curvature: the curvature's name (``identity`` for ``sgd`` under a
      solver), or optax's optimizer name.
    learning_rate: from ``@lr``, or None.
    statistics_every: from ``/N``, or None.
  """

  name: str
  solver: str | None
  curvature: str
  learning_rate: float | None
  statistics_every: int | None


def parse_optimizer_name(name: str) -> OptimizerName:
  """Parses an optimizer name (the grammar is in :func:`optimizer_from_name`).

  Raises:
    ValueError: saying what is wrong with the name and which names are known.
  """
  text = name.strip()
  known = (f"optax's {', '.join(OPTAX_OPTIMIZERS)}, or <solver>-<curvature> with solver in "
           f"{', '.join(SOLVERS)} and curvature in {', '.join(CURVATURES)} "
           "(syntax: name[/N][@lr])")
  if not text:
    raise ValueError(f"an empty optimizer name; use {known}")
  lr = None
  if "@" in text:
    text, given = text.split("@", 1)
    try:
      lr = float(given)
    except ValueError:
      raise ValueError(f"{name!r}: the learning rate after '@' must be a number, "
                       f"got {given!r}") from None
    if not (math.isfinite(lr) and lr > 0):
      raise ValueError(f"{name!r}: the learning rate must be finite and > 0, got {given!r}")
  period = None
  if "/" in text:
    text, given = text.split("/", 1)
    if not given.isdigit() or int(given) < 1:
      raise ValueError(f"{name!r}: the statistics period after '/' must be an integer >= 1, "
                       f"got {given!r}")
    period = int(given)
  if "-" in text:
    solver, curvature = text.split("-", 1)
    if solver not in SOLVERS:
      raise ValueError(f"unknown optimizer {name!r}: unknown solver {solver!r}; use {known}")
    if curvature not in CURVATURES:
      raise ValueError(f"unknown optimizer {name!r}: unknown curvature {curvature!r}; "
                       f"use {known}")
    curvature = "identity" if curvature == "sgd" else curvature
  else:
    solver, curvature = None, text
    if curvature not in OPTAX_OPTIMIZERS:
      raise ValueError(f"unknown optimizer {name!r}; use {known}")
  if period is not None and curvature not in _STATISTICS_PERIOD_CURVATURES:
    raise ValueError(f"{name!r}: a statistics period (/{period}) needs the kfac or ekfac "
                     "curvature")
  return OptimizerName(name.strip(), solver, curvature, lr, period)


class NamedOptimizer(NamedTuple):
  """An optimizer built from its name by :func:`optimizer_from_name`.

  Attributes:
    spec: the parsed name.
    tx: the transformation: for a solver, ``update(None, state, params,
      batch=(x, y))``; for optax's own, ``update(grads, state, params)``.
    learning_rate: the learning rate it was built with.
    step: ``(params, state, x, y) -> (params, state, batch loss)``, one
      training step on the batch ``(x, y)`` (pure; jit it). The loss is the
      batch-mean terminal loss at ``params``, before the step.
  """

  spec: OptimizerName
  tx: optax.GradientTransformationExtraArgs
  learning_rate: float
  step: Callable[[Any, Any, Any, Any], tuple[Any, Any, jax.Array]]


def optimizer_from_name(name: str, game: games_lib.Game, learning_rate: float | None = None,
                        **solver_options: Any) -> NamedOptimizer:
  """Builds the optimizer ``name`` names for ``game``.

  The names::

    name       := optax_name ["@" lr] | solver "-" curvature ["/" period] ["@" lr]
    optax_name := "sgd" | "rmsprop" | "adam"
    solver     := "olne" | "fne" | "gr"
    curvature  := "identity" | "sgd" | "rmsprop" | "adam" | "kfac" | "ekfac" | "dense"
    period     := an integer >= 1, with kfac or ekfac only
    lr         := a finite number > 0

  * ``sgd``, ``rmsprop``, ``adam``: optax's own optimizers,
    ``optax.<name>(lr)``, on ``jax.grad`` of the game's batch-mean terminal
    loss;
  * ``olne-<c>``, ``fne-<c>``, ``gr-<c>``: :func:`dgnopt_jax.olne`,
    :func:`dgnopt_jax.fne`, :func:`dgnopt_jax.gr` with curvature ``<c>``
    (``sgd`` is an alias of ``identity``: ``fne-sgd`` is DDP-SGD;
    ``olne-kfac`` is KFAC with the empirical Fisher);
  * ``/N``: a Kronecker curvature that folds the batch's statistics into its
    running averages every N steps (``curvature.kfac(statistics_every=N)``);
  * ``@lr``: the learning rate, which takes precedence over
    ``learning_rate``; without either, the curvature's entry of
    :data:`DEFAULT_LEARNING_RATES`.

  Examples: ``sgd``, ``adam@1e-4``, ``fne-sgd@0.05``, ``gr-ekfac``,
  ``fne-kfac/5@0.03``.

  Args:
    name: ``[<solver>-]<curvature>[/<period>][@<lr>]``, as above.
    game: the network as a :class:`dgnopt_jax.games.Game`.
    learning_rate: for a name without ``@lr``; None: the curvature's entry
      of :data:`DEFAULT_LEARNING_RATES`.
    **solver_options: keyword arguments of :func:`dgnopt_jax.fne`,
      :func:`dgnopt_jax.gr` or :func:`dgnopt_jax.olne` (``damping``,
      ``vxx_reg``, ``vxx_rank``, ``trust_region``, ...). Every name of a list
      can share one set: each solver takes those of its own arguments
      (``olne``, which has no rollout, not ``trust_region`` or
      ``coupling_iterations``; only ``gr`` takes ``feedback`` and
      ``cross_terms``), and optax's own optimizers take none.

  Returns:
    A :class:`NamedOptimizer`: the transformation, its learning rate and a
    training step. ``"fne-kfac/5@0.03"`` is
    ``fne(game, 0.03, curvature.kfac(statistics_every=5), **solver_options)``;
    ``"adam"`` is ``optax.adam(1e-3)`` on the gradient of the batch loss.

  Raises:
    ValueError: a malformed or unknown name (:func:`parse_optimizer_name`).
    TypeError: an option that none of the solvers takes.
  """
  spec = parse_optimizer_name(name)
  taken = set().union(*(inspect.signature(f).parameters for f in _SOLVER_FUNCTIONS.values()))
  unknown = sorted(set(solver_options) - taken)
  if unknown:
    raise TypeError(f"{name!r}: unknown solver options {unknown}; the solvers take "
                    f"{sorted(taken - {'game', 'learning_rate', 'curvature'})}")
  if spec.learning_rate is not None:
    learning_rate = spec.learning_rate
  elif learning_rate is None:
    learning_rate = DEFAULT_LEARNING_RATES[spec.curvature]
  if spec.solver is None:
    tx = getattr(optax, spec.curvature)(learning_rate)
    return NamedOptimizer(spec, tx, learning_rate, _gradient_step(tx, game))
  curvature = spec.curvature
  if spec.statistics_every is not None:
    curvature = _STATISTICS_PERIOD_CURVATURES[curvature](
        statistics_every=spec.statistics_every)
  make = _SOLVER_FUNCTIONS[spec.solver]
  accepted = inspect.signature(make).parameters
  options = {k: v for k, v in solver_options.items() if k in accepted}
  tx = make(game, learning_rate, curvature, **options)

  def step(params, state, x, y):
    updates, state = tx.update(None, state, params, batch=(x, y))
    return optax.apply_updates(params, updates), state, state.loss

  return NamedOptimizer(spec, tx, learning_rate, step)


def _gradient_step(tx: optax.GradientTransformation, game: games_lib.Game) -> Callable:
  """The step of an optax optimizer on ``jax.grad`` of the game's batch-mean terminal loss."""

  def step(params, state, x, y):
    def batch_loss(p):
      return jnp.mean(jax.vmap(game.loss.per_sample)(game.apply(p, x), y))

    loss, grads = jax.value_and_grad(batch_loss)(params)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state, loss

  return step
