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

With ``feedback=False`` (the open-loop baselines, DGNOpt Prop. 2 / Theorem 6:
Q_theta_x := 0) there is no feedback gain, ``V_x`` is the back-propagated
co-state and the rollout is skipped.

``vxx_reg`` enters where the value Hessian is used (the feedback gain, the
value gradient and the dense curvature) and is not propagated through ``Z``:
it is a state cost ``vxx_reg/2 |dx_{t+1}|^2`` added to every stage's model.

Runs of identical stages (same stage function, players and shapes) are solved
with ``lax.scan`` over stacked parameters.
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
  """

  curvature: Any
  feedback: bool = True
  vxx_rank: str = "outer"
  principle: str = "fne"
  cross_terms: bool = True
  coupling_iterations: int = 8

  @property
  def needs_factor(self) -> bool:
    return self.feedback or self.curvature.needs_value_hessian

  @property
  def stage_solver(self) -> Any:
    return group_rational if self.principle == "gr" else feedback_nash


class Segment(NamedTuple):
  start: int
  length: int


class StepResult(NamedTuple):
  updates: Params
  curvature_state: dict
  loss: jax.Array


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


def plan_segments(game: games_lib.Game, params: Params, inputs: State) -> list[Segment]:
  """Groups consecutive identical stages (same fn, players, shapes; x_{t+1} like x_t)."""
  segments: list[Segment] = []
  x = _shapes(inputs)
  prev = None  # (signature, thetas, x) of the previous stage if it maps x to its own shape
  for t, stage in enumerate(game.stages):
    thetas = _shapes(stage_thetas(stage, params))
    y = jax.eval_shape(stage.fn, x, thetas)
    repeats_shape = _same_shapes(x, y)
    if (prev is not None and repeats_shape and prev[0] == stage.signature() and
        _same_shapes(prev[1], thetas) and _same_shapes(prev[2], x)):
      segments[-1] = Segment(segments[-1].start, segments[-1].length + 1)
    else:
      segments.append(Segment(t, 1))
    prev = (stage.signature(), thetas, x) if repeats_shape else None
    x = y
  return segments


def _stack(trees: list) -> Any:
  return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


def _unstack(tree: Any, length: int) -> list:
  return [jax.tree.map(lambda a: a[i], tree) for i in range(length)]


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
    the new curvature states and the batch-mean terminal loss.
  """
  segments = plan_segments(game, params, inputs)
  seg_thetas = [_stack([stage_thetas(game.stages[s.start + i], params) for i in range(s.length)])
                for s in segments]
  keys = [cfg.stage_solver.state_keys(stage, cfg, stage_thetas(stage, params))
          for stage in game.stages]
  seg_cstates = [_stack([tuple(curvature_state[k] for k in keys[s.start + i])
                         for i in range(s.length)]) for s in segments]

  # 1. Forward: keep x_t for every stage.
  x, seg_xs = inputs, []
  for s, thetas in zip(segments, seg_thetas):
    fn = game.stages[s.start].fn
    x, xs = _scan(lambda c, th, fn=fn: (fn(c, th), c), x, thetas, s.length)
    seg_xs.append(xs)

  # 2. Backward: value streams from the terminal loss.
  loss, v_x, factor = losses_lib.terminal_value(game.loss, x, targets, cfg.vxx_rank)
  num_streams = 1 if cfg.principle == "gr" else game.num_streams
  streams = tuple((v_x, factor if cfg.needs_factor else None) for _ in range(num_streams))
  stage_solver = cfg.stage_solver
  seg_saved, new_cstates = [None] * len(segments), {}
  for j in reversed(range(len(segments))):
    s, stage = segments[j], game.stages[segments[j].start]

    def backward(carry, xs, stage=stage):
      x_t, thetas, cstates = xs
      carry, cstates, saved = stage_solver.stage_backward(stage, cfg, hyper, x_t, thetas,
                                                          carry, cstates)
      return carry, (cstates, saved)

    streams, (cstates, saved) = _scan(backward, streams, (seg_xs[j], seg_thetas[j],
                                                          seg_cstates[j]), s.length, True)
    seg_saved[j] = saved
    for i, per_stage in enumerate(_unstack(cstates, s.length)):
      new_cstates.update(zip(keys[s.start + i], per_stage))

  # 3. Rollout with the feedback policies (skipped for OLNE: updates = -k).
  deltas = {}
  x_new = inputs
  for j, s in enumerate(segments):
    stage = game.stages[s.start]
    if cfg.feedback:
      def rollout(carry, xs, stage=stage):
        x_t, thetas, saved = xs
        return stage_solver.stage_rollout(stage, cfg, hyper, x_t, carry, thetas, saved)
      x_new, seg_deltas = _scan(rollout, x_new, (seg_xs[j], seg_thetas[j], seg_saved[j]),
                                s.length)
    else:
      seg_deltas = stage_solver.open_loop_deltas(seg_saved[j])
    for i, per_stage in enumerate(_unstack(seg_deltas, s.length)):
      for p, d in zip(game.stages[s.start + i].players, per_stage):
        deltas[p.path] = d

  updates = games_lib.scatter_players(params, deltas, jnp.zeros_like)
  return StepResult(updates, new_cstates, loss)
