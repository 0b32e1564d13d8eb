"""Guards around the optimizer: clear errors for bad input, and for a run that has stalled.

What a step cannot use is refused before any work, with an error that names
the argument (docs/SAFEGUARDS.md, "Numerical safeguards"):

* hyper-parameters (:func:`check_hyper`): a real scalar or a schedule; a
  schedule is traced once (it must be traceable) and read at count 0;
* the optimizer state (:func:`check_state`): the structure, shapes and
  dtypes ``tx.init(params)`` gives, so that a state of another game,
  curvature or precision is named instead of failing inside the solver;
* the batch (:func:`check_batch_leaves`): arrays, not Python numbers;
* the players' dtypes (:func:`common_player_dtype`): the feedback solvers
  carry one value function through every stage, so every player's params
  share one floating dtype; integer inputs are cast to it
  (:func:`float_inputs`), as the open-loop step's ``x @ kernel`` promotes
  them;
* a network that branches in Python on array values
  (:func:`python_branching`): named, with the remedy;
* params that are not finite when the state is made
  (:func:`check_finite_params`).

A step that cannot be applied because its values are not finite is skipped
(the loss, the updates, the new params, the learning rate and damping this
step uses, and the new curvature statistics); a skipped step does not
advance ``state.count``, so a schedule that is not finite at that count, or
params that are not finite, skip every later step too. Such a run cannot
recover by itself: :func:`raise_if_stalled` raises once
``max_consecutive_skips`` steps in a row were skipped.

A step the trust region rejects is not a skip: it is finite, and it shrinks
the step scale. At the scale's floor a rejected step means that a step of
``2^-20`` of the learning rate along a descent direction did not lower the
batch objective beyond round-off: the batch's gradient is at round-off, which
is where a converged run ends (the Rosenbrock game under fne-adam reaches a
loss of 2e-23 with every later step rejected at the floor). That is not
counted as a stall.
"""

from __future__ import annotations

import contextlib
import numbers
from typing import Any, Iterator

import jax
import jax.numpy as jnp
import numpy as np

from dgnopt_jax._src import games as games_lib

# Consecutive skipped steps after which a run counts as stalled.
MAX_CONSECUTIVE_SKIPS = 50


# ----------------------------------------------------------------------------
# Trees: the first place where two pytrees differ.
# ----------------------------------------------------------------------------


def describe(leaf: Any) -> str:
  """``float32[5,3]`` for an array or a shape-dtype struct, ``Python int``, ``str`` otherwise."""
  if hasattr(leaf, "shape") and hasattr(leaf, "dtype"):
    return f"{np.dtype(leaf.dtype).name}[{','.join(str(d) for d in np.shape(leaf))}]"
  if leaf is None:
    return "None"
  if isinstance(leaf, (str, bytes)):
    return f"{type(leaf).__name__} {leaf[:40]!r}"
  return f"Python {type(leaf).__name__}"


def _is_namedtuple(x: Any) -> bool:
  return isinstance(x, tuple) and hasattr(x, "_fields")


def _leaf_mismatch(want: Any, got: Any) -> bool:
  want_array = hasattr(want, "shape") and hasattr(want, "dtype")
  got_array = hasattr(got, "shape") and hasattr(got, "dtype")
  if want_array or got_array:
    return not (want_array and got_array and tuple(np.shape(want)) == tuple(np.shape(got))
                and np.dtype(want.dtype) == np.dtype(got.dtype))
  return type(want) is not type(got)


