"""One stage of the backward pass and of the rollout, over groups of players.

A group is a set of the stage's players that solve one Bellman objective
together and carry one value stream ``(V_x, Z)``:

* feedback Nash (FNE, DGNOpt eq. 6, 9, 10, 20-21; DDPNOpt eq. 12-13 with one
  player per stage): every player is a group of one and solves its own
  Isaacs-Bellman objective ``Q_{t,n} = l_{t,n} + V_{t+1,n} o F_t``, the other
  players' actions being unobservable to it; streams of players absent at a
  stage (dummy players, DGNOpt §3.1) pass through;
* group rationality (GR, DGNOpt eq. 7, 11, 22-25): the stage's players are
  one group minimising ``P_t = sum_n l_{t,n} + W_{t+1} o F_t`` with one joint
  value started from the terminal loss counted once.

For a group ``g`` with joint action ``theta_g`` and
``M = (C + damping I) / eta``::

    Q_theta = l_theta + F_theta^T V_x'                      (one batched VJP)
    Q_x     = F_x^T V_x'
    k       = M^-1 d        (d = Q_theta or a moment of it)   (eq. 22)
    V_x     = F_x^T (V_x' - w V~_xx' F_theta k)               (eq. 10, 25)
    Z       = (F_x^T Z') (I - w^2 S)_+^{1/2},  S = q^T M^-1 q,  q = F_theta^T Z'

and its feedback policy in the rollout is
``theta <- theta - (k + w M^-1 F_theta^T V~_xx' F_x dx)``. The only place
where the two principles differ is ``M``: block-diagonal over the group's
players, or, for a GR stage whose curvature keeps the players' cross terms
(``cross_terms=True`` with ``dense``, ``kfac`` or ``ekfac``; GT-DDP Thm 3,
DGNOpt Prop. 5), one joint matrix whose solve is the block inversion of
eq. 23 (``k_1 = P~_uu^-1 (P_u - P_uv P_vv^-1 P_v)``, eq. 11). The coupling
scale ``w`` (:func:`linearise.coupling_scale`; 1 for exact DDP) keeps the
stage's model convex where a surrogate curvature would not.

Products with ``V~_xx'`` reuse the columns ``F_x^T Z'`` pulled back for ``Z``,
and where the players' per-sample gradients ``q`` are formed (dense and conv
players, ``vxx_reg = 0``) ``Z'^T F_theta k`` and ``F_theta^T Z' c`` are
contractions with them (docs/ALGORITHM.md §4). The first-order terms come
from the VJP of ``Stage.gradient_fn`` where a stage has one (batch
statistics differentiated), every second-order term from ``Stage.fn``.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax

from dgnopt_jax._src import games as games_lib
from dgnopt_jax._src import kronecker
from dgnopt_jax._src import linearise as lin
from dgnopt_jax._src import quadratic_forms

State = Any
Params = Any
Group = tuple[int, ...]


class GroupGains(NamedTuple):
  """What the rollout needs of one group, from its backward solve.

  Attributes:
    gains: the feedforward gains ``k`` (step already scaled by ``eta``), a
      tuple over the group's players.
    steps: the curvature's per-step data (a tuple over the players, or one
      joint step), for ``M^-1`` in the rollout.
    factor_next: ``Z'``, the value-Hessian factor at t+1 (None without one).
    pulled: ``F_x^T Z'`` (None without a factor).
    gradients: the players' per-sample gradients ``q`` where formed and
      ``vxx_reg = 0`` (a tuple over the players), else None.
    coupling_scale: ``w`` (None without feedback).
  """

  gains: tuple
  steps: Any
  factor_next: State | None
  pulled: State | None
  gradients: tuple | None
  coupling_scale: jax.Array | None


def groups(stage: games_lib.Stage, cfg: Any) -> tuple[Group, ...]:
  """The stage's groups in stream order: one per player (FNE) or one of all (GR)."""
  if cfg.principle == "gr":
    return (tuple(range(stage.num_players)),) if stage.num_players else ()
  return tuple((n,) for n in range(stage.num_players))


def is_joint(stage: games_lib.Stage, cfg: Any, thetas: tuple) -> bool:
  """Whether a GR stage's players are solved as one system with cross curvature."""
  return bool(cfg.principle == "gr" and cfg.cross_terms and stage.num_players > 1 and
              cfg.curvature.joint(stage, thetas))


def _joint_player(stage: games_lib.Stage) -> games_lib.Player:
  return games_lib.Player(("+".join(p.name for p in stage.players),))


def state_keys(stage: games_lib.Stage, cfg: Any, thetas: tuple) -> tuple[str, ...]:
  """One statistics entry per player, or one for a jointly solved stage."""
  if is_joint(stage, cfg, thetas):
    return (_joint_player(stage).name,)
  return tuple(p.name for p in stage.players)


