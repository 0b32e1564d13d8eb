"""One stage of the feedback Nash (FNE) and open-loop Nash (OLNE) solvers.

Every player n of stage t has its own value stream (V_x, Z) and solves its
own expansion of the Isaacs-Bellman objective Q_{t,n} = l_{t,n} + V_{t+1,n} o F_t,
the other players' actions being unobservable to it (DGNOpt eq. 6, 9, 10,
20-21; with one player per stage DDPNOpt eq. 12-13)::

    Q_theta = l_theta + F_theta^T V_x'                  (one batched VJP)
    Q_x     = F_x^T V_x'
    k       = M^-1 d,   M = (C + damping I) / eta      (d = Q_theta or a moment)
    V_x     = F_x^T (V_x' - w V~_xx' F_theta k)         (eq. 10)
    Z       = (F_x^T Z') (I - w^2 S)_+^{1/2},  S = (F_theta^T Z')^T M^-1 (F_theta^T Z')

where ``F_x^T V~_xx' u = (F_x^T Z')(Z'^T u) + eps F_x^T u`` reuses the columns
``F_x^T Z'`` pulled back for Z (and, for dense and conv players whose
per-sample gradients ``q = F_theta^T Z'`` are formed or kept as factors,
``Z'^T F_theta k = q^T k``), and
its feedback policy in the rollout is
``theta <- theta - (k + w M^-1 F_theta^T V~_xx' F_x dx)``, where
``w = 1 / max(1, lambda_max(G))``, ``G = R^T F_theta M^-1 F_theta^T R`` with
``V~_xx' = R R^T``, shrinks the state-parameter coupling where a
surrogate curvature leaves the stage's model non-convex
(:func:`linearise.coupling_scale`; ``w = 1`` for exact DDP). Streams of players
absent at a stage (dummy players, DGNOpt §3.1) pass through. Without feedback
(OLNE: Q_theta_x := 0) ``V_x`` is the back-propagated co-state. The
first-order terms ``Q_theta``, ``Q_x`` come from the VJP of
``Stage.gradient_fn`` where a stage has one (batch statistics differentiated),
every second-order term from the per-sample Jacobians of ``Stage.fn``.
"""

from __future__ import annotations

from typing import Any

import jax

from dgnopt_jax._src import games as games_lib
from dgnopt_jax._src import kronecker
from dgnopt_jax._src import layer_taps
from dgnopt_jax._src import linearise as lin
from dgnopt_jax._src import quadratic_forms

State = Any
Params = Any


def state_keys(stage: games_lib.Stage, cfg: Any, thetas: tuple) -> tuple[str, ...]:
  """Every player keeps its own curvature statistics."""
  del cfg, thetas
  return tuple(p.name for p in stage.players)


def init_curvature_state(stage: games_lib.Stage, cfg: Any, thetas: tuple) -> dict:
  return {p.name: cfg.curvature.init(t, p) for p, t in zip(stage.players, thetas)}