def first_mismatch(want: Any, got: Any, path: str = "",
                   names: tuple[str, str] = ("the expected tree", "the tree")) -> str | None:
  """Where ``got`` first differs from ``want`` in structure, shape or dtype; None if nowhere.

  Containers (dicts, lists, tuples, NamedTuples) must have the same type,
  keys or fields and lengths; array leaves the same shape and dtype; other
  leaves (Python numbers, strings, None) the same type.

  Args:
    want: the expected pytree (arrays or ``jax.ShapeDtypeStruct`` leaves).
    got: the pytree to check.
    path: the name of the root, prefixed to the reported path.
    names: how the report names ``want`` and ``got``.

  Returns:
    ``"at <path>: <want> has <what>, <got> has <what>"`` (or lacks keys, or
    has extra keys) for the first difference in depth-first order, or None.
  """
  w_is, g_is = (f"{n} has" for n in names)
  where = path or "the root"
  if isinstance(want, dict):
    if not isinstance(got, dict):
      return f"at {where}: {w_is} a dict, {g_is} {type(got).__name__}"
    missing = [k for k in want if k not in got]
    extra = [k for k in got if k not in want]
    if missing or extra:
      parts = []
      if missing:
        parts.append(f"{names[1]} lacks keys {sorted(map(str, missing))}")
      if extra:
        parts.append(f"{names[1]} has keys {sorted(map(str, extra))} that {names[0]} lacks")
      return f"at {where}: {'; '.join(parts)}"
    for k in want:
      found = first_mismatch(want[k], got[k], f"{path}[{k!r}]", names)
      if found:
        return found
    return None
  if _is_namedtuple(want):
    if type(got) is not type(want):
      return f"at {where}: {w_is} {type(want).__name__}, {g_is} {type(got).__name__}"
    for field in want._fields:
      found = first_mismatch(getattr(want, field), getattr(got, field), f"{path}.{field}",
                             names)
      if found:
        return found
    return None
  if isinstance(want, (list, tuple)):
    if not isinstance(got, (list, tuple)) or _is_namedtuple(got):
      return f"at {where}: {w_is} a {type(want).__name__}, {g_is} {type(got).__name__}"
    if len(want) != len(got):
      return f"at {where}: {w_is} {len(want)} entries, {g_is} {len(got)}"
    for i, (w, g) in enumerate(zip(want, got)):
      found = first_mismatch(w, g, f"{path}[{i}]", names)
      if found:
        return found
    return None
  leaves, treedef = jax.tree.flatten(want)
  if treedef.num_nodes > 1 or not (len(leaves) == 1 and leaves[0] is want):
    # Another registered pytree node: compare its flattened structure.
    got_leaves, got_def = jax.tree.flatten(got)
    if got_def != treedef:
      return f"at {where}: {w_is} the structure {treedef}, {g_is} {got_def}"
    for i, (w, g) in enumerate(zip(leaves, got_leaves)):
      if _leaf_mismatch(w, g):
        return f"at {where} (leaf {i}): {w_is} {describe(w)}, {g_is} {describe(g)}"
    return None
  if _leaf_mismatch(want, got):
    return f"at {where}: {w_is} {describe(want)}, {g_is} {describe(got)}"
  return None


def check_state(state: Any, expected: Any) -> None:
  """Raises a ``ValueError`` naming the first leaf where ``state`` differs from ``expected``.

  Args:
    state: the optimizer state passed to ``update``.
    expected: ``jax.eval_shape(tx.init, params)``.
  """
  found = first_mismatch(expected, state, "state", ("tx.init(params)", "the state given"))
  if found:
    raise ValueError(
        f"the optimizer state does not fit this transformation and these params, {found}; "
        "make it with tx.init(params) for the same game, curvature and params dtypes "
        "(or restore a checkpoint of such a state)")


# ----------------------------------------------------------------------------
# Hyper-parameters.
# ----------------------------------------------------------------------------


def _concrete_float(value: Any) -> float | None:
  try:
    return float(value)
  except (TypeError, jax.errors.ConcretizationTypeError):  # a tracer under jit
    return None


