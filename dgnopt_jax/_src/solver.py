"""DGNOpt Algorithm 1 for feedback (FNE) and open-loop (OLNE) Nash games.

One step on a batch:

1. forward: ``x_{t+1} = F_t(x_t, theta_t)``, keeping every ``x_t``;
2. backward (t = T-1 .. 0), for every player n of stage t, with its own value
   stream (V_x, Z) (DGNOpt eq. 6, 9, 10, 20-21; DDPNOpt eq. 12-13)::

       Q_theta = l_theta + F_theta^T V_x'                 (one batched VJP)
       k       = M^-1 d,   M = (C + damping I) / eta     (d = Q_theta or a moment)
       V_x     = F_x^T (V_x' - V~_xx' F_theta k)          (eq. 10)
       Z       = (F_x^T Z') (I - S)_+^{1/2},  S = (F_theta^T Z')^T M^-1 (F_theta^T Z')

   where ``V~_xx = Z Z^T + vxx_reg I`` is the per-sample (block-diagonal)
   value Hessian with its Tikhonov term. Streams of players absent at a stage
   (dummy players, DGNOpt §3.1) pass through: ``V_x = F_x^T V_x'``,
   ``Z = F_x^T Z'``;
3. rollout (t = 0 .. T-1; Alg. 1 lines 8-12)::

       dx       = x'_t - x_t
       theta   <- theta - (k + M^-1 F_theta^T V~_xx' F_x dx)
       x'_{t+1} = F_t(x'_t, theta)

With ``feedback=False`` (OLNE, DGNOpt Prop. 2 / Theorem 6: Q_theta_x := 0)
there is no feedback gain, ``V_x`` is the back-propagated co-state and the
rollout is skipped.

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

from dgnopt_jax._src import games as games_lib
from dgnopt_jax._src import linearise as lin
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
    feedback: FNE (True) or OLNE (False).
    vxx_rank: ``"outer"`` or ``"exact"`` terminal value-Hessian factor.
  """

  curvature: Any
  feedback: bool = True
  vxx_rank: str = "outer"

  @property
  def needs_factor(self) -> bool:
    return self.feedback or self.curvature.needs_value_hessian


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
# One stage of the backward pass and of the rollout.
# ----------------------------------------------------------------------------


def _per_sample_quadratic(cfg: SolverConfig, player: games_lib.Player, f: lin.Linearised,
                          n: int, theta: Params, factor_next: State, step,
                          damping) -> jax.Array:
  """(F_theta^T Z')^T (C + damping)^-1 (F_theta^T Z') per sample: shape (B, r, r).

  For a ready-made dense player with a diagonal curvature this uses the
  Kronecker structure ``F_theta^T z = [a (x) g, g]``:
  ``S_rs = g_r^T diag((a*a) D_kernel + D_bias) g_s``, with no per-sample
  gradient. Otherwise per-sample VJPs are formed (memory linear in B).
  """
  curvature = cfg.curvature
  inv_diag = curvature.inverse_diagonal(step, damping, theta)
  layer = player.layer
  if inv_diag is not None and isinstance(layer, games_lib.Dense) and len(f.thetas) == 1:
    a = layer.linear_input(f.x)
    h = layer.preactivation(theta, f.x)
    act_pull = jax.vjp(games_lib.get_activation(layer.activation), h)[1]
    g = jax.vmap(lambda c: act_pull(c)[0], in_axes=1, out_axes=1)(factor_next)
    dk = inv_diag["kernel"]
    if dk.ndim == 0:
      w = jnp.sum(a * a, axis=-1, keepdims=True) * dk
    else:
      w = (a * a) @ dk
    if layer.use_bias:
      w = w + inv_diag["bias"]
    w = jnp.broadcast_to(w, h.shape)
    return jnp.einsum("bro,bo,bso->brs", g, w, g)
  q = f.per_sample_vjp_theta(n, factor_next)
  if inv_diag is not None:
    solved = jax.tree.map(lambda a, d: a * d, q, inv_diag)
  else:
    solved = jax.vmap(jax.vmap(lambda v: curvature.solve(step, v, damping)))(q)
  parts = [jnp.einsum("br...,bs...->brs", a, b)
           for a, b in zip(jax.tree.leaves(q), jax.tree.leaves(solved))]
  return sum(parts[1:], parts[0])


