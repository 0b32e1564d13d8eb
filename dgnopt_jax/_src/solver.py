"""DGNOpt Algorithm 1: forward, backward scan, rollout.

One step on a batch:

1. forward: ``x_{t+1} = F_t(x_t, theta_t)``, keeping every ``x_t``;
2. backward (t = T-1 .. 0) from the terminal value (V_x, Z) of the loss: each
   stage solves its players' gains and propagates the value derivatives, per
   player for the feedback Nash equilibrium (:mod:`feedback_nash`, DGNOpt
   eq. 6, 9, 10) or jointly for group rationality (:mod:`group_rational`,
   eq. 7, 11, 25). ``V~_xx = Z Z^T + vxx_reg I`` is the per-sample
   (block-diagonal) value Hessian with its Tikhonov term;
3. rollout (t = 0 .. T-1; Alg. 1 lines 8-12)::

       dx       = x'_t - x_t
       theta   <- theta - (k + K dx)
       x'_{t+1} = F_t(x'_t, theta)

4. check (``trust_region``, feedback only; :mod:`trust_region`): the step
   is applied only if the batch objective at ``x'_T`` (loss plus stage
   costs) is no larger than at ``x_T``; its change and the change its
   second-order model predicts drive the next step's learning-rate scale.

With ``feedback=False`` (the open-loop baselines, DGNOpt Prop. 2 / Theorem 6:
Q_theta_x := 0) there is no feedback gain, ``V_x`` is the back-propagated
co-state and the rollout is skipped.

``vxx_reg`` enters where the value Hessian is used (the feedback gain, the
value gradient and the dense curvature) and is not propagated through ``Z``:
it is a state cost ``vxx_reg/2 |dx_{t+1}|^2`` added to every stage's model.

Repeated blocks of identical stages (same stage functions, players and
shapes; a run of equal layers, or the two stages of equal residual blocks)
are solved with ``lax.scan`` over stacked parameters, so the compiled program
does not grow with the number of repeats.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from dgnopt_jax._src import feedback_nash
from dgnopt_jax._src import games as games_lib
from dgnopt_jax._src import group_rational
from dgnopt_jax._src import losses as losses_lib
from dgnopt_jax._src import trust_region

Params = Any
State = Any


class Hyper(NamedTuple):
  """Step hyper-parameters (arrays, so schedules may change them under jit)."""

  learning_rate: jax.Array
  damping: jax.Array
  vxx_reg: Any


@dataclasses.dataclass(frozen=True)
class SolverConfig:
  """Static choices of the solver.

  Attributes:
    curvature: the curvature object used for every player.
    feedback: closed-loop (True) or open-loop (False) information structure.
    vxx_rank: ``"outer"`` or ``"exact"`` terminal value-Hessian factor.
    principle: ``"fne"`` (one value per player) or ``"gr"`` (one joint value).
    cross_terms: GR only: keep the players' cross curvature P_uv (dense).
    coupling_iterations: power iterations estimating lambda_max(G) for the
      convexity safeguard (:func:`linearise.coupling_scale`).
    trust_region: apply a feedback step only where the rollout did not raise
      the batch objective (:func:`trust_region.accepts`); set only with
      ``feedback`` (an open-loop step has no rollout).
  """

  curvature: Any
  feedback: bool = True
  vxx_rank: str = "projected"
  principle: str = "fne"
  cross_terms: bool = True
  coupling_iterations: int = 8
  trust_region: bool = False

  @property
  def needs_factor(self) -> bool:
    return self.feedback or self.curvature.needs_value_hessian

  @property
  def stage_solver(self) -> Any:
    return group_rational if self.principle == "gr" else feedback_nash


class Segment(NamedTuple):
  """Stages ``start .. start + period * repeats - 1``: a block of ``period`` stages repeated."""

  start: int
  period: int
  repeats: int

  @property
  def length(self) -> int:
    return self.period * self.repeats

  def stage(self, repeat: int, position: int) -> int:
    return self.start + repeat * self.period + position


class StepResult(NamedTuple):
  """One step's outcome.

  Attributes:
    updates: the change applied to every player's params (zeros elsewhere;
      zeros everywhere when the step is not finite).
    curvature_state: the new curvature statistics (the old ones when the
      step is not finite).
    loss: the batch-mean terminal loss.
    finite: whether the loss, every player's update and updated params are
      finite.
    applied: whether the updates are applied: finite and, under the trust
      region, accepted (a rejected step's updates are zeros, its curvature
      statistics are kept).
    actual_change: the change of the objective, the batch-mean loss where
      the rollout ends less the nominal one plus the change of the stage
      costs (under the trust region; None otherwise).
    model_change: its second-order model: the terminal loss's at the
      rollout's output change (:func:`losses.quadratic_model_change`) plus
      the (quadratic) stage costs' change (under the trust region; None
      otherwise).
  """

  updates: Params
  curvature_state: dict
  loss: jax.Array
  finite: jax.Array
  applied: jax.Array
  actual_change: jax.Array | None
  model_change: jax.Array | None


# ----------------------------------------------------------------------------
# Planning: which stages share one scanned body.
# ----------------------------------------------------------------------------


def _shapes(tree: Any) -> Any:
  return jax.tree.map(lambda a: jax.ShapeDtypeStruct(jnp.shape(a), jnp.result_type(a)), tree)


def _same_shapes(a: Any, b: Any) -> bool:
  la, ta = jax.tree.flatten(a)
  lb, tb = jax.tree.flatten(b)
  return ta == tb and all(x.shape == y.shape and x.dtype == y.dtype for x, y in zip(la, lb))


def stage_thetas(stage: games_lib.Stage, params: Params) -> tuple:
  return tuple(games_lib.get_path(params, p.path) for p in stage.players)


def init_curvature_state(game: games_lib.Game, cfg: SolverConfig, params: Params) -> dict:
  """Fresh curvature statistics: one entry per player, or per cooperative stage (GR)."""
  state = {}
  for stage in game.stages:
    state.update(cfg.stage_solver.init_curvature_state(stage, cfg, stage_thetas(stage, params)))
  return state


# The longest block of stages looked for: a bottleneck residual block with
# train-mode BatchNorm is 9 stages (a convolution, the statistics and the
# normalisation, three times).
MAX_PERIOD = 9
# A repeated stage or block of stages is scanned only from this many repeats
# on. XLA on CPU runs a scanned body slower than the unrolled one (its
# params are stacked and sliced, and a while loop is entered per step): a
# 3-block residual CNN ran an open-loop step in 152 ms scanned against 36 ms
# unrolled, and the DIGITS MLP's three equal hidden layers an fne step in
# 2.0 ms against 1.5 ms. Unrolling many repeats costs compile time instead
# (32 residual blocks, fne: 98 s against 12 s scanned).
MIN_STAGE_REPEATS = 4
MIN_BLOCK_REPEATS = 4


def plan_segments(game: games_lib.Game, params: Params, inputs: State) -> list[Segment]:
  """Groups repeated blocks of identical stages, to be solved with ``lax.scan``.

  A block of ``period`` consecutive stages (e.g. the two stages of a residual
  block) repeats when the next ``period`` stages have the same stage
  functions, players, params shapes and input shapes, and every repetition
  maps the block's input state to a state of the same shape. Runs of one
  stage are scanned from ``MIN_STAGE_REPEATS`` repeats on, blocks of several
  stages from ``MIN_BLOCK_REPEATS``. At each stage the longest run (most stages covered,
  shortest period on ties) is taken.
  """
  xs = [_shapes(inputs)]  # the state shapes x_0 .. x_T
  thetas = [_shapes(stage_thetas(stage, params)) for stage in game.stages]
  for t, (stage, th) in enumerate(zip(game.stages, thetas)):
    xs.append(jax.eval_shape(stage.fn, xs[-1], th))
    if stage.gradient_fn is not None:
      exact = jax.eval_shape(stage.gradient_fn, xs[-2], th)
      if not _same_shapes(exact, xs[-1]):
        raise ValueError(
            f"stage {t} ({stage.name or 'unnamed'}): gradient_fn returns "
            f"{jax.tree.map(lambda s: s.shape, exact)} where fn returns "
            f"{jax.tree.map(lambda s: s.shape, xs[-1])}; it must compute the same next state")

  def same(t, u):
    return (game.stages[t].signature() == game.stages[u].signature() and
            _same_shapes(thetas[t], thetas[u]) and _same_shapes(xs[t], xs[u]))

  def repeats(t, period):
    """How many times stages t .. t+period-1 repeat back to back."""
    count = 0
    while (t + (count + 1) * period <= len(game.stages) and
           all(same(t + j, t + count * period + j) for j in range(period)) and
           _same_shapes(xs[t], xs[t + (count + 1) * period])):
      count += 1
    return count

  segments: list[Segment] = []
  t = 0
  while t < len(game.stages):
    best = Segment(t, 1, 1)
    for period in range(1, MAX_PERIOD + 1):
      r = repeats(t, period)
      least = MIN_STAGE_REPEATS if period == 1 else MIN_BLOCK_REPEATS
      if r >= least and period * r > best.length:
        best = Segment(t, period, r)
    segments.append(best)
    t += best.length
  return segments


def _stack(trees: list) -> Any:
  return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


def _unstack(tree: Any, length: int) -> list:
  return [jax.tree.map(lambda a: a[i], tree) for i in range(length)]


def all_finite(tree: Any) -> jax.Array:
  """Whether every element of every leaf is finite, as one scalar.

  One reduction over the concatenated leaves: per-leaf reductions combined
  afterwards make XLA build a fusion whose size grows with the square of the
  number of leaves, and compile time with it.
  """
  leaves = [jnp.ravel(u) for u in jax.tree.leaves(tree)]  # concatenated in their common dtype
  if not leaves:
    return jnp.asarray(True)
  return jnp.all(jnp.isfinite(jnp.concatenate(leaves)))


# Statistics leaves up to this many elements are checked in one concatenated
# reduction; larger ones (Kronecker factors and bases of wide layers) each in
# a reduction of their own, which copies nothing.
_CONCATENATED_STATISTICS = 1 << 16


def statistics_finite(tree: Any) -> jax.Array:
  """Whether every floating leaf of the curvature statistics is finite, as one scalar.

  The small leaves go through :func:`all_finite` (one reduction: a reduction
  per leaf costs a kernel launch each, and compile time); each large leaf is
  reduced on its own, ``max |x|`` (NaN propagates through it), so that the
  statistics are not copied every step.
  """
  leaves = [l for l in jax.tree.leaves(tree) if jnp.issubdtype(l.dtype, jnp.inexact) and l.size]
  small = [l for l in leaves if l.size <= _CONCATENATED_STATISTICS]
  finite = all_finite(small)
  for leaf in leaves:
    if leaf.size > _CONCATENATED_STATISTICS:
      finite = finite & jnp.isfinite(jnp.max(jnp.abs(leaf)))
  return finite


def _updates_finite(thetas: Any, deltas: Any) -> jax.Array:
  """Whether the (stacked) changes and the params they lead to are finite.

  Checked on a segment's stacked arrays before they are split per repeat:
  a check per leaf of the params pytree costs compile time in proportion to
  the number of leaves (32 residual blocks: 3 of 9 s).
  """
  new = jax.tree.map(lambda t, d: t + d.astype(t.dtype), thetas, deltas)
  return all_finite((deltas, new))


def _keep_if_applied(applied: jax.Array, finite: jax.Array, segments, seg_deltas,
                     seg_new_cstates, seg_cstates):
  """The step's updates, or zeros where not ``applied``; its curvature states, or the old ones where not ``finite``.

  A step the trust region rejects keeps its statistics: they describe the
  batch, not the step, and a momentum that points uphill must see the new
  gradients to turn.

  The updates are selected leaf by leaf on their arrays stacked over
  repeats. So are the states of a segment that is not repeated; those of the
  repeated segments go through one branch on their stacked arrays. A branch
  over everything copies every buffer it passes through (peak memory: MLP
  gr-kfac 0.748 MB against 0.676 MB as here, residual CNN gr-kfac 21.71 MB
  against 20.84 MB); a select per leaf of the repeated segments' states
  costs compile time (residual network of 32 blocks under gr-kfac: 6.0-6.3 s,
  against 5.2-5.5 s with one branch over everything and 5.4-5.8 s as here).

  Args:
    applied: whether the step is applied (finite and, under the trust region,
      accepted).
    finite: whether the step's loss, updates and new params are finite.
    segments: the step's :class:`Segment` s.
    seg_deltas: per segment, the updates stacked over its repeats.
    seg_new_cstates: per segment, the new curvature states, stacked likewise.
    seg_cstates: per segment, the curvature states the step started from.

  Returns:
    ``(seg_deltas, seg_cstates)`` to apply.
  """
  seg_deltas = jax.tree.map(lambda d: jnp.where(applied, d, jnp.zeros_like(d)), seg_deltas)
  kept = list(seg_new_cstates)
  repeated = [j for j, s in enumerate(segments) if s.repeats > 1]
  for j, s in enumerate(segments):
    if s.repeats == 1:
      kept[j] = jax.tree.map(lambda new, old: jnp.where(finite, new, old),
                             seg_new_cstates[j], seg_cstates[j])
  if repeated:
    chosen = jax.lax.cond(finite, lambda: [seg_new_cstates[j] for j in repeated],
                          lambda: [seg_cstates[j] for j in repeated])
    for j, c in zip(repeated, chosen):
      kept[j] = c
  return seg_deltas, kept


def _stage_cost_change(game: games_lib.Game, segments, seg_thetas, seg_deltas) -> jax.Array:
  """``sum_n l_n(theta_n + d_n) - l_n(theta_n) = sum_n wd_n (theta_n . d_n + |d_n|^2 / 2)``."""
  change = jnp.zeros([])
  for s, thetas, deltas in zip(segments, seg_thetas, seg_deltas):
    for position, stage in enumerate(game.stages[s.start:s.start + s.period]):
      for player, theta, delta in zip(stage.players, thetas[position], deltas[position]):
        if player.weight_decay:
          change = change + player.weight_decay * sum(
              jnp.sum(t * d + 0.5 * d * d) for t, d in
              zip(jax.tree.leaves(theta), jax.tree.leaves(delta)))
  return change


def _scan(body, carry, xs, length: int, reverse: bool = False):
  """lax.scan, or a direct call for a run of length one."""
  if length == 1:
    carry, y = body(carry, jax.tree.map(lambda a: a[0], xs))
    return carry, jax.tree.map(lambda a: a[None], y)
  return jax.lax.scan(body, carry, xs, reverse=reverse)


# ----------------------------------------------------------------------------
# Algorithm 1.
# ----------------------------------------------------------------------------


def solve_step(game: games_lib.Game, cfg: SolverConfig, hyper: Hyper, params: Params,
               curvature_state: dict, inputs: State, targets: jax.Array) -> StepResult:
  """One DGNOpt step (Alg. 1): forward, backward scan, rollout.

  Args:
    game: the game.
    cfg: solver configuration.
    hyper: this step's learning rate, damping and V_xx regularisation.
    params: the params pytree.
    curvature_state: curvature statistics (:func:`init_curvature_state`).
    inputs: batched x_0.
    targets: batched targets.

  Returns:
    The updates (shaped like params: the exact change the rollout applied),
    the new curvature states, the batch-mean terminal loss and whether the
    step is finite (a step that is not is returned as zero updates with the
    curvature states unchanged).
  """
  segments = plan_segments(game, params, inputs)
  keys = [cfg.stage_solver.state_keys(stage, cfg, stage_thetas(stage, params))
          for stage in game.stages]

  def per_block(s: Segment, leaf_of_stage) -> Any:
    """Stacked over the repeats: a tuple over the block's positions."""
    return _stack([tuple(leaf_of_stage(s.stage(k, i)) for i in range(s.period))
                   for k in range(s.repeats)])

  def for_each_stage(s: Segment, stacked: Any):
    """(stage index, per-stage value) from a result stacked over repeats."""
    for k, block in enumerate(_unstack(stacked, s.repeats)):
      for i in range(s.period):
        yield s.stage(k, i), block[i]

  seg_thetas = [per_block(s, lambda t: stage_thetas(game.stages[t], params)) for s in segments]
  seg_cstates = [per_block(s, lambda t: tuple(curvature_state[k] for k in keys[t]))
                 for s in segments]

  # 1. Forward: keep x_t for every stage.
  x, seg_xs = inputs, []
  for s, thetas in zip(segments, seg_thetas):
    stages = game.stages[s.start:s.start + s.period]

    def forward(x, block_thetas, stages=stages):
      xs = []
      for stage, th in zip(stages, block_thetas):
        xs.append(x)
        x = stage.fn(x, th)
      return x, tuple(xs)

    x, xs = _scan(forward, x, thetas, s.repeats)
    seg_xs.append(xs)

  # 2. Backward: value streams from the terminal loss.
  loss, v_x, factor = losses_lib.terminal_value(game.loss, x, targets, cfg.vxx_rank)
  num_streams = 1 if cfg.principle == "gr" else game.num_streams
  streams = tuple((v_x, factor if cfg.needs_factor else None) for _ in range(num_streams))
  stage_solver = cfg.stage_solver
  seg_saved, seg_new_cstates = [None] * len(segments), [None] * len(segments)
  for j in reversed(range(len(segments))):
    s = segments[j]
    stages = game.stages[s.start:s.start + s.period]

    def backward(streams, block, stages=stages):
      block_xs, block_thetas, block_cstates = block
      cstates, saved = [None] * len(stages), [None] * len(stages)
      for i in reversed(range(len(stages))):
        streams, cstates[i], saved[i] = stage_solver.stage_backward(
            stages[i], cfg, hyper, block_xs[i], block_thetas[i], streams, block_cstates[i])
      return streams, (tuple(cstates), tuple(saved))

    streams, (cstates, saved) = _scan(backward, streams, (seg_xs[j], seg_thetas[j],
                                                          seg_cstates[j]), s.repeats, True)
    seg_saved[j], seg_new_cstates[j] = saved, cstates

  # 3. Rollout with the feedback policies (skipped for OLNE: updates = -k).
  # A step is finite where the loss, this step's hyper-parameters, the new
  # curvature statistics, the updates and the new params are.
  finite = (jnp.isfinite(loss) & jnp.isfinite(hyper.learning_rate) &
            jnp.isfinite(hyper.damping) & statistics_finite(seg_new_cstates))
  seg_deltas_all = []
  x_new = inputs
  for j, s in enumerate(segments):
    stages = game.stages[s.start:s.start + s.period]
    if cfg.feedback:
      def rollout(x_new, block, stages=stages):
        block_xs, block_thetas, block_saved = block
        block_deltas = []
        for i, stage in enumerate(stages):
          # The first stage starts on the nominal trajectory: dx = 0, no feedback.
          x_new, d = stage_solver.stage_rollout(stage, cfg, hyper, block_xs[i], x_new,
                                                block_thetas[i], block_saved[i],
                                                on_nominal=(j == 0 and s.repeats == 1 and i == 0))
          block_deltas.append(d)
        return x_new, tuple(block_deltas)
      x_new, seg_deltas = _scan(rollout, x_new, (seg_xs[j], seg_thetas[j], seg_saved[j]),
                                s.repeats)
    else:
      seg_deltas = tuple(stage_solver.open_loop_deltas(saved) for saved in seg_saved[j])
    finite = finite & _updates_finite(seg_thetas[j], seg_deltas)
    seg_deltas_all.append(seg_deltas)

  # Where the rollout ends: the objective's change and its quadratic model.
  actual_change = model_change = None
  applied = finite
  if cfg.trust_region:
    stage_costs = _stage_cost_change(game, segments, seg_thetas, seg_deltas_all)
    actual_change = losses_lib.batch_loss(game.loss, x_new, targets) - loss + stage_costs
    model_change = (losses_lib.quadratic_model_change(game.loss, x, x_new, targets, v_x) +
                    stage_costs)
    applied = finite & trust_region.accepts(actual_change, trust_region.roundoff(loss))

  # A step not applied changes no params; one that is not finite no statistics.
  seg_deltas_all, seg_new_cstates = _keep_if_applied(
      applied, finite, segments, seg_deltas_all, seg_new_cstates, seg_cstates)
  deltas, new_cstates = {}, {}
  for j, s in enumerate(segments):
    for t, per_stage in for_each_stage(s, seg_deltas_all[j]):
      for p, d in zip(game.stages[t].players, per_stage):
        deltas[p.path] = d
    for t, per_stage in for_each_stage(s, seg_new_cstates[j]):
      new_cstates.update(zip(keys[t], per_stage))

  updates = games_lib.scatter_players(params, deltas, jnp.zeros_like)
  return StepResult(updates, new_cstates, loss, finite, applied, actual_change, model_change)