def check_hyper(name: str, value: Any, *, allow_zero: bool, reason: str = "") -> None:
  """Checks a hyper-parameter that may be a float or a schedule ``count -> value``.

  A number must be a real scalar (not a string, a bool or an array with
  several entries), finite and ``> 0`` (``>= 0`` with ``allow_zero``). A
  schedule is traced with an abstract count (it runs inside the compiled
  step, so it must be traceable and return a scalar) and its value at
  count 0 must be finite and ``>= 0`` (``> 0`` where ``allow_zero`` is
  False and ``reason`` is given: damping a Kronecker curvature needs).

  Args:
    name: the argument's name, for the error.
    value: the float or the schedule.
    allow_zero: whether 0 is allowed for a number.
    reason: why 0 is not allowed, appended to the error; with it a
      schedule's value at count 0 must be ``> 0`` as well.

  Raises:
    TypeError: not a number or a callable; a schedule that is not traceable.
    ValueError: out of range, not finite, or not a scalar.
  """
  bound = ">= 0" if allow_zero else "> 0"
  suffix = f" ({reason})" if reason else ""
  if callable(value):
    count = jnp.zeros([], jnp.int32)
    try:
      shape = jax.eval_shape(value, count)
    except jax.errors.ConcretizationTypeError as e:
      raise TypeError(
          f"{name} schedule must be traceable: it runs inside the compiled step, where the "
          "count is an abstract array; use jnp.where / optax schedules instead of Python "
          f"branches on the count ({type(e).__name__})") from e
    if not (hasattr(shape, "shape") and shape.shape == () and
            jnp.issubdtype(shape.dtype, jnp.number)):
      raise ValueError(f"{name} schedule must return a real scalar, got {describe(shape)}")
    at_zero = _concrete_float(value(count))
    low_ok = at_zero is not None and (at_zero > 0 or (at_zero == 0 and not reason))
    if at_zero is not None and (not np.isfinite(at_zero) or not low_ok):
      want = "> 0" if reason else ">= 0"
      raise ValueError(f"{name} schedule must give a finite value {want} at count 0, got "
                       f"{at_zero!r}{suffix}")
    return
  if isinstance(value, (str, bytes, bool)) or not (
      isinstance(value, numbers.Real) or hasattr(value, "dtype")):
    raise TypeError(f"{name} must be a float or a schedule (a function of the step count), "
                    f"got {describe(value)}")
  if hasattr(value, "dtype"):
    if np.shape(value) != ():
      raise ValueError(f"{name} must be a scalar, got {describe(value)}")
    if not jnp.issubdtype(value.dtype, jnp.integer) and not jnp.issubdtype(value.dtype,
                                                                          jnp.floating):
      raise TypeError(f"{name} must be a real number, got {describe(value)}")
  v = _concrete_float(value)
  if v is None:
    return
  if not np.isfinite(v):
    raise ValueError(f"{name} must be finite, got {value!r}")
  if not (v > 0 or (allow_zero and v == 0)):
    raise ValueError(f"{name} must be {bound}, got {value!r}{suffix}")


def check_coefficient(owner: str, name: str, value: Any, low: float,
                      high: float = float("inf")) -> None:
  """Raises a ``ValueError`` unless ``value`` is a real number in ``[low, high)`` (finite).

  Args:
    owner: what the coefficient belongs to (``"rmsprop"``), for the error.
    name: the coefficient's name.
    value: its value.
    low: the smallest value allowed.
    high: the bound it must stay below (``inf``: any finite value).
  """
  v = None if isinstance(value, (str, bytes, bool)) else _concrete_float(value)
  if v is None or not np.isfinite(v) or not low <= v < high:
    span = f">= {low:g}" if high == float("inf") else f"in [{low:g}, {high:g})"
    raise ValueError(f"{owner}: {name} must be a finite number {span}, got {value!r}")


