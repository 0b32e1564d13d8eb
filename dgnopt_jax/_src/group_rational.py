"""One stage of the cooperative, group-rational (GR) solver (DGNOpt eq. 7, 11, 22-25).

All players of a stage minimise the group Bellman objective
``P_t = sum_n l_{t,n} + W_{t+1} o F_t`` jointly; one joint value (W_x, Z) is
carried backward, starting from the shared terminal loss counted once. With
``theta = (theta_1, ..., theta_N)`` the stage's joint action and
``M = (P_theta_theta + damping I) / eta``::

    P_theta = l_theta + F_theta^T W_x'
    [k_1..k_N] = M^-1 [d_1..d_N],  [K_1..K_N] = M^-1 [P_theta_n x]   (eq. 22)
    W_x = F_x^T (W_x' - w V~_xx' sum_n F_theta_n k_n)                (eq. 25)
    Z   = (F_x^T Z') (I - w^2 S)_+^{1/2},  S = q_theta^T M^-1 q_theta,  q_theta = F_theta^T Z'

with the feedback gains scaled by the same ``w = 1/max(1, lambda_max(G))``
that keeps the stage's model convex (:func:`linearise.coupling_scale`).

Solving the joint system is the block inversion of eq. 23: for two players,
``k_1 = P~_uu^-1 (P_u - P_uv P_vv^-1 P_v)`` with the cooperative precondition
``P~_uu = P_uu - P_uv P_vv^-1 P_vu`` (eq. 11), and likewise for the feedback
gains. With ``cross_terms=True`` the cross blocks are kept by the ``dense``
curvature (the joint Gauss-Newton matrix, ``P_uv = F_u^T V~_xx F_v``) and by
``kfac``/``ekfac`` (the cooperative Kronecker factors of GT-DDP Thm 3 /
DGNOpt Prop. 5, :mod:`kronecker`); otherwise ``P_uv := 0`` (GT-DDP §4.1:
identity and diagonal curvatures carry no cross-covariance) and each
player's block is solved on its own, though the value still collects every
player's correction. As in :mod:`feedback_nash`, ``P_theta`` and the
first-order part ``F_x^T W_x'`` of ``W_x`` come from ``Stage.gradient_fn``
where a stage has one.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from dgnopt_jax._src import games as games_lib
from dgnopt_jax._src import kronecker
from dgnopt_jax._src import layer_taps
from dgnopt_jax._src import linearise as lin
from dgnopt_jax._src import quadratic_forms

State = Any
Params = Any


def is_joint(stage: games_lib.Stage, cfg: Any, thetas: tuple) -> bool:
  """Whether the stage's players are solved as one system with cross curvature."""
  joint = getattr(cfg.curvature, "joint", None)
  return bool(cfg.cross_terms and stage.num_players > 1 and joint is not None and
              joint(stage, thetas))


def _joint_player(stage: games_lib.Stage) -> games_lib.Player:
  return games_lib.Player(("+".join(p.name for p in stage.players),))


def state_keys(stage: games_lib.Stage, cfg: Any, thetas: tuple) -> tuple[str, ...]:
  """One statistics entry for a jointly solved stage, else one per player."""
  if is_joint(stage, cfg, thetas):
    return (_joint_player(stage).name,)
  return tuple(p.name for p in stage.players)


def init_curvature_state(stage: games_lib.Stage, cfg: Any, thetas: tuple) -> dict:
  if is_joint(stage, cfg, thetas):
    return {_joint_player(stage).name: cfg.curvature.init_joint(stage, thetas)}
  return {p.name: cfg.curvature.init(t, p) for p, t in zip(stage.players, thetas)}


def _solve(cfg: Any, joint: bool, steps: Any, vectors: tuple, damping) -> tuple:
  if joint:
    return cfg.curvature.solve(steps, vectors, damping)
  return tuple(cfg.curvature.solve(s, v, damping) for s, v in zip(steps, vectors))