def init_curvature_state(stage: games_lib.Stage, cfg: Any, thetas: tuple) -> dict:
  if is_joint(stage, cfg, thetas):
    return {_joint_player(stage).name: cfg.curvature.init_joint(stage, thetas)}
  return {p.name: cfg.curvature.init(t, p) for p, t in zip(stage.players, thetas)}


def _solve(curvature: Any, joint: bool, steps: Any, vectors: tuple, damping) -> tuple:
  """``(C + damping I)^-1 v`` for the group: one joint solve or one per player."""
  if joint:
    return curvature.solve(steps, vectors, damping)
  return tuple(curvature.solve(s, v, damping) for s, v in zip(steps, vectors))


def stage_backward(stage: games_lib.Stage, cfg: Any, hyper: Any, x: State,
                   thetas: tuple, streams: tuple, cstates: tuple):
  """The gains of every group of one stage and the value streams at x_t.

  Args:
    stage, cfg: the stage and the solver configuration.
    hyper: learning rate, damping and V_xx regularisation of this step.
    x, thetas: the nominal state x_t and the players' params.
    streams: per value stream, ``(V_x', Z')`` at t+1 (``Z'`` None when unused):
      one per player of the game (FNE) or one (GR).
    cstates: the curvature states of :func:`state_keys`.

  Returns:
    ``(streams_t, new_cstates, saved)``: the streams at t, the new curvature
    states (as ``cstates``) and a :class:`GroupGains` per group.
  """
  f, exact = lin.linearise_stage(stage, x, thetas)
  stage_groups = groups(stage, cfg)
  joint = is_joint(stage, cfg, thetas)
  out_streams, out_cstates, saved = [], [], []
  for group, stream in zip(stage_groups, streams):
    keys = 1 if joint else len(group)
    value, new, gains = _group_backward(stage, cfg, hyper, f, exact, group, joint, stream,
                                        cstates[len(out_cstates):len(out_cstates) + keys])
    out_streams.append(value)
    out_cstates.extend(new)
    saved.append(gains)
  # Streams no player of the stage acts on: (F_x^T V_x', F_x^T Z').
  out_streams.extend((exact.vjp_x(v_next), None if z_next is None else f.vjp_x_columns(z_next))
                     for v_next, z_next in streams[len(stage_groups):])
  return tuple(out_streams), tuple(out_cstates), tuple(saved)


def _plus_weight_decay(values: tuple, players: tuple, thetas: tuple) -> tuple:
  """``values_n + wd_n thetas_n``: the stage costs' ``l_theta`` or ``l_theta_theta v`` added."""
  return tuple(lin.tree_add(v, lin.tree_scale(p.weight_decay, t)) if p.weight_decay else v
               for v, p, t in zip(values, players, thetas))


def _ggn(f: lin.Linearised, group: Group, players: tuple, z_next: State, eps) -> Any:
  """``v -> F_theta^T V~_xx' F_theta v + wd v``: the Gauss-Newton product of a group's players."""
  return lambda v: _plus_weight_decay(
      f.vjp_thetas(lin.value_hessian_product(z_next, z_next, f.jvp_thetas(v, group), eps), group),
      players, v)


