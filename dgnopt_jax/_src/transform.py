"""The optax surface: ``fne``, ``gr`` and ``olne`` as ``optax.GradientTransformationExtraArgs``.

``update(updates, state, params, *, batch)`` computes the step from ``params``
and ``batch`` (the game): ``updates`` must be ``None`` (or hold no arrays: the
empty ``nnx.State`` that ``flax.nnx.Optimizer.update(model, None, batch=...)``
passes on). Gradients passed in
would be ignored, and a transformation placed before the step in a chain
would act on nothing the step reads, so both are refused with an error that
says what to do (:mod:`composition`); transformations placed after it act on
the step. How each optax wrapper composes is in docs/OPTAX.md.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Sequence, Union

import jax
import jax.numpy as jnp
import optax

from dgnopt_jax._src import composition
from dgnopt_jax._src import curvature as curvature_lib
from dgnopt_jax._src import games as games_lib
from dgnopt_jax._src import guards
from dgnopt_jax._src import linearise as lin
from dgnopt_jax._src import losses as losses_lib
from dgnopt_jax._src import sharding as sharding_lib
from dgnopt_jax._src import solver
from dgnopt_jax._src import trust_region as trust_region_lib

ScalarOrSchedule = Union[float, jax.Array, Callable[[jax.Array], jax.Array]]


class DGNOptState(NamedTuple):
  """Optimizer state.

  Attributes:
    count: steps applied so far (skipped and rejected steps not counted);
      drives schedules.
    curvature: ``{player name: curvature statistics}``.
    skipped: steps skipped because the loss, the update, the updated params,
      the learning rate, the damping or the new curvature statistics were not
      finite (``nonfinite="skip"``).
    loss: the batch-mean terminal loss of the last step (NaN before the first).
    rejected: feedback steps not applied because the rollout raised the
      batch objective (:mod:`trust_region`; always 0 with
      ``trust_region=False`` and for open-loop steps).
    step_scale: ``alpha``, the trust region's factor on the learning rate of
      the next step (1 with ``trust_region=False`` and for open-loop steps).
    consecutive_skips: steps skipped in a row up to the last one (0 after a
      step that was not skipped); ``max_consecutive_skips`` of them raise.
  """

  count: jax.Array
  curvature: dict
  skipped: jax.Array
  loss: jax.Array
  rejected: jax.Array
  step_scale: jax.Array
  consecutive_skips: jax.Array


def _value(x: ScalarOrSchedule, count: jax.Array) -> jax.Array:
  return x(count) if callable(x) else jnp.asarray(x)


def _unpack_batch(batch: Any) -> tuple[Any, jax.Array]:
  if batch is None:
    raise TypeError(
        "the DGNOpt update needs the batch: call tx.update(updates, state, params, "
        "batch=(inputs, targets))")
  if isinstance(batch, dict) and {"inputs", "targets"} <= set(batch):
    return batch["inputs"], batch["targets"]
  if isinstance(batch, (tuple, list)) and len(batch) == 2:
    return batch[0], batch[1]
  raise TypeError(
      "batch must be a pair (inputs, targets) or a dict with keys 'inputs' and "
      f"'targets'; got {type(batch).__name__}")


def validate(game: games_lib.Game, params: Any, inputs: Any, targets: jax.Array,
             curvature: Any) -> None:
  """Checks params, batch and curvature against the game; raises ValueError naming the problem."""
  if params is None:
    raise TypeError("the DGNOpt update needs params: tx.update(updates, state, params, batch=...)")
  expected = None
  if game.init_fn is not None:
    expected = jax.eval_shape(game.init_fn, jax.random.PRNGKey(0))
  for player in game.players:
    theta = games_lib.get_path(params, player.path)
    if expected is not None:
      want = games_lib.get_path(expected, player.path)
      got_leaves, got_def = jax.tree.flatten(theta)
      want_leaves, want_def = jax.tree.flatten(want)
      if got_def != want_def:
        raise ValueError(
            f"params do not match the game: player {player.name!r} expects a subtree "
            f"{want_def}, got {got_def}")
      for g, w in zip(got_leaves, want_leaves):
        if jnp.shape(g) != w.shape:
          raise ValueError(
              f"params do not match the game: player {player.name!r} expects shapes "
              f"{[x.shape for x in want_leaves]}, got {[jnp.shape(x) for x in got_leaves]}")
    for leaf in jax.tree.leaves(theta):
      if not jnp.issubdtype(jnp.result_type(leaf), jnp.floating):
        raise ValueError(f"player {player.name!r} has non-float params ({jnp.result_type(leaf)})")
    curvature.check(player, theta)
  guards.check_batch_leaves(inputs, targets)
  leaves = jax.tree.leaves(inputs)
  if not leaves:
    raise ValueError("batch inputs are empty")
  sizes = {jnp.shape(l)[0] if jnp.ndim(l) else None for l in leaves}
  if len(sizes) != 1 or None in sizes:
    raise ValueError(f"every input leaf needs the same leading batch axis; got sizes {sizes}")
  size = sizes.pop()
  if size == 0:
    raise ValueError("the batch is empty (batch size 0)")
  if jnp.ndim(targets) == 0 or jnp.shape(targets)[0] != size:
    raise ValueError(
        f"batch inputs have {size} samples but targets have shape {jnp.shape(targets)}")
  if game.input_shape is not None and len(leaves) == 1:
    got = tuple(jnp.shape(leaves[0])[1:])
    if got != tuple(game.input_shape):
      raise ValueError(
          f"batch inputs have per-sample shape {got}; the game expects {game.input_shape}")
  outputs = guards.trace_apply(game, params, inputs)
  if not isinstance(outputs, jax.ShapeDtypeStruct):
    raise ValueError("the last stage must output a single array for the terminal loss")
  if game.loss.check_target is not None:
    game.loss.check_target(outputs, jax.ShapeDtypeStruct(jnp.shape(targets),
                                                         jnp.result_type(targets)))
  # Label values can only be read outside jit; inside, a label out of range
  # makes the loss NaN and the non-finite policy applies.
  if (game.loss.check_target_values is not None and jnp.size(targets)
      and not isinstance(targets, jax.core.Tracer)):
    game.loss.check_target_values(outputs, targets)


NONFINITE_POLICIES = ("skip", "raise")


def _raise_if_not_finite(finite: jax.Array, loss: jax.Array, learning_rate: jax.Array,
                         damping: jax.Array) -> None:
  if not bool(finite):
    raise FloatingPointError(
        f"DGNOpt step is not finite (batch loss {float(loss)!r}, learning rate "
        f"{float(learning_rate)!r}, damping {float(damping)!r}, or a gain, an update, the "
        "updated params or the curvature statistics); nonfinite='skip' skips such steps "
        "instead")


def _is_traced(value: Any) -> bool:
  return isinstance(value, jax.core.Tracer)


def _static_count(name: str, value: Any, default: int) -> Any:
  """An iteration count: ``default`` for None, an int where known, the traced array as it is.

  ``optax.inject_hyperparams`` hands every number to the transformation as an
  array, traced under ``jit``; a traced count runs as a loop whose trip count
  is that array, of at most ``linearise.TRACED_COUNT_CAPACITY`` steps (the
  Lanczos basis needs a static size), so an array above it is refused where
  it is concrete (``init`` under ``inject_hyperparams``).
  """
  if value is None:
    return default
  if _is_traced(value):
    return value
  if int(value) != value or int(value) < 1:
    raise ValueError(f"{name} must be >= 1 (an integer), got {value!r}")
  if isinstance(value, jax.Array) and int(value) > lin.TRACED_COUNT_CAPACITY:
    raise ValueError(
        f"{name} given as an array (injected) runs at most {lin.TRACED_COUNT_CAPACITY} "
        f"steps, got {int(value)}; pass it as a Python int, or in static_args of "
        "optax.inject_hyperparams")
  return int(value)


def _stage_cost(value: Any) -> float | None:
  """``weight_decay`` as a Python float (it defines the game's stage costs), or None."""
  if value is None:
    return None
  if _is_traced(value):
    raise TypeError(
        "weight_decay defines the game's stage costs, which the solver specialises on, "
        "and cannot be a traced value: under optax.inject_hyperparams pass "
        "static_args=('weight_decay',)")
  value = float(value)
  if not value >= 0:
    raise ValueError(f"weight_decay must be >= 0, got {value!r}")
  return value


def _placeholder_state(game: games_lib.Game, init: Callable, placeholder: Any) -> Any:
  """The state ``init`` makes, with the placeholder wherever it mirrors a player's params.

  ``optax.tree.map_params`` initialises on a placeholder for the params and
  maps the state's subtrees that ``init`` filled with it. A DGNOptState keeps
  per-player statistics (the moments of rmsprop and adam mirror one player's
  params); those subtrees are marked, the rest (counters, Kronecker factors)
  are left to ``transform_non_params``.
  """
  if game.init_fn is None:
    raise ValueError(
        "optax.tree.map_params initialises the state on a placeholder; a DGNOpt state "
        "takes its shapes from the game's init function, which this game lacks "
        "(build it with games.sequential, games.from_flax or Game(init_fn=...))")
  params = jax.eval_shape(game.init_fn, jax.random.PRNGKey(0))
  state = jax.eval_shape(init, params)
  shapes = lambda t: (jax.tree.structure(t), [jnp.shape(l) for l in jax.tree.leaves(t)])
  curvature = dict(state.curvature)
  for player in game.players:
    if player.name not in curvature:
      continue
    want = shapes(games_lib.get_path(params, player.path))
    mirrors = lambda node, want=want: bool(jax.tree.leaves(node)) and shapes(node) == want
    curvature[player.name] = jax.tree.map(lambda n: placeholder if mirrors(n) else n,
                                          curvature[player.name], is_leaf=mirrors)
  return state._replace(curvature=curvature)


def _make(name: str, game: games_lib.Game, learning_rate: ScalarOrSchedule, curvature: Any,
          damping: ScalarOrSchedule | None, vxx_reg: float | None, vxx_rank: str,
          feedback: bool, principle: str = "fne", cross_terms: bool = True,
          coupling_iterations: int | None = None, nonfinite: str = "skip",
          trust_region: bool = True, weight_decay: float | None = None,
          frozen: Sequence[Any] = (),
          max_consecutive_skips: float | None = None
          ) -> optax.GradientTransformationExtraArgs:
  if nonfinite not in NONFINITE_POLICIES:
    raise ValueError(f"nonfinite must be one of {NONFINITE_POLICIES}, got {nonfinite!r}")
  if not isinstance(game, games_lib.Game):
    raise TypeError(f"game must be a dgnopt_jax.games.Game, got {type(game).__name__}")
  curvature = curvature_lib.get_curvature(curvature)
  if damping is None:
    damping = curvature.default_damping
  if vxx_reg is None:
    vxx_reg = 0.0
  guards.check_hyper("learning_rate", learning_rate, allow_zero=False)
  # The Kronecker factors are low-rank running estimates: undamped, a solve
  # steps without bound along their smallest eigenvalues.
  needs_damping = curvature.needs_damping
  guards.check_hyper("damping", damping, allow_zero=not needs_damping,
                     reason=f"the {curvature.name} curvature's solve needs damping > 0"
                     if needs_damping else "")
  if callable(vxx_reg):
    raise TypeError("vxx_reg must be a float, not a schedule")
  guards.check_hyper("vxx_reg", vxx_reg, allow_zero=True)
  max_consecutive_skips = guards.check_limit("max_consecutive_skips", max_consecutive_skips,
                                             guards.MAX_CONSECUTIVE_SKIPS)
  if vxx_rank not in losses_lib.VALUE_RANKS:
    raise ValueError(f"vxx_rank must be one of {losses_lib.VALUE_RANKS}, got {vxx_rank!r}")
  coupling_iterations = _static_count("coupling_iterations", coupling_iterations, 8)
  weight_decay = _stage_cost(weight_decay)
  if weight_decay is not None:
    game = games_lib.with_weight_decay(game, weight_decay)
  if isinstance(frozen, str):
    frozen = [frozen]
  constants = games_lib.player_paths(game, frozen, "frozen")
  checked = bool(trust_region) and feedback  # open-loop steps have no rollout to check
  cfg = solver.SolverConfig(curvature, feedback, vxx_rank, principle, cross_terms,
                            coupling_iterations, checked)

  def init_fn(params):
    composition.check_enclosing_wrappers(name)
    if composition.is_params_placeholder(params):
      return _placeholder_state(game, init_fn, params)
    composition.check_not_masked(game, params, name)
    played = games_lib.with_constants(game, constants, params)
    for player in played.players:
      curvature.check(player, games_lib.get_path(params, player.path))
    guards.check_finite_params(game, params)
    cstate = solver.init_curvature_state(played, cfg, params)
    dtype = jnp.result_type(*jax.tree.leaves(params)) if jax.tree.leaves(params) else jnp.float32
    return DGNOptState(jnp.zeros([], jnp.int32), cstate, jnp.zeros([], jnp.int32),
                       jnp.full([], jnp.nan, dtype), jnp.zeros([], jnp.int32),
                       jnp.ones([], dtype), jnp.zeros([], jnp.int32))

  def update_fn(updates, state, params=None, *, batch=None, **extra_args):
    del extra_args
    # None, or a pytree without arrays: flax.nnx.Optimizer.update(model, None,
    # batch=...) hands tx.update the empty nnx.State it makes of None.
    if updates is not None and jax.tree.leaves(updates):
      raise TypeError(
          f"dgnopt_jax.{name} computes its step from params and batch (the game), not from "
          f"incoming updates: call tx.update(None, state, params, batch=...) (with "
          "flax.nnx.Optimizer: optimizer.update(model, None, batch=...)); got updates "
          f"of type {type(updates).__name__}, which would be ignored. Transformations meant "
          f"for the step go after it in optax.chain (optax.chain(dgnopt.{name}(...), "
          "optax.clip_by_global_norm(1.0))); weight decay is weight_decay= on the "
          f"transformation. See {composition.OPTAX_GUIDE}.")
    inputs, targets = _unpack_batch(batch)
    composition.check_not_masked(game, params, name)
    played = games_lib.with_constants(game, constants, params)
    guards.check_state(state, jax.eval_shape(init_fn, params))
    if cfg.feedback:  # the solver differentiates through x: one float dtype
      inputs = guards.float_inputs(inputs, guards.common_player_dtype(game, params))
    eta = _value(learning_rate, state.count)
    if checked:
      eta = state.step_scale * eta
    hyper = solver.Hyper(eta, _value(damping, state.count), vxx_reg)

    def solve(hyper, params, curvature_state, inputs, targets):
      validate(played, params, inputs, targets, curvature)
      return solver.solve_step(played, cfg, hyper, params, curvature_state, inputs, targets)

    def step_sharding(mesh):  # the updates as the params, the statistics as they were
      scalar = sharding_lib.sharding_type_of(jnp.zeros([]), mesh)
      return solver.StepResult(sharding_lib.sharding_type_of(params, mesh),
                               sharding_lib.sharding_type_of(state.curvature, mesh),
                               scalar, scalar, scalar, scalar if checked else None,
                               scalar if checked else None)

    result = sharding_lib.call_with_auto_axes(
        solve, (hyper, params, state.curvature, inputs, targets), step_sharding)
    updates = jax.tree.map(lambda u, p: u.astype(jnp.result_type(p)), result.updates, params)
    # Whether the loss, every player's update and updated params are finite
    # (leaves of no player get a zero update); a step that is not comes back
    # as zero updates with the curvature statistics unchanged.
    finite = result.finite
    if nonfinite == "raise":
      jax.debug.callback(_raise_if_not_finite, finite, result.loss, hyper.learning_rate,
                         hyper.damping)
    scale = state.step_scale
    if checked:
      scale = trust_region_lib.next_scale(state.step_scale, result.actual_change,
                                          result.model_change, result.applied,
                                          trust_region_lib.roundoff(result.loss))
    rejected = finite & ~result.applied
    new_state = DGNOptState(
        count=state.count + result.applied.astype(jnp.int32),
        curvature=result.curvature_state,
        skipped=state.skipped + (~finite).astype(jnp.int32),
        loss=result.loss.astype(state.loss.dtype),
        rejected=state.rejected + rejected.astype(jnp.int32),
        step_scale=scale,
        consecutive_skips=guards.raise_if_stalled(
            jnp.where(finite, 0, state.consecutive_skips + 1), max_consecutive_skips,
            result.loss, hyper.learning_rate, hyper.damping, game, params))
    return updates, new_state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def fne(game: games_lib.Game, learning_rate: ScalarOrSchedule,
        curvature: Any = "identity", *, damping: ScalarOrSchedule | None = None,
        vxx_reg: float | None = None, vxx_rank: str = "projected",
        coupling_iterations: int | None = None, nonfinite: str = "skip",
        trust_region: bool = True, weight_decay: float | None = None,
        frozen: Sequence[str | tuple] = (),
        max_consecutive_skips: float | None = None
        ) -> optax.GradientTransformationExtraArgs:
  r"""DGNOpt for the feedback Nash equilibrium (Isaacs-Bellman, DGNOpt eq. 6, 9, 10).

  Each player n at stage t solves its own second-order expansion of
  ``Q_{t,n} = l_{t,n} + V_{t+1,n} o F_t`` (dynamics linearised, DGNOpt eq. 20)
  and applies the feedback policy ``theta <- theta - (k + K dx)`` in a forward
  rollout (Alg. 1), where, with ``M = (C + damping I) / learning_rate``,

  .. math::
     k = M^{-1} Q_\theta, \qquad K = M^{-1} Q_{\theta x}, \qquad
     V_x = Q_x - Q_{x\theta} k, \qquad V_{xx} = Q_{xx} - Q_{x\theta} M^{-1} Q_{\theta x}.

  With one player per stage this is DDPNOpt (Alg. 1, eq. 12-13).

  Where a surrogate curvature leaves a stage's quadratic model non-convex
  (``lambda_max(G) > 1`` with ``G = R^T F_theta M^-1 F_theta^T R``,
  ``Z Z^T + vxx_reg I = R R^T``), the
  coupling ``Q_theta_x`` (feedback gain and value-gradient correction) is
  scaled by ``w = 1/lambda_max(G)``, so that the feedback never amplifies a
  deviation; with the exact curvature ``w = 1`` (see
  :func:`dgnopt_jax._src.linearise.coupling_scale`).

  Args:
    game: the network as a :class:`dgnopt_jax.games.Game`.
    learning_rate: eta, a float or an optax schedule of the step count.
    curvature: C ~ Q_theta_theta: a name (``"identity"``, ``"rmsprop"``,
      ``"adam"``, ``"kfac"``, ``"ekfac"``, ``"dense"``) or an object from
      :mod:`dgnopt_jax.curvature`.
    damping: Tikhonov term on Q_theta_theta (float or schedule); default: the
      curvature's (0 for identity/rmsprop/adam, 0.1 for kfac/ekfac, 1e-3 for
      dense).
    vxx_reg: Tikhonov term eps on the value Hessian, ``V~_xx = Z Z^T + eps I``
      (DDPNOpt §4.2; a state cost at every stage, not propagated); None is
      0, kept out of the compiled step (a number, traced under
      ``optax.inject_hyperparams``, keeps the term in it). It
      enters the convexity safeguard's ``G``; with ``vxx_reg > 0`` the
      safeguard's cheap trace test only exists for a stage that is one
      dense layer under a diagonal curvature, and every other stage runs
      its Lanczos process (``coupling_iterations`` VJP/JVP pairs) at every
      step.
    vxx_rank: the terminal value-Hessian factor ``V_xx^(i) = z z^T / B``
      of each sample's loss Hessian ``H`` and gradient ``g``:
      ``"projected"`` (rank 1, ``z = H g / sqrt(g^T H g)``: ``H`` restricted
      to the gradient's direction, exact along ``g`` and never above ``H``),
      ``"outer"`` (rank 1, ``z = g``: the outer-product factor of GT-DDP
      Prop. 5, the empirical Fisher, which exceeds ``H`` where a sample is
      confidently wrong) or ``"exact"`` (``H`` itself, rank C for softmax
      cross-entropy, C times the factor's cost).
    coupling_iterations: Lanczos steps estimating ``lambda_max(G)``;
      None is 8. (The defaults of these options are None rather than
      numbers so that ``optax.inject_hyperparams``, which turns every number
      into a state array, leaves them static.)
    nonfinite: what a step whose loss, update, updated params, learning
      rate, damping or curvature statistics are not finite does: ``"skip"``
      (zero updates, statistics unchanged, ``state.skipped`` incremented,
      ``state.count`` not) or ``"raise"`` (a ``FloatingPointError`` from the
      compiled step, surfaced by JAX as a runtime error when the result is
      read).
    trust_region: check each step where its rollout ends
      (:mod:`dgnopt_jax._src.trust_region`): a step that lowers the batch
      objective (loss plus weight decay) by less than half of what its
      quadratic model predicts is not applied (``state.rejected`` counts it;
      its curvature statistics are kept), and the next step's learning rate
      is ``state.step_scale * learning_rate``, with the scale halved after a
      rejected step and grown back towards 1 after one its model predicted
      well (``rho > 3/4``).
      False gives the unchecked step of the papers.
    weight_decay: the stage cost ``weight_decay/2 |theta|^2`` on every
      player, the same as building the game with ``weight_decay=``: the
      place of optax's ``add_decayed_weights`` (the step then solves the game
      with the decay, and the trust region counts it). None: the game's own
      stage costs. Static (part of the game).
    frozen: players (``"a/b"`` strings or path tuples, or prefixes of them)
      whose params are fixed constants of the game: read from ``params`` at
      each step, never changed (zero updates), no statistics kept; the other
      players solve the game with them held fixed (a stage left without
      players passes the value derivatives through).
    max_consecutive_skips: a run whose last this many steps were all
      skipped raises a ``FloatingPointError`` (surfaced as ``nonfinite="raise"``'s):
      a skipped step does not advance the count, so whatever made it not
      finite (params, a schedule at that count) makes the next one skip too.
      None is 50; ``math.inf`` turns the check off. Steps the trust region
      rejects do not count.

  Returns:
    An ``optax.GradientTransformationExtraArgs``. Its ``update(updates, state,
    params, *, batch)`` needs ``updates=None`` (or a pytree without arrays;
    the step comes from the game; gradients raise a TypeError that says what
    to do), ``params`` and
    ``batch=(inputs, targets)``, and returns exactly the change the rollout
    applied. A step whose loss, update or updated params are not finite is
    skipped or raises (``nonfinite``); one the trust region rejects returns
    zero updates. Its ``init`` refuses optax wrappers that would change its
    meaning (a transformation before it in a chain, ``optax.MultiSteps``,
    ``optax.apply_if_finite``, masked params), naming what to use instead.
  """
  return _make("fne", game, learning_rate, curvature, damping, vxx_reg, vxx_rank, True,
               coupling_iterations=coupling_iterations, nonfinite=nonfinite,
               trust_region=trust_region, weight_decay=weight_decay, frozen=frozen,
               max_consecutive_skips=max_consecutive_skips)


def olne(game: games_lib.Game, learning_rate: ScalarOrSchedule,
         curvature: Any = "identity", *, damping: ScalarOrSchedule | None = None,
         vxx_reg: float | None = None, vxx_rank: str = "projected",
         nonfinite: str = "skip", weight_decay: float | None = None,
         frozen: Sequence[str | tuple] = (),
         max_consecutive_skips: float | None = None
         ) -> optax.GradientTransformationExtraArgs:
  r"""The open-loop Nash baseline (DGNOpt eq. 5, Prop. 2): the same machinery with no feedback.

  ``Q_theta_x := 0``, so ``V_x`` is the back-propagated co-state and the update
  is ``-M^{-1} d``: with the identity curvature it is SGD, with ``rmsprop`` /
  ``adam`` it is exactly ``optax.rmsprop`` / ``optax.adam`` (DGNOpt Theorem 6),
  with ``dense`` a layer-wise Gauss-Newton step. Arguments as :func:`fne`
  (``vxx_reg`` and ``vxx_rank`` only matter for the dense curvature; an
  open-loop step has no rollout, so no trust region), ``weight_decay`` and
  ``frozen`` included.
  """
  return _make("olne", game, learning_rate, curvature, damping, vxx_reg, vxx_rank, False,
               nonfinite=nonfinite, weight_decay=weight_decay, frozen=frozen,
               max_consecutive_skips=max_consecutive_skips)


def gr(game: games_lib.Game, learning_rate: ScalarOrSchedule,
       curvature: Any = "identity", *, damping: ScalarOrSchedule | None = None,
       vxx_reg: float | None = None, vxx_rank: str = "projected", feedback: bool = True,
       cross_terms: bool = True, coupling_iterations: int | None = None,
       nonfinite: str = "skip", trust_region: bool = True,
       weight_decay: float | None = None, frozen: Sequence[str | tuple] = (),
       max_consecutive_skips: float | None = None
       ) -> optax.GradientTransformationExtraArgs:
  r"""DGNOpt for the cooperative game: group rationality (group Bellman, DGNOpt eq. 7, 11, 22-25).

  The players of each stage minimise the group objective
  ``P_t = sum_n l_{t,n} + W_{t+1} o F_t`` jointly, carrying one joint value
  ``(W_x, W_xx)`` (the shared loss counted once). With
  ``M = (P_theta_theta + damping I) / learning_rate`` over the stage's joint
  action, the cooperative gains solve

  .. math::
     [k; K] = M^{-1} [P_\theta;\; P_{\theta x}], \qquad
     \tilde k_u = \tilde P_{uu}^{-1} (P_u - P_{uv} P_{vv}^{-1} P_v),\quad
     \tilde P_{uu} = P_{uu} - P_{uv} P_{vv}^{-1} P_{vu}

  (block inversion, eq. 23), and ``W_x = P_x - P_{x\theta} k``,
  ``W_xx = P_xx - P_{x\theta} M^{-1} P_{\theta x}`` (eq. 25). The cross
  curvature ``P_uv`` is kept by the ``dense`` curvature and, as the cooperative
  Kronecker factors of GT-DDP Thm 3 / Cor. 7 (DGNOpt Prop. 5), by ``kfac`` and
  ``ekfac`` (``cross_terms=True``); identity, RMSprop and Adam have none
  (GT-DDP §4.1). On stages with one player GR and :func:`fne` coincide.

  Args:
    game, learning_rate, curvature, damping, vxx_reg, vxx_rank,
      coupling_iterations, nonfinite, trust_region, weight_decay, frozen,
      max_consecutive_skips: as :func:`fne` (the safeguard uses the joint G).
    feedback: False gives the cooperative open-loop update (with the identity
      curvature, exactly SGD; no rollout, so no trust region).
    cross_terms: keep ``P_uv`` (dense, kfac, ekfac); False sets it to zero
      (DGNOpt Theorem 6).

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with the surface of :func:`fne`.
  """
  return _make("gr", game, learning_rate, curvature, damping, vxx_reg, vxx_rank, feedback,
               "gr", cross_terms, coupling_iterations, nonfinite, trust_region,
               weight_decay, frozen, max_consecutive_skips)