def check_limit(name: str, value: Any, default: int) -> int | None:
  """The limit as an int: ``default`` for None, None (no limit) for ``math.inf``.

  None rather than a number is the default so that ``optax.inject_hyperparams``,
  which turns every number into a state array, leaves the limit static.
  """
  if value is None:
    return default
  if value == float("inf") and not isinstance(value, bool):
    return None
  if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
    raise ValueError(f"{name} must be a positive integer, None (the default, {default}) or "
                     f"math.inf (no limit), got {value!r}")
  return int(value)


# ----------------------------------------------------------------------------
# The batch and the params.
# ----------------------------------------------------------------------------


def check_batch_leaves(inputs: Any, targets: Any) -> None:
  """Raises a ``TypeError`` for inputs or targets given as Python numbers or nested lists."""
  for what, tree in (("inputs", inputs), ("targets", targets)):
    leaves = jax.tree.leaves(tree)
    bad = [l for l in leaves if not hasattr(l, "shape")]
    if bad:
      given = type(tree).__name__
      raise TypeError(
          f"batch {what} must be arrays with the batch as leading axis; got a {given} "
          f"holding {describe(bad[0])} values: convert it with jnp.asarray or np.asarray")


def common_player_dtype(game: games_lib.Game, params: Any) -> Any:
  """The one floating dtype of every player's params; raises a ``ValueError`` if they mix dtypes.

  The feedback solvers (and the dense curvature) propagate one value
  function through all stages and differentiate each stage with respect to
  its input state, whose dtype is set by the previous stage's params.
  """
  owners: dict[Any, list[str]] = {}
  for player in game.players:
    for leaf in jax.tree.leaves(games_lib.get_path(params, player.path)):
      owners.setdefault(np.dtype(jnp.result_type(leaf)), [])
      if player.name not in owners[np.dtype(jnp.result_type(leaf))]:
        owners[np.dtype(jnp.result_type(leaf))].append(player.name)
  if len(owners) > 1:
    listed = "; ".join(f"{d.name}: {', '.join(repr(n) for n in names[:4])}"
                       f"{' …' if len(names) > 4 else ''}" for d, names in owners.items())
    raise ValueError(
        "fne/gr need every player's params in one floating dtype (the value function "
        f"is carried through all stages); got {listed}. Cast the params, e.g. "
        "jax.tree.map(lambda p: p.astype(jnp.float32), params)")
  return next(iter(owners)) if owners else np.dtype(jnp.float32)


def float_inputs(inputs: Any, dtype: Any) -> Any:
  """Integer and boolean input leaves cast to ``dtype`` (floating leaves unchanged)."""
  def cast(leaf):
    if jnp.issubdtype(jnp.result_type(leaf), jnp.floating):
      return leaf
    return jnp.asarray(leaf).astype(dtype)
  return jax.tree.map(cast, inputs)


def check_finite_params(game: games_lib.Game, params: Any) -> None:
  """Raises a ``ValueError`` naming the first player whose (concrete) params are not finite."""
  for player in game.players:
    leaves = jax.tree.leaves(games_lib.get_path(params, player.path))
    if any(isinstance(l, (jax.core.Tracer, jax.ShapeDtypeStruct)) for l in leaves):
      return  # abstract params (jit, eval_shape): checked where the run stalls
    for leaf in leaves:
      if not bool(jnp.all(jnp.isfinite(leaf))):
        raise ValueError(
            f"params of player {player.name!r} are not finite (NaN or inf): every step "
            "would be skipped; initialise them again or restore a finite checkpoint")


@contextlib.contextmanager
def python_branching(what: str) -> Iterator[None]:
  """Turns JAX's error for a Python branch on a traced value into one that names ``what``."""
  try:
    yield
  except (jax.errors.ConcretizationTypeError, jax.errors.TracerArrayConversionError) as e:
    raise TypeError(
        f"{what} uses an array's value in Python control flow (if/while, bool(), int() or "
        "np.asarray on an array that depends on the inputs or params); the optimizer "
        "traces the network with abstract values, so that value is unknown. Use "
        "jnp.where or jax.lax.cond for value-dependent branches, or make the condition a "
        f"static attribute (JAX: {type(e).__name__})") from e