def stage_backward(stage: games_lib.Stage, cfg: Any, hyper: Any, x: State,
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
    ``(streams_t, new_cstates, saved)`` where ``saved[n] = (k, step, Z', F_x^T Z',
    q, w)`` is what the rollout needs for player n (``q`` the per-sample
    gradients where formed and ``vxx_reg = 0``, else None; ``w`` None without
    feedback).
  """
  # First-order terms through the samples' coupling where the stage has one.
  f, exact = lin.linearise_stage(stage, x, thetas)
  eta, damping, eps = hyper
  curvature = cfg.curvature
  out_streams, out_cstates, saved = [], [], []
  for n, (v_next, z_next) in enumerate(streams):
    if n >= stage.num_players:  # a dummy player: the value passes through
      out_streams.append((exact.vjp_x(v_next),
                          None if z_next is None else f.vjp_x_columns(z_next)))
      continue
    player, theta = stage.players[n], thetas[n]
    stats = None
    if getattr(curvature, "needs_statistics", False):
      stats = kronecker.gather_statistics(f, stage.players, (n,), v_next,
                                          z_next if cfg.feedback else None)[n]
    if exact is f and isinstance(stats, layer_taps.KroneckerStatistics):
      # Q_theta from the statistics' layer inputs: one matrix product.
      q_x, q_theta = f.vjp_x(v_next), kronecker.statistics_gradient(stats, theta)
    else:
      q_x, q_theta = exact.vjp_x_theta(n, v_next)
    if player.weight_decay:
      q_theta = lin.tree_add(q_theta, lin.tree_scale(player.weight_decay, theta))

    def ggn_matvec(v, n=n, player=player, z_next=z_next):
      out = f.vjp_theta(n, lin.value_hessian_apply(z_next, f.jvp_theta(n, v), eps))
      if player.weight_decay:
        out = lin.tree_add(out, lin.tree_scale(player.weight_decay, v))
      return out

    cstate, step = curvature.update(cstates[n], q_theta,
                                    ggn_matvec if curvature.needs_value_hessian else None,
                                    stats)
    open_gain = lin.tree_scale(eta, curvature.solve(step, curvature.direction(step, q_theta),
                                                    damping))
    z, scale, pulled, grads = None, None, None, None
    if z_next is not None:
      z = pulled = f.vjp_x_columns(z_next)
      if cfg.feedback:
        form = quadratic_forms.player(curvature, player, f, n, z_next, step, damping)
        grads = form.gradients if lin.is_zero(eps) else None
        scale, z = lin.guarded_factor_update(
            z_next, z, eta * form.s, pull=lambda c, n=n: f.vjp_theta(n, c),
            solve=lambda g, step=step: lin.tree_scale(eta, curvature.solve(step, g, damping)),
            push=lambda d, n=n: f.jvp_theta(n, d), iterations=cfg.coupling_iterations,
            gram=quadratic_forms.scaled_gram(form, eta), vxx_reg=eps,
            jacobian_trace=quadratic_forms.scaled_jacobian_trace(form, eta))
    if cfg.feedback:
      if grads is not None:  # Z'^T F_theta k from the per-sample gradients
        correction = lin.factor_apply(pulled, quadratic_forms.gradient_coefficients(grads,
                                                                                    open_gain))
      else:
        correction = lin.pulled_value_hessian_apply(z_next, pulled, f.jvp_theta(n, open_gain),
                                                    eps, f.vjp_x)
      v_x = lin.tree_sub(q_x, lin.tree_scale(scale, correction))
    else:
      v_x = q_x
    out_streams.append((v_x, z))
    out_cstates.append(cstate)
    saved.append((open_gain, step, z_next, pulled, grads, scale))
  return tuple(out_streams), tuple(out_cstates), tuple(saved)


def stage_rollout(stage: games_lib.Stage, cfg: Any, hyper: Any, x: State,
                  x_new: State, thetas: tuple, saved: tuple, on_nominal: bool = False):
  """Applies the players' feedback policies at one stage (Alg. 1 lines 10-11).

  Args:
    on_nominal: ``x_new`` is ``x`` (the first stage): ``dx = 0`` and the
      feedback term vanishes, so it is not computed.

  Returns:
    ``(x'_{t+1}, deltas)`` with ``deltas[n]`` the change applied to theta_n.
  """
  eta, damping, eps = hyper
  deltas = []
  if on_nominal:
    deltas = list(open_loop_deltas(saved))
  elif stage.num_players:
    f = lin.Linearised(stage.fn, x, thetas)
    dx = lin.tree_sub(x_new, x)
    for n, (open_gain, step, z_next, pulled, grads, scale) in enumerate(saved):
      if grads is not None:  # F_theta^T Z' (Z'^T F_x dx), Z'^T F_x dx = (F_x^T Z')^T dx
        feedback = quadratic_forms.gradient_pullback(
            grads, lin.factor_transpose_apply(pulled, dx), thetas[n])
      else:
        feedback = f.vjp_theta(n, lin.pushed_value_hessian_apply(z_next, pulled, dx, eps,
                                                                 f.jvp_x))
      feedback = lin.tree_scale(scale * eta, cfg.curvature.solve(step, feedback, damping))
      deltas.append(jax.tree.map(lambda k, fb: -(k + fb), open_gain, feedback))
  new_thetas = tuple(lin.tree_add(t, d) for t, d in zip(thetas, deltas))
  return stage.fn(x_new, new_thetas), tuple(deltas)


def open_loop_deltas(saved: tuple) -> tuple:
  """The players' changes without feedback: -k."""
  return tuple(jax.tree.map(lambda a: -a, saved_n[0]) for saved_n in saved)
