"""Dense reference of one DGNOpt step, for tiny problems and tests (docs/ALGORITHM.md §7).

Everything is built with explicit Jacobians of the batch-augmented state
``X = (x^(1), ..., x^(B))`` (DDPNOpt Appendix B.2): ``F_X``, ``F_theta``,
the full ``V_XX`` matrix, explicit curvature matrices and pseudo-inverse
solves. Nothing is shared with the fast path but the game definition, the
curvature's hyper-parameters and, for the Kronecker curvatures, the per-sample
layer inputs and value derivatives (:func:`layer_taps.statistics`, tested on
their own against per-sample gradients); their factors, eigendecompositions
and inverses are formed here densely with ``numpy.kron``.

With ``coupling="full"`` the value Hessian keeps the cross-sample blocks that
shared parameters create (DDPNOpt eq. 37): exact batch DDP, which lands on the
minimiser of a linear-quadratic game in one step. With ``coupling="block"``
they are dropped at every stage (GT-DDP §4.2), the approximation of the fast
path. The value Hessian's Tikhonov term ``vxx_reg`` is defined as in the fast
path: ``V~_XX = V_XX + eps I`` wherever the value Hessian is used, never
propagated. The state-parameter coupling is scaled by
``w = 1/max(1, lambda_max(G))``, ``G = R^T F_theta M^-1 F_theta^T R`` with
``V~_XX = R R^T`` (the Tikhonov term included), computed here by a dense
eigensolve. Where a stage has a
``gradient_fn`` (batch statistics differentiated), ``Q_x`` and ``Q_theta``
take its Jacobians and every second-order term those of ``fn``.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from dgnopt_jax._src import curvature as curvature_lib
from dgnopt_jax._src import games as games_lib
from dgnopt_jax._src import guards
from dgnopt_jax._src import kronecker
from dgnopt_jax._src import layer_taps


def _flat_stage(fn, x_unravel, theta_unravels):
  def g(x_flat, *theta_flats):
    x = x_unravel(x_flat)
    thetas = tuple(u(t) for u, t in zip(theta_unravels, theta_flats))
    return ravel_pytree(fn(x, thetas))[0]
  return g


def _sample_ids(x: Any) -> np.ndarray:
  ids = jax.tree.map(lambda l: jnp.broadcast_to(
      jnp.arange(l.shape[0]).reshape((-1,) + (1,) * (l.ndim - 1)), l.shape).astype(l.dtype), x)
  return np.asarray(ravel_pytree(ids)[0])


def _block_mask(x: Any) -> np.ndarray:
  ids = _sample_ids(x)
  return (ids[:, None] == ids[None, :]).astype(np.float64)


def _pinv_sym(m: np.ndarray) -> np.ndarray:
  return np.linalg.pinv(0.5 * (m + m.T), hermitian=True)


def _coupling_scale(v_xx: np.ndarray, f_theta: np.ndarray, m_inv: np.ndarray) -> float:
  """1 / max(1, lambda_max(R^T F_theta M^-1 F_theta^T R)), V~_xx = R R^T, by a dense eigensolve."""
  w, u = np.linalg.eigh(0.5 * (v_xx + v_xx.T))
  factor = u * np.sqrt(np.maximum(w, 0.0))
  q = f_theta.T @ factor
  gram = q.T @ m_inv @ q
  return 1.0 / max(1.0, float(np.linalg.eigvalsh(0.5 * (gram + gram.T)).max()))


def _reference_curvature(curvature, state, q_theta, ggn_matrix):
  """(C, direction, new state) on flat numpy vectors, independent of the fast path."""
  if isinstance(curvature, curvature_lib.Identity):
    return np.eye(q_theta.size), q_theta, state
  if isinstance(curvature, curvature_lib.RMSProp):
    nu_flat, nu_unravel = ravel_pytree(state.nu)
    nu = curvature.decay * np.asarray(nu_flat) + (1 - curvature.decay) * q_theta * q_theta
    count = int(state.count) + 1
    nu_hat = nu / (1 - curvature.decay ** count) if curvature.bias_correction else nu
    diag = np.sqrt(nu_hat + curvature.eps) if curvature.eps_in_sqrt else \
        np.sqrt(nu_hat) + curvature.eps
    new = curvature_lib.RMSPropState(nu_unravel(jnp.asarray(nu)), jnp.asarray(count, jnp.int32))
    return np.diag(diag), q_theta, new
  if isinstance(curvature, curvature_lib.Adam):
    mu_flat, unravel = ravel_pytree(state.mu)
    nu_flat = np.asarray(ravel_pytree(state.nu)[0])
    mu = curvature.b1 * np.asarray(mu_flat) + (1 - curvature.b1) * q_theta
    nu = curvature.b2 * nu_flat + (1 - curvature.b2) * q_theta ** 2
    count = int(state.count) + 1
    mu_hat = mu / (1 - curvature.b1 ** count)
    nu_hat = nu / (1 - curvature.b2 ** count)
    diag = np.sqrt(nu_hat + curvature.eps_root) + curvature.eps
    new = curvature_lib.AdamState(unravel(jnp.asarray(mu)), unravel(jnp.asarray(nu)),
                                  jnp.asarray(count, jnp.int32))
    return np.diag(diag), mu_hat, new
  if isinstance(curvature, curvature_lib.DenseExact):
    w, u = np.linalg.eigh(0.5 * (ggn_matrix + ggn_matrix.T))
    return (u * np.maximum(w, 0.0)) @ u.T, q_theta, state
  raise NotImplementedError(f"no dense reference for curvature {curvature!r}")


def _reference_kronecker(curvature, state, stats: list, thetas: list, q_samples: list,
                         damping: float, copies: int = 1):
  """``(C + damping I)^-1`` of the Kronecker curvature for a group of players.

  The group's players are stacked into one augmented layer (one player: its
  own factors). The inverse is formed as a dense matrix from ``kron`` in
  ``[kernel; bias]`` matrix coordinates and restricted to the players'
  diagonal blocks. Players without Kronecker structure (diagonal fallback,
  one player per group) get ``diag(B sum_i q_i^2)`` from the explicit
  per-sample gradients ``q_samples``.

  With ``copies = N > 1`` (a stage with shared statistics) ``stats`` and
  ``thetas`` hold the first player only, and the inverse is that of the N
  players' joint system ``kron(ones(N, N), C) + damping I``.

  Returns:
    ``(inverse in flat param coordinates, new state)``.
  """
  decay = curvature.decay
  count = int(state.count) + 1
  if isinstance(state, kronecker.DiagonalState):
    (q,) = q_samples
    moment = decay * np.asarray(ravel_pytree(state.second_moment)[0]) + \
        (1 - decay) * q.shape[0] * np.sum(q * q, axis=0)
    diag = moment / (1 - decay ** count)
    unravel = ravel_pytree(state.second_moment)[1]
    inv = np.diag(np.where(diag + damping > 0, 1.0 / np.maximum(diag + damping, 1e-300), 0.0))
    return inv, kronecker.DiagonalState(unravel(jnp.asarray(moment)), jnp.asarray(count, jnp.int32))
  a = np.concatenate([np.asarray(s.inputs) for s in stats], axis=-1)
  g = np.concatenate([np.asarray(s.output_grads) for s in stats], axis=-1)
  batch, positions = a.shape[:2]
  ema = lambda old, new: decay * np.asarray(old) + (1 - decay) * new
  refresh = (count - 1) % curvature.inverse_every == 0
  collect = refresh or (count - 1) % curvature.statistics_every == 0
  updates = int(state.updates) + int(collect)
  input_cov, output_cov = np.asarray(state.input_cov), np.asarray(state.output_cov)
  if collect:
    input_cov = ema(input_cov, np.einsum("bpi,bpj->ij", a, a) / (batch * positions))
    output_cov = ema(output_cov, batch * np.einsum("bpo,bpq->oq", g, g))

  def eig(m):
    w, u = np.linalg.eigh(m / (1 - decay ** updates))
    return u, np.maximum(w, 0.0)

  if refresh:
    (ua, la), (ug, lg) = eig(input_cov), eig(output_cov)
  else:
    ua, la, ug, lg = (np.asarray(state.input_basis), np.asarray(state.input_eigenvalues),
                      np.asarray(state.output_basis), np.asarray(state.output_eigenvalues))
  moments, moments_count = np.asarray(state.eigenbasis_moments), int(state.moments_count)
  if curvature.eigenbasis_rescaling:
    if refresh:
      moments, moments_count = np.zeros_like(moments), 0
    if collect:
      per_sample = np.einsum("bpi,bpo->bio", a, g)  # per-sample gradients, matrix form
      rotated = np.einsum("ij,bjk,kl->bil", ua.T, per_sample, ug)
      moments = ema(moments, batch * np.sum(rotated ** 2, axis=0))
      moments_count += 1
    eigenvalues = moments / (1 - decay ** moments_count)
  else:
    eigenvalues = np.outer(la, lg)
  basis = np.kron(ua, ug)  # vec is row-major over the (Ka, O) matrix
  # Flat coordinates of each player's block of the stacked matrix.
  index = np.arange(a.shape[-1] * g.shape[-1]).reshape(a.shape[-1], g.shape[-1])
  coords, row, col = [], 0, 0
  for stat, theta in zip(stats, thetas):
    rows, cols = layer_taps.matrix_shape(theta, stat.output_grads.shape[-1])
    block = jnp.asarray(index[row:row + rows, col:col + cols])
    coords.append(np.asarray(ravel_pytree(layer_taps.from_matrix(block, theta))[0]).astype(int))
    row, col = row + rows, col + cols
  coords = np.concatenate(coords)
  new = type(state)(*(jnp.asarray(v) for v in (
      input_cov, output_cov, ua, la, ug, lg, moments)), jnp.asarray(count, jnp.int32),
      jnp.asarray(updates, jnp.int32), jnp.asarray(moments_count, jnp.int32))
  if copies > 1:
    single = ((basis * eigenvalues.reshape(-1)) @ basis.T)[np.ix_(coords, coords)]
    joint = np.kron(np.ones((copies, copies)), single) + damping * np.eye(copies * coords.size)
    return _pinv_sym(joint), new
  denom = eigenvalues.reshape(-1) + damping
  inv = (basis * np.where(denom > 0, 1.0 / np.maximum(denom, 1e-300), 0.0)) @ basis.T
  return inv[np.ix_(coords, coords)], new


def dense_step(game: games_lib.Game, params: Any, inputs: Any, targets: jax.Array, *,
               learning_rate: float, curvature: Any = "identity",
               curvature_state: dict | None = None, damping: float | None = None,
               vxx_reg: float = 0.0, vxx_rank: str = "projected", feedback: bool = True,
               coupling: str = "block", principle: str = "fne",
               cross_terms: bool = True) -> tuple[Any, dict]:
  """One FNE or GR step (OLNE with ``feedback=False``) with explicit matrices.

  Args:
    game: the game.
    params: params pytree.
    inputs, targets: the batch. Integer and boolean input leaves (token ids)
      are read as floats of the players' dtype, as the solvers read them:
      every state, the input included, is differentiated with respect to
      (a traced game's first stage reads them back as ids).
    learning_rate: eta.
    curvature: a curvature name or object (identity, rmsprop, adam, dense).
    curvature_state: ``{player name: state}``; fresh states when None.
    damping: Tikhonov term on the curvature (the curvature's default if None).
    vxx_reg: Tikhonov term on the value Hessian.
    vxx_rank: ``"projected"`` (per sample ``H g g^T H / (g^T H g)`` of the
      batch-mean loss's Hessian block H and gradient g), ``"outer"``
      (V_XX^T = blockdiag(B grad phi^(i) grad phi^(i)^T / B^2)) or ``"exact"``
      (the exact Hessian of the batch-mean loss).
    feedback: FNE or OLNE.
    coupling: ``"block"`` (block-diagonal V_XX) or ``"full"``.
    principle: ``"fne"`` (a value per player, DGNOpt eq. 9-10) or ``"gr"``
      (one joint value, the stage's players solved jointly, eq. 22-25).
    cross_terms: GR with the dense curvature: keep the players' cross blocks.

  Returns:
    ``(updates, new_curvature_state)``; updates shaped like params.
  """
  curvature = curvature_lib.get_curvature(curvature)
  if damping is None:
    damping = curvature.default_damping
  inputs = guards.float_inputs(inputs, guards.common_player_dtype(game, params))
  joint_name = lambda players: "+".join(p.name for p in players)

  def is_joint(stage, thetas):
    return (principle == "gr" and cross_terms and stage.num_players > 1 and
            hasattr(curvature, "joint") and curvature.joint(stage, tuple(thetas)))

  if curvature_state is None:
    curvature_state = {}
    for stage in game.stages:
      thetas = [games_lib.get_path(params, p.path) for p in stage.players]
      if is_joint(stage, thetas):
        curvature_state[joint_name(stage.players)] = curvature.init_joint(stage, tuple(thetas))
      else:
        curvature_state.update({p.name: curvature.init(t, p)
                                for p, t in zip(stage.players, thetas)})
  eta = learning_rate

  # Forward with flat states; Jacobians and loss derivatives from jax, algebra in numpy.
  xs, flats, stage_fns = [], [], []
  x = inputs
  for stage in game.stages:
    thetas = [games_lib.get_path(params, p.path) for p in stage.players]
    theta_flat = [ravel_pytree(t) for t in thetas]
    x_flat, x_unravel = ravel_pytree(x)
    g = _flat_stage(stage.fn, x_unravel, [u for _, u in theta_flat])
    xs.append((x, x_flat))
    flats.append([f for f, _ in theta_flat])
    stage_fns.append((g, [u for _, u in theta_flat]))
    x = stage.fn(x, tuple(thetas))
  xt_flat, xt_unravel = ravel_pytree(x)
  next_states = [state for state, _ in xs[1:]] + [x]
  batch = jax.tree.leaves(inputs)[0].shape[0]

  def mean_loss(flat):
    return jnp.mean(jax.vmap(game.loss.per_sample)(xt_unravel(flat), targets))

  v_x = np.asarray(jax.jit(jax.grad(mean_loss))(xt_flat))
  if vxx_rank in ("exact", "projected"):
    v_xx = np.asarray(jax.jit(jax.hessian(mean_loss))(xt_flat))
  if vxx_rank == "projected":  # per sample H g g^T H / (g^T H g), in the batch-mean scale
    ids, projected = _sample_ids(x), np.zeros_like(v_xx)
    for sample in range(batch):
      own = np.flatnonzero(ids == sample)
      h_g = v_xx[np.ix_(own, own)] @ v_x[own]
      along = float(v_x[own] @ h_g)
      if along > 0:
        projected[np.ix_(own, own)] = np.outer(h_g, h_g) / along
    v_xx = projected
  elif vxx_rank == "outer":
    v_xx = batch * np.outer(v_x, v_x) * _block_mask(x)
  streams = [(v_x, v_xx) for _ in range(game.num_streams)]

  if coupling not in ("block", "full"):
    raise ValueError(f"coupling must be 'block' or 'full', got {coupling!r}")
  if principle == "gr":
    streams = streams[:1]
  gains = [None] * len(game.stages)
  new_state = dict(curvature_state)
  for t in reversed(range(len(game.stages))):
    stage = game.stages[t]
    g, _ = stage_fns[t]
    args = [xs[t][1]] + flats[t]
    f_x = np.asarray(jax.jit(jax.jacfwd(g, argnums=0))(*args))
    f_ths = [np.asarray(jax.jit(jax.jacfwd(g, argnums=1 + n))(*args))
             for n in range(stage.num_players)]
    # The first-order terms through the batch coupling (Stage.gradient_fn).
    f_x_exact, f_ths_exact = f_x, f_ths
    if stage.gradient_fn is not None:
      exact = _flat_stage(stage.gradient_fn, ravel_pytree(xs[t][0])[1], stage_fns[t][1])
      f_x_exact = np.asarray(jax.jit(jax.jacfwd(exact, argnums=0))(*args))
      f_ths_exact = [np.asarray(jax.jit(jax.jacfwd(exact, argnums=1 + n))(*args))
                     for n in range(stage.num_players)]
    same = _block_mask(xs[t][0])
    if principle == "gr":  # all players on the one joint value
      groups = [list(range(stage.num_players))]
    else:  # player n on value stream n; streams without a player pass through
      groups = [[n] if n < stage.num_players else [] for n in range(len(streams))]
    stage_gains, new_streams = {}, []
    for group, (vx_next, vxx_next) in zip(groups, streams):
      if not group:
        new_streams.append((f_x_exact.T @ vx_next, f_x.T @ vxx_next @ f_x))
        continue
      f_th = np.concatenate([f_ths[n] for n in group], axis=1)
      f_th_exact = np.concatenate([f_ths_exact[n] for n in group], axis=1)
      sizes = [f_ths[n].shape[1] for n in group]
      theta = np.concatenate([np.asarray(flats[t][n]) for n in group])
      decay = np.concatenate([np.full(f_ths[n].shape[1], stage.players[n].weight_decay)
                              for n in group])
      v_reg = vxx_next + vxx_reg * np.eye(vxx_next.shape[0])
      q_theta = f_th_exact.T @ vx_next + decay * theta
      q_x = f_x_exact.T @ vx_next
      ggn = f_th.T @ v_reg @ f_th + np.diag(decay)
      bounds = np.cumsum([0] + sizes)
      thetas = [games_lib.get_path(params, p.path) for p in stage.players]
      if isinstance(curvature, kronecker.Kronecker):
        v_next = ravel_pytree(next_states[t])[1](jnp.asarray(vx_next))
        kron = [n for n in group
                if layer_taps.has_kronecker_structure(stage.players[n], thetas[n])]
        stats = layer_taps.statistics(stage.fn, xs[t][0], tuple(thetas), v_next, tuple(kron))
        ids = _sample_ids(next_states[t])
        # Explicit per-sample gradients F_theta^(i)T V_x'^(i) for diagonal players.
        q_samples = lambda n: np.stack([f_ths[n].T @ np.where(ids == i, vx_next, 0.0)
                                        for i in range(batch)])
        if is_joint(stage, thetas):
          name = joint_name(stage.players)
          shared = stage.shared_statistics
          inv, new_state[name] = _reference_kronecker(
              curvature, curvature_state[name], [stats[n] for n in group[:1 if shared else None]],
              [thetas[n] for n in group[:1 if shared else None]], [], damping,
              len(group) if shared else 1)
        else:
          inv = np.zeros((theta.size, theta.size))
          for n, lo, hi in zip(group, bounds[:-1], bounds[1:]):
            name = stage.players[n].name
            inv[lo:hi, lo:hi], new_state[name] = _reference_kronecker(
                curvature, curvature_state[name], [stats[n]] if n in stats else [],
                [thetas[n]], [] if n in stats else [q_samples(n)], damping)
        m_inv, direction = eta * inv, q_theta
      elif isinstance(curvature, curvature_lib.DenseExact) and (cross_terms or len(group) == 1):
        c, direction, _ = _reference_curvature(curvature, None, q_theta, ggn)
      else:  # block-diagonal: no cross curvature between the players
        c = np.zeros((theta.size, theta.size))
        direction = np.zeros(theta.size)
        for n, lo, hi in zip(group, bounds[:-1], bounds[1:]):
          name = stage.players[n].name
          c[lo:hi, lo:hi], direction[lo:hi], new_state[name] = _reference_curvature(
              curvature, curvature_state[name], q_theta[lo:hi], ggn[lo:hi, lo:hi])
      if not isinstance(curvature, kronecker.Kronecker):
        m_inv = _pinv_sym((c + damping * np.eye(theta.size)) / eta)
      k = m_inv @ direction
      if feedback:
        scale = _coupling_scale(v_reg, f_th, m_inv)
        big_k = scale * m_inv @ (f_th.T @ v_reg @ f_x)
        v_x = q_x - scale * (f_x.T @ v_reg @ f_th) @ k
        cross = f_th.T @ vxx_next @ f_x
        v_xx = f_x.T @ vxx_next @ f_x - scale ** 2 * cross.T @ m_inv @ cross
      else:
        big_k = np.zeros((theta.size, f_x.shape[1]))
        v_x = q_x
        v_xx = f_x.T @ vxx_next @ f_x
      if coupling == "block":
        v_xx = v_xx * same
      for n, lo, hi in zip(group, bounds[:-1], bounds[1:]):
        stage_gains[n] = (k[lo:hi], big_k[lo:hi])
      new_streams.append((v_x, v_xx))
    gains[t] = stage_gains
    streams = new_streams

  # Rollout.
  deltas = {}
  x_new = np.asarray(ravel_pytree(inputs)[0])
  for t, stage in enumerate(game.stages):
    g, unravels = stage_fns[t]
    dx = x_new - np.asarray(xs[t][1])
    new_thetas = []
    for n, player in enumerate(stage.players):
      k, big_k = gains[t][n]
      delta = -(k + big_k @ dx)
      deltas[player.path] = unravels[n](jnp.asarray(delta))
      new_thetas.append(np.asarray(flats[t][n]) + delta)
    x_new = np.asarray(g(jnp.asarray(x_new), *[jnp.asarray(v) for v in new_thetas]))
  updates = games_lib.scatter_players(params, deltas, jnp.zeros_like)
  return updates, new_state