def stage_backward(stage: games_lib.Stage, cfg: SolverConfig, hyper: Hyper, x: State,
                   thetas: tuple, streams: tuple, cstates: tuple):
  """Gains of every player at one stage and the value streams at x_t.

  Args:
    stage: the stage.
    cfg: solver configuration.
    hyper: learning rate, damping and V_xx regularisation of this step.
    x: the nominal state x_t.
    thetas: the players' params.
    streams: per value stream, ``(V_x', Z')`` at t+1 (``Z'`` None when unused).
    cstates: the players' curvature states.

  Returns:
    ``(streams_t, new_cstates, saved)`` where ``saved[n] = (k, step, Z')`` is
    what the rollout needs for player n.
  """
  f = lin.Linearised(stage.fn, x, thetas)
  eta, damping, eps = hyper
  curvature = cfg.curvature
  out_streams, out_cstates, saved = [], [], []
  for n, (v_next, z_next) in enumerate(streams):
    if n >= stage.num_players:  # a dummy player: the value passes through
      out_streams.append((f.vjp_x(v_next),
                          None if z_next is None else f.vjp_x_columns(z_next)))
      continue
    player, theta = stage.players[n], thetas[n]
    q_x, q_theta = f.vjp_x_theta(n, v_next)
    if player.weight_decay:
      q_theta = lin.tree_add(q_theta, lin.tree_scale(player.weight_decay, theta))

    def ggn_matvec(v, n=n, player=player, z_next=z_next):
      out = f.vjp_theta(n, lin.value_hessian_apply(z_next, f.jvp_theta(n, v), eps))
      if player.weight_decay:
        out = lin.tree_add(out, lin.tree_scale(player.weight_decay, v))
      return out

    cstate, step = curvature.update(cstates[n], q_theta,
                                    ggn_matvec if curvature.needs_value_hessian else None)
    open_gain = lin.tree_scale(eta, curvature.solve(step, curvature.direction(step, q_theta),
                                                    damping))
    if cfg.feedback:
      correction = lin.value_hessian_apply(z_next, f.jvp_theta(n, open_gain), eps)
      v_x = f.vjp_x(lin.tree_sub(v_next, correction))
    else:
      v_x = q_x
    z = None
    if z_next is not None:
      z = f.vjp_x_columns(z_next)
      if cfg.feedback:
        s = eta * _per_sample_quadratic(cfg, player, f, n, theta, z_next, step, damping)
        z = lin.mix_columns(z, lin.psd_sqrt_of_identity_minus(s))
    out_streams.append((v_x, z))
    out_cstates.append(cstate)
    saved.append((open_gain, step, z_next))
  return tuple(out_streams), tuple(out_cstates), tuple(saved)


def stage_rollout(stage: games_lib.Stage, cfg: SolverConfig, hyper: Hyper, x: State,
                  x_new: State, thetas: tuple, saved: tuple):
  """Applies the players' feedback policies at one stage (Alg. 1 lines 10-11).

  Returns:
    ``(x'_{t+1}, deltas)`` with ``deltas[n]`` the change applied to theta_n.
  """
  eta, damping, eps = hyper
  deltas = []
  if stage.num_players:
    f = lin.Linearised(stage.fn, x, thetas)
    dx = lin.tree_sub(x_new, x)
    f_x_dx = f.jvp_x(dx)
    for n, (open_gain, step, z_next) in enumerate(saved):
      feedback = f.vjp_theta(n, lin.value_hessian_apply(z_next, f_x_dx, eps))
      feedback = lin.tree_scale(eta, cfg.curvature.solve(step, feedback, damping))
      deltas.append(jax.tree.map(lambda k, fb: -(k + fb), open_gain, feedback))
  new_thetas = tuple(lin.tree_add(t, d) for t, d in zip(thetas, deltas))
  return stage.fn(x_new, new_thetas), tuple(deltas)


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
    curvature_state: ``{player name: curvature state}``.
    inputs: batched x_0.
    targets: batched targets.

  Returns:
    The updates (shaped like params: the exact change the rollout applied),
    the new curvature states and the batch-mean terminal loss.
  """
  segments = plan_segments(game, params, inputs)
  seg_thetas = [_stack([stage_thetas(game.stages[s.start + i], params) for i in range(s.length)])
                for s in segments]
  seg_cstates = [_stack([tuple(curvature_state[p.name] for p in game.stages[s.start + i].players)
                         for i in range(s.length)]) for s in segments]

  # 1. Forward: keep x_t for every stage.
  x, seg_xs = inputs, []
  for s, thetas in zip(segments, seg_thetas):
    fn = game.stages[s.start].fn
    x, xs = _scan(lambda c, th, fn=fn: (fn(c, th), c), x, thetas, s.length)
    seg_xs.append(xs)

  # 2. Backward: value streams from the terminal loss.
  loss, v_x, factor = losses_lib.terminal_value(game.loss, x, targets, cfg.vxx_rank)
  streams = tuple((v_x, factor if cfg.needs_factor else None)
                  for _ in range(game.num_streams))
  seg_saved, new_cstates = [None] * len(segments), {}
  for j in reversed(range(len(segments))):
    s, stage = segments[j], game.stages[segments[j].start]

    def backward(carry, xs, stage=stage):
      x_t, thetas, cstates = xs
      carry, cstates, saved = stage_backward(stage, cfg, hyper, x_t, thetas, carry, cstates)
      return carry, (cstates, saved)

    streams, (cstates, saved) = _scan(backward, streams, (seg_xs[j], seg_thetas[j],
                                                          seg_cstates[j]), s.length, True)
    seg_saved[j] = saved
    for i, per_stage in enumerate(_unstack(cstates, s.length)):
      for p, c in zip(game.stages[s.start + i].players, per_stage):
        new_cstates[p.name] = c

  # 3. Rollout with the feedback policies (skipped for OLNE: updates = -k).
  deltas = {}
  x_new = inputs
  for j, s in enumerate(segments):
    stage = game.stages[s.start]
    if cfg.feedback:
      def rollout(carry, xs, stage=stage):
        x_t, thetas, saved = xs
        return stage_rollout(stage, cfg, hyper, x_t, carry, thetas, saved)
      x_new, seg_deltas = _scan(rollout, x_new, (seg_xs[j], seg_thetas[j], seg_saved[j]),
                                s.length)
    else:
      seg_deltas = tuple(jax.tree.map(jnp.negative, saved[0]) for saved in seg_saved[j])
    for i, per_stage in enumerate(_unstack(seg_deltas, s.length)):
      for p, d in zip(game.stages[s.start + i].players, per_stage):
        deltas[p.path] = d

  updates = games_lib.scatter_players(params, deltas, jnp.zeros_like)
  return StepResult(updates, new_cstates, loss)