def stage_backward(stage: games_lib.Stage, cfg: Any, hyper: Any, x: State,
                   thetas: tuple, streams: tuple, cstates: tuple):
  """Cooperative gains of the stage's players and the joint value at x_t.

  Args:
    stage, cfg, hyper, x, thetas, cstates: as for the FNE stage.
    streams: a one-element tuple ``((W_x', Z'),)``.

  Returns:
    ``(((W_x, Z),), new_cstates, saved)`` with ``saved = (gains, steps, Z', F_x^T Z',
    q, w)`` (``q``: the players' per-sample gradients where all are formed and
    ``vxx_reg = 0``, else None).
  """
  # First-order terms through the samples' coupling where the stage has one.
  f, exact = lin.linearise_stage(stage, x, thetas)
  eta, damping, eps = hyper
  curvature = cfg.curvature
  ((w_next, z_next),) = streams
  if stage.num_players == 0:
    z = None if z_next is None else f.vjp_x_columns(z_next)
    return ((exact.vjp_x(w_next), z),), (), ()
  stats = {}
  if getattr(curvature, "needs_statistics", False):
    stats = kronecker.gather_statistics(f, stage.players, tuple(range(stage.num_players)),
                                        w_next, z_next if cfg.feedback else None)
  # P_theta from the statistics' layer inputs where every player has them.
  if exact is f and stats and all(isinstance(stats[n], layer_taps.KroneckerStatistics)
                                  for n in range(stage.num_players)):
    q_x = f.vjp_x(w_next)
    q_thetas = tuple(kronecker.statistics_gradient(stats[n], t) for n, t in enumerate(thetas))
  else:
    q_x, q_thetas = exact.vjp_x_thetas(w_next)
  q_thetas = tuple(lin.tree_add(q, lin.tree_scale(p.weight_decay, t)) if p.weight_decay else q
                   for q, p, t in zip(q_thetas, stage.players, thetas))
  decay = tuple(p.weight_decay for p in stage.players)
  joint = is_joint(stage, cfg, thetas)

  if joint:
    curvature.check(_joint_player(stage), thetas)

    def joint_ggn(v):
      out = f.vjp_thetas(lin.value_hessian_apply(z_next, f.jvp_thetas(v), eps))
      return tuple(lin.tree_add(o, lin.tree_scale(d, vn)) if d else o
                   for o, d, vn in zip(out, decay, v))

    new_cstate, steps = curvature.update(
        cstates[0], q_thetas, joint_ggn,
        tuple(stats[n] for n in range(stage.num_players)) if stats else None)
    new_cstates = (new_cstate,)
    directions = curvature.direction(steps, q_thetas)
  else:
    new_cstates, steps, directions = [], [], []
    for n, (q, d) in enumerate(zip(q_thetas, decay)):

      def ggn(v, n=n, d=d):
        out = f.vjp_theta(n, lin.value_hessian_apply(z_next, f.jvp_theta(n, v), eps))
        return lin.tree_add(out, lin.tree_scale(d, v)) if d else out

      c, s = curvature.update(cstates[n], q, ggn if curvature.needs_value_hessian else None,
                              stats.get(n))
      new_cstates.append(c)
      steps.append(s)
      directions.append(curvature.direction(s, q))
    new_cstates, steps, directions = tuple(new_cstates), tuple(steps), tuple(directions)
  gains = lin.tree_scale(eta, _solve(cfg, joint, steps, directions, damping))

  z, scale, pulled, grads = None, None, None, None
  if z_next is not None:
    z = pulled = f.vjp_x_columns(z_next)
    if cfg.feedback:
      if joint:
        form = quadratic_forms.joint(curvature, f, z_next, steps, damping)
      else:
        form = quadratic_forms.sum_forms(
            [quadratic_forms.player(curvature, p, f, n, z_next, steps[n], damping)
             for n, p in enumerate(stage.players)])
      scale, z = lin.guarded_factor_update(
          z_next, z, eta * form.s, pull=f.vjp_thetas,
          solve=lambda g: lin.tree_scale(eta, _solve(cfg, joint, steps, g, damping)),
          push=f.jvp_thetas, iterations=cfg.coupling_iterations,
          gram=quadratic_forms.scaled_gram(form, eta), vxx_reg=eps,
          jacobian_trace=quadratic_forms.scaled_jacobian_trace(form, eta))
      grads = form.gradients if lin.is_zero(eps) else None
  if cfg.feedback:
    if grads is not None:  # Z'^T sum_n F_theta_n k_n from the per-sample gradients
      coeffs = [quadratic_forms.gradient_coefficients(q, k) for q, k in zip(grads, gains)]
      correction = lin.factor_apply(pulled, sum(coeffs[1:], coeffs[0]))
    else:
      correction = lin.pulled_value_hessian_apply(z_next, pulled, f.jvp_thetas(gains), eps,
                                                  f.vjp_x)
    w_x = lin.tree_sub(q_x, lin.tree_scale(scale, correction))
  else:
    w_x = q_x
  return ((w_x, z),), new_cstates, (gains, steps, z_next, pulled, grads, scale)


def stage_rollout(stage: games_lib.Stage, cfg: Any, hyper: Any, x: State, x_new: State,
                  thetas: tuple, saved: tuple, on_nominal: bool = False):
  """Applies the cooperative feedback policies of one stage (Alg. 1 lines 10-11).

  ``on_nominal``: ``x_new`` is ``x`` (the first stage), the feedback vanishes.
  """
  eta, damping, eps = hyper
  deltas = ()
  if on_nominal:
    deltas = open_loop_deltas(saved)
  elif stage.num_players:
    gains, steps, z_next, pulled, grads, scale = saved
    f = lin.Linearised(stage.fn, x, thetas)
    dx = lin.tree_sub(x_new, x)
    if grads is not None:  # F_theta_n^T Z' (Z'^T F_x dx), Z'^T F_x dx = (F_x^T Z')^T dx
      coeffs = lin.factor_transpose_apply(pulled, dx)
      feedback = tuple(quadratic_forms.gradient_pullback(q, coeffs, t)
                       for q, t in zip(grads, thetas))
    else:
      feedback = f.vjp_thetas(lin.pushed_value_hessian_apply(z_next, pulled, dx, eps, f.jvp_x))
    feedback = lin.tree_scale(scale * eta, _solve(cfg, is_joint(stage, cfg, thetas), steps,
                                                  feedback, damping))
    deltas = jax.tree.map(lambda k, fb: -(k + fb), gains, feedback)
  new_thetas = tuple(lin.tree_add(t, d) for t, d in zip(thetas, deltas))
  return stage.fn(x_new, new_thetas), tuple(deltas)


def open_loop_deltas(saved: tuple) -> tuple:
  """The players' changes without feedback: -k."""
  if not saved:
    return ()
  return tuple(jax.tree.map(jnp.negative, g) for g in saved[0])