def trace_apply(game: games_lib.Game, params: Any, inputs: Any) -> Any:
  """``jax.eval_shape(game.apply, params, inputs)``; a stage branching on values is named."""
  try:
    return jax.eval_shape(game.apply, params, inputs)
  except (jax.errors.ConcretizationTypeError, jax.errors.TracerArrayConversionError):
    pass
  x = jax.tree.map(lambda a: jax.ShapeDtypeStruct(jnp.shape(a), jnp.result_type(a)), inputs)
  for t, stage in enumerate(game.stages):
    thetas = tuple(games_lib.get_path(params, p.path) for p in stage.players)
    with python_branching(f"stage {t} ({stage.name or 'unnamed'})"):
      x = jax.eval_shape(stage.fn, x, thetas)
  with python_branching("the game's forward pass"):
    return jax.eval_shape(game.apply, params, inputs)


# ----------------------------------------------------------------------------
# Stalled runs.
# ----------------------------------------------------------------------------


def _stalled(skips, loss, learning_rate, damping, finite_players, *, limit: int,
             names: tuple[str, ...]) -> np.ndarray:
  bad = [n for n, ok in zip(names, np.asarray(finite_players)) if not ok]
  params = (f"params not finite in players {bad}" if bad else "params finite")
  raise FloatingPointError(
      f"DGNOpt run stalled: the last {int(skips)} steps were all skipped as not finite "
      f"(max_consecutive_skips={limit}); a skipped step changes nothing, so the run cannot "
      f"recover by itself. Last step: batch loss {float(loss)!r}, learning rate (times the "
      f"trust region's step scale) {float(learning_rate)!r}, damping {float(damping)!r}, "
      f"{params}. Look for NaN or inf in the params (restore a finite checkpoint), a schedule "
      "that is not finite, non-finite inputs or out-of-range labels in every batch, or "
      "curvature statistics that overflow (a larger damping or eps); "
      "max_consecutive_skips=math.inf turns this check off")


def raise_if_stalled(skips: jax.Array, limit: int | None, loss: jax.Array,
                     learning_rate: jax.Array, damping: jax.Array, game: games_lib.Game,
                     params: Any) -> jax.Array:
  """``skips``, after raising (from the compiled step) where ``skips >= limit``.

  The check is a ``lax.cond`` whose taken branch, only once the run has
  stalled, works out which players' params are not finite and calls back
  to the host, which raises: JAX surfaces the error as a runtime error when
  the step's results are read. The callback is a ``pure_callback`` whose
  result is the returned count, so the compiled step keeps JAX's fast
  dispatch (a ``jax.debug.callback``, an effect, would put every step on
  the slower Python dispatch path).

  Args:
    skips: the consecutive skipped steps after this one.
    limit: ``max_consecutive_skips``; None returns ``skips`` unchecked.
    loss, learning_rate, damping: this step's values, for the report.
    game, params: the players and their params, for the report.

  Returns:
    ``skips`` (use it, so that the check stays in the program).
  """
  if limit is None:
    return skips
  names = tuple(p.name for p in game.players)

  def report(skips):
    finite = jnp.stack([
        jnp.all(jnp.stack([jnp.all(jnp.isfinite(l)) for l in
                           jax.tree.leaves(games_lib.get_path(params, p.path))] or
                          [jnp.asarray(True)]))
        for p in game.players]) if names else jnp.ones([0], bool)
    return jax.pure_callback(
        lambda *a: _stalled(*a, limit=limit, names=names),
        jax.ShapeDtypeStruct(skips.shape, skips.dtype), skips, loss, learning_rate, damping,
        finite, vmap_method="sequential")  # a vmapped step (runs side by side) checks each

  return jax.lax.cond(skips >= limit, report, lambda skips: skips, skips)
