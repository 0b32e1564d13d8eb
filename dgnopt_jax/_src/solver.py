"""DGNOpt Algorithm 1: forward, backward scan, rollout (docs/ALGORITHM.md §3).

One step on a batch:

1. forward: ``x_{t+1} = F_t(x_t, theta_t)``, keeping every ``x_t``;
2. backward (t = T-1 .. 0) from the terminal value ``(V_x, Z)`` of the loss:
   each stage solves its groups of players' gains and propagates the value
   streams (:mod:`bellman`; FNE eq. 6, 9, 10, GR eq. 7, 11, 25);
3. rollout (t = 0 .. T-1; Alg. 1 lines 8-12)::

       dx       = x'_t - x_t
       theta   <- theta - (k + K dx)
       x'_{t+1} = F_t(x'_t, theta)

4. check (``trust_region``, feedback only; :mod:`trust_region`).

With ``feedback=False`` (the open-loop baselines, DGNOpt Prop. 2 / Theorem 6:
``Q_theta_x := 0``) there is no feedback gain, ``V_x`` is the back-propagated
co-state and the rollout is skipped. ``vxx_reg`` is a state cost
``vxx_reg/2 |dx_{t+1}|^2`` in every stage's model: it enters where the value
Hessian ``V~_xx = Z Z^T + vxx_reg I`` is used and is not propagated through
``Z``.

Repeated blocks of identical stages are solved with ``lax.scan`` over
stacked parameters (:mod:`segments`); every per-stage value below is a list
over segments of values stacked over the segment's repeats.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from dgnopt_jax._src import bellman
from dgnopt_jax._src import games as games_lib
from dgnopt_jax._src import losses as losses_lib
from dgnopt_jax._src import segments as segments_lib
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
    vxx_rank: ``"projected"``, ``"outer"`` or ``"exact"`` terminal value-Hessian factor.
    principle: ``"fne"`` (one value per player) or ``"gr"`` (one joint value).
    cross_terms: GR only: keep the players' cross curvature P_uv (dense).
    coupling_iterations: Lanczos steps estimating lambda_max(G) for the
      convexity safeguard (:func:`linearise.coupling_scale`).
    trust_region: apply a feedback step only where the rollout lowered the
      batch objective by at least half of its model's decrease
      (:func:`trust_region.accepts`); set only with ``feedback`` (an
      open-loop step has no rollout).
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


class StepResult(NamedTuple):
  """One step's outcome.

  Attributes:
    updates: the change the rollout applied to every player's params (zeros
      elsewhere, and everywhere when the step is not applied).
    curvature_state: the new curvature statistics (the old ones when the
      step is not finite).
    loss: the batch-mean terminal loss.
    finite: whether the loss, every player's update and updated params are
      finite.
    applied: finite and, under the trust region, accepted (a rejected step
      keeps its new curvature statistics).
    actual_change: under the trust region, the change of the objective
      ``J' - J`` (batch-mean loss where the rollout ends plus stage costs);
      None otherwise.
    model_change: under the trust region, its second-order model ``m``
      (:func:`losses.quadratic_model_change` plus the stage costs' change);
      None otherwise.
  """

  updates: Params
  curvature_state: dict
  loss: jax.Array
  finite: jax.Array
  applied: jax.Array
  actual_change: jax.Array | None
  model_change: jax.Array | None


def init_curvature_state(game: games_lib.Game, cfg: SolverConfig, params: Params) -> dict:
  """Fresh curvature statistics: one entry per player, or per cooperative stage (GR)."""
  state = {}
  for stage in game.stages:
    state.update(bellman.init_curvature_state(stage, cfg,
                                              segments_lib.stage_thetas(stage, params)))
  return state


def solve_step(game: games_lib.Game, cfg: SolverConfig, hyper: Hyper, params: Params,
               curvature_state: dict, inputs: State, targets: jax.Array) -> StepResult:
  """One DGNOpt step (Alg. 1) on the batch ``(inputs, targets)``: forward, backward scan, rollout.

  ``curvature_state`` is the dict of :func:`init_curvature_state`. Under the
  trust region the rollout's objective is checked before the step is applied.
  """
  segments = segments_lib.plan_segments(game, params, inputs)
  keys = [bellman.state_keys(stage, cfg, segments_lib.stage_thetas(stage, params))
          for stage in game.stages]
  thetas = [s.stack(lambda t: segments_lib.stage_thetas(game.stages[t], params))
            for s in segments]
  cstates = [s.stack(lambda t: tuple(curvature_state[k] for k in keys[t])) for s in segments]

  xs, outputs = forward(game, segments, thetas, inputs)
  loss, v_x, factor = losses_lib.terminal_value(game.loss, outputs, targets, cfg.vxx_rank)
  terminal = (v_x, factor if cfg.needs_factor else None)
  gains, new_cstates = backward(game, cfg, hyper, segments, xs, thetas, cstates, terminal)
  if cfg.feedback:
    deltas, new_outputs = rollout(game, cfg, hyper, segments, xs, thetas, gains, inputs)
  else:
    deltas = [tuple(map(bellman.open_loop_deltas, seg_gains)) for seg_gains in gains]

  finite = (jnp.isfinite(loss) & jnp.isfinite(hyper.learning_rate) & jnp.isfinite(hyper.damping)
            & segments_lib.statistics_finite(new_cstates)
            & segments_lib.updates_finite(thetas, deltas))
  applied, actual_change, model_change = finite, None, None
  if cfg.trust_region:
    stage_costs = _stage_cost_change(game, segments, thetas, deltas)
    actual_change = losses_lib.batch_loss(game.loss, new_outputs, targets) - loss + stage_costs
    model_change = (losses_lib.quadratic_model_change(game.loss, outputs, new_outputs, targets,
                                                      v_x) + stage_costs)
    applied = finite & trust_region.accepts(actual_change, model_change,
                                            trust_region.roundoff(loss))
  deltas, new_cstates = segments_lib.keep_if_applied(applied, finite, segments, deltas,
                                                     new_cstates, cstates)
  paths = [tuple(p.path for p in stage.players) for stage in game.stages]
  updates = games_lib.scatter_players(params, _by_key(segments, paths, deltas), jnp.zeros_like)
  return StepResult(updates, _by_key(segments, keys, new_cstates), loss, finite, applied,
                    actual_change, model_change)


def forward(game: games_lib.Game, segments: list, thetas: list, inputs: State):
  """Alg. 1 line 2: the states ``x_t`` entering every stage, and the outputs ``x_T``."""
  x, xs = inputs, []
  for s, seg_thetas in zip(segments, thetas):
    def block(x, block_thetas, stages=s.stages(game)):
      entering = []
      for stage, th in zip(stages, block_thetas):
        entering.append(x)
        x = stage.fn(x, th)
      return x, tuple(entering)

    x, seg_xs = s.scan(block, x, seg_thetas)
    xs.append(seg_xs)
  return xs, x


def backward(game: games_lib.Game, cfg: SolverConfig, hyper: Hyper, segments: list, xs: list,
             thetas: list, cstates: list, terminal: tuple):
  """Alg. 1 lines 3-7: every stage's gains and new curvature states, from the terminal value.

  ``terminal = (V_x, Z)`` of the loss starts every value stream: one per
  player of the game (FNE) or one joint stream (GR).
  """
  num_streams = 1 if cfg.principle == "gr" else game.num_streams
  streams = (terminal,) * num_streams
  gains, new_cstates = [None] * len(segments), [None] * len(segments)
  for j in reversed(range(len(segments))):
    def block(streams, inputs, stages=segments[j].stages(game)):
      block_xs, block_thetas, block_cstates = inputs
      out_cstates, out_gains = [None] * len(stages), [None] * len(stages)
      for i in reversed(range(len(stages))):
        streams, out_cstates[i], out_gains[i] = bellman.stage_backward(
            stages[i], cfg, hyper, block_xs[i], block_thetas[i], streams, block_cstates[i])
      return streams, (tuple(out_cstates), tuple(out_gains))

    streams, (new_cstates[j], gains[j]) = segments[j].scan(
        block, streams, (xs[j], thetas[j], cstates[j]), reverse=True)
  return gains, new_cstates


def rollout(game: games_lib.Game, cfg: SolverConfig, hyper: Hyper, segments: list, xs: list,
            thetas: list, gains: list, inputs: State):
  """Alg. 1 lines 8-12: the players' changes under their feedback policies, and ``x'_T``."""
  x_new, deltas = inputs, []
  for j, s in enumerate(segments):
    def block(x_new, inputs, stages=s.stages(game), first=(j == 0 and s.repeats == 1)):
      block_xs, block_thetas, block_gains = inputs
      block_deltas = []
      for i, stage in enumerate(stages):
        # The first stage starts on the nominal trajectory: dx = 0, no feedback.
        x_new, d = bellman.stage_rollout(stage, cfg, hyper, block_xs[i], x_new,
                                         block_thetas[i], block_gains[i],
                                         on_nominal=(first and i == 0))
        block_deltas.append(d)
      return x_new, tuple(block_deltas)

    x_new, seg_deltas = s.scan(block, x_new, (xs[j], thetas[j], gains[j]))
    deltas.append(seg_deltas)
  return deltas, x_new


def _stage_cost_change(game: games_lib.Game, segments, thetas, deltas) -> jax.Array:
  """``sum_n l_n(theta_n + d_n) - l_n(theta_n) = sum_n wd_n (theta_n . d_n + |d_n|^2 / 2)``."""
  change = jnp.zeros([])
  for s, seg_thetas, seg_deltas in zip(segments, thetas, deltas):
    for position, stage in enumerate(s.stages(game)):
      for player, theta, delta in zip(stage.players, seg_thetas[position], seg_deltas[position]):
        if player.weight_decay:
          change = change + player.weight_decay * sum(
              jnp.sum(t * d + 0.5 * d * d) for t, d in
              zip(jax.tree.leaves(theta), jax.tree.leaves(delta)))
  return change


def _by_key(segments, keys: list, values: list) -> dict:
  """Per-segment stacked values as ``{keys[t][i]: the value of stage t's position i}``."""
  out = {}
  for s, seg_values in zip(segments, values):
    for t, per_stage in s.per_stage(seg_values):
      out.update(zip(keys[t], per_stage))
  return out