def _group_backward(stage, cfg, hyper, f, exact, group: Group, joint: bool, stream: tuple,
                    cstates: tuple):
  """One group's solve (eq. 22 and 10/25): its value stream, curvature states and gains."""
  eta, damping, eps = hyper
  curvature = cfg.curvature
  players = tuple(stage.players[n] for n in group)
  thetas = tuple(f.thetas[n] for n in group)
  v_next, z_next = stream
  stats = {}
  if curvature.needs_statistics:
    stats = kronecker.gather_statistics(f, stage.players, group, v_next,
                                        z_next if cfg.feedback else None)
  # Q_theta from the statistics' layer inputs where every player has them.
  from_stats = (kronecker.statistics_gradients(tuple(stats[n] for n in group), thetas)
                if exact is f and stats else None)
  if from_stats is not None:
    q_x, q_thetas = f.vjp_x(v_next), from_stats
  else:
    q_x, q_thetas = exact.vjp_x_thetas(v_next, group)
  q_thetas = _plus_weight_decay(q_thetas, players, thetas)

  if joint:
    curvature.check(_joint_player(stage), thetas)
    new_cstate, steps = curvature.update(cstates[0], q_thetas, _ggn(f, group, players, z_next, eps),
                                         tuple(stats[n] for n in group) if stats else None)
    new_cstates, directions = (new_cstate,), curvature.direction(steps, q_thetas)
  else:
    def player_ggn(i: int, n: int):
      if not curvature.needs_value_hessian:
        return None
      one = _ggn(f, (n,), (players[i],), z_next, eps)
      return lambda v: one((v,))[0]

    new_cstates, steps = zip(*(curvature.update(cstates[i], q_thetas[i], player_ggn(i, n),
                                                stats.get(n)) for i, n in enumerate(group)))
    directions = tuple(map(curvature.direction, steps, q_thetas))
  gains = lin.tree_scale(eta, _solve(curvature, joint, steps, directions, damping))

  z, scale, pulled, grads = None, None, None, None
  if z_next is not None:
    z = pulled = f.vjp_x_columns(z_next)
    if cfg.feedback:
      if joint:
        form = curvature.joint_form(f, z_next, steps, damping)
      else:
        form = quadratic_forms.sum_forms(
            [curvature.player_form(stage.players[n], f, n, z_next, steps[i], damping)
             for i, n in enumerate(group)])
      scale, z = lin.guarded_factor_update(
          z_next, z, eta * form.s, pull=lambda c: f.vjp_thetas(c, group),
          solve=lambda g: lin.tree_scale(eta, _solve(curvature, joint, steps, g, damping)),
          push=lambda d: f.jvp_thetas(d, group), iterations=cfg.coupling_iterations,
          gram=None if form.gram is None else (lambda v: eta * form.gram(v)), vxx_reg=eps,
          jacobian_trace=None if form.jacobian_trace is None else eta * form.jacobian_trace,
          convexity_test=None if form.convexity_test is None else form.convexity_test._replace(
              certifies=lambda c: form.convexity_test.certifies(eta * c)))
      grads = form.gradients if lin.is_zero(eps) else None
  v_x = q_x
  if cfg.feedback:
    if grads is not None:  # Z'^T F_theta k from the per-sample gradients
      coeffs = [quadratic_forms.gradient_coefficients(q, k) for q, k in zip(grads, gains)]
      correction = lin.factor_apply(pulled, sum(coeffs[1:], coeffs[0]))
    else:
      correction = lin.value_hessian_product(pulled, z_next, f.jvp_thetas(gains, group), eps,
                                             f.vjp_x)
    v_x = lin.tree_sub(q_x, lin.tree_scale(scale, correction))
  return (v_x, z), new_cstates, GroupGains(gains, steps, z_next, pulled, grads, scale)


def stage_rollout(stage: games_lib.Stage, cfg: Any, hyper: Any, x: State,
                  x_new: State, thetas: tuple, saved: tuple, on_nominal: bool = False):
  """Applies the groups' feedback policies at one stage (Alg. 1 lines 10-11).

  Args:
    stage, cfg, hyper, x, thetas: as :func:`stage_backward`.
    x_new: the rollout's state ``x'_t``.
    saved: the :class:`GroupGains` of :func:`stage_backward`.
    on_nominal: ``x_new`` is ``x`` (the first stage): ``dx = 0`` and the
      feedback term vanishes, so it is not computed.

  Returns:
    ``(x'_{t+1}, deltas)`` with ``deltas[n]`` the change applied to theta_n.
  """
  eta, damping, eps = hyper
  if on_nominal or not stage.num_players:
    deltas = open_loop_deltas(saved)
  else:
    f = lin.Linearised(stage.fn, x, thetas)
    dx = lin.tree_sub(x_new, x)
    joint = is_joint(stage, cfg, thetas)
    deltas = ()
    for group, gains in zip(groups(stage, cfg), saved):
      if gains.gradients is not None:
        # F_theta^T Z' (Z'^T F_x dx), Z'^T F_x dx = (F_x^T Z')^T dx
        coeffs = lin.factor_transpose_apply(gains.pulled, dx)
        feedback = tuple(quadratic_forms.gradient_pullback(q, coeffs, thetas[n])
                         for q, n in zip(gains.gradients, group))
      else:
        feedback = f.vjp_thetas(lin.value_hessian_product(
            gains.factor_next, gains.pulled, dx, eps, f.jvp_x), group)
      feedback = lin.tree_scale(gains.coupling_scale * eta,
                                _solve(cfg.curvature, joint, gains.steps, feedback, damping))
      deltas += tuple(jax.tree.map(lambda k, fb: -(k + fb), gains.gains, feedback))
  new_thetas = tuple(lin.tree_add(t, d) for t, d in zip(thetas, deltas))
  return stage.fn(x_new, new_thetas), deltas


def open_loop_deltas(saved: tuple) -> tuple:
  """The players' changes without feedback, ``-k``, in the stage's player order."""
  return tuple(jax.tree.map(lambda a: -a, k) for gains in saved for k in gains.gains)
