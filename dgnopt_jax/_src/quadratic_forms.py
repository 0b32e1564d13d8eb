"""Per-sample quadratic forms S = (F_theta^T Z')^T (C + damping)^-1 (F_theta^T Z').

They enter the value-Hessian factor update ``Z <- (F_x^T Z') (I - w^2 eta S)_+^{1/2}``
(GT-DDP Prop. 5-6; DESIGN §4; ``w`` from :func:`linearise.coupling_scale`) and
are needed per sample, shape (B, r, r).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from dgnopt_jax._src import games as games_lib
from dgnopt_jax._src import kronecker
from dgnopt_jax._src import layer_taps
from dgnopt_jax._src import linearise as lin

State = Any
Params = Any


def _contract(q: Any, solved: Any) -> jax.Array:
  parts = [jnp.einsum("br...,bs...->brs", a, b)
           for a, b in zip(jax.tree.leaves(q), jax.tree.leaves(solved))]
  return sum(parts[1:], parts[0])


def dense_layer(layer: games_lib.Dense, theta: Params, x: State, factor_next: State,
                inv_diag: Params) -> jax.Array:
  """Kronecker route for a dense player with a diagonal curvature D^-1.

  ``F_theta^T z = [a (x) g, g]`` with ``a = flatten(x)`` and
  ``g = act'(h) z``, so ``S_rs = g_r^T diag((a*a) D_kernel + D_bias) g_s``:
  no per-sample gradient is formed.
  """
  a = layer.linear_input(x)
  h = layer.preactivation(theta, x)
  act_pull = jax.vjp(games_lib.get_activation(layer.activation), h)[1]
  g = jax.vmap(lambda c: act_pull(c)[0], in_axes=1, out_axes=1)(factor_next)
  dk = inv_diag["kernel"]
  w = jnp.sum(a * a, axis=-1, keepdims=True) * dk if dk.ndim == 0 else (a * a) @ dk
  if layer.use_bias:
    w = w + inv_diag["bias"]
  return jnp.einsum("bro,bo,bso->brs", g, jnp.broadcast_to(w, h.shape), g)


def layer_from_taps(f: lin.Linearised, n: int, factor_next: State, theta: Params,
                    inv_diag: Params) -> jax.Array:
  """S for a dense/conv player with a diagonal curvature, from the layer's taps.

  Per sample and column the player's gradient is ``q_r = sum_p a_p g_rp^T``
  (``a``: the layer's input at output position p, the image patch of a
  convolution; ``g_r``: the column's derivative at the pre-activation,
  :mod:`layer_taps`), so ``S_rs = sum_ko q_rko D_ko q_sko + sum_o
  qb_ro Db_o qb_so`` with ``D``, ``Db`` the inverse diagonal of the kernel
  and the bias and ``qb_r = sum_p g_rp``. Batched contractions only: the form
  XLA partitions correctly when the batch is split over devices, used where
  :func:`linearise.partition_safe` says so (on one device the per-sample
  ``vmap`` route is leaner).
  """
  stats = jax.vmap(lambda z: layer_taps.statistics(f.fn, f.x, f.thetas, z, (n,))[n],
                   in_axes=1, out_axes=1)(factor_next)
  g = stats.output_grads  # (B, r, P, O); its recorded inputs are unused (dead code)
  layer, layer_x = layer_taps.tapped_layers(f.fn, f.x, f.thetas, (n,))[n]
  inv = jax.tree.map(lambda d, t: jnp.broadcast_to(d, t.shape), inv_diag, theta)
  a, inv_kernel = layer_taps.kernel_rows(layer, layer_x, inv["kernel"])
  q = jnp.einsum("bpk,brpo->brko", a, g)
  out = jnp.einsum("brko,ko,bsko->brs", q, inv_kernel, q)
  if "bias" in inv:
    qb = jnp.sum(g, axis=2)
    out = out + jnp.einsum("bro,o,bso->brs", qb, inv["bias"], qb)
  return out.astype(jax.tree.leaves(factor_next)[0].dtype)


def kronecker_players(f: lin.Linearised, players: tuple[int, ...], factor_next: State,
                      step: kronecker.KroneckerStep, damping: jax.Array) -> jax.Array:
  """S for dense/conv players under a Kronecker curvature, from the factor's taps.

  Per sample and factor column the players' gradients are ``sum_p a_ip g_irp^T``
  (placed block-diagonally when several players share one stacked layer);
  in the eigenbasis, ``S_rs = sum_jk Q~_rjk Q~_sjk / (e_jk + damping)`` with
  ``Q~_r = U_A^T Q_r U_G``. For one dense player (one position) ``Q~_r`` is
  rank one and never formed: ``S_rs = sum_jk a~_j^2 g~_rk g~_sk / (e_jk + damping)``.
  """
  copies = 1
  if isinstance(step, kronecker.SharedKroneckerStep):
    # N players with one gradient q each: S = N q^T (N K + damping)^-1 q.
    players, copies = players[:1], len(players)
  stats = jax.vmap(lambda z: layer_taps.statistics(f.fn, f.x, f.thetas, z, players),
                   in_axes=1, out_axes=1)(factor_next)  # leaves (B, r, P, .)
  inverse = copies * kronecker.safe_reciprocal(copies * step.eigenvalues + damping)
  rows = cols = 0
  rotated = []
  for n in players:
    a, g = stats[n].inputs[:, 0], stats[n].output_grads  # a does not depend on the column
    ka, o = a.shape[-1], g.shape[-1]
    a_rot = a @ step.input_basis[rows:rows + ka]
    g_rot = g @ step.output_basis[cols:cols + o]
    rotated.append((a_rot, g_rot))
    rows, cols = rows + ka, cols + o
  dtype = jax.tree.leaves(factor_next)[0].dtype
  if len(players) == 1 and rotated[0][0].shape[1] == 1:
    a_rot, g_rot = rotated[0]
    return jnp.einsum("bj,jk,brk,bsk->brs", a_rot[:, 0] ** 2, inverse, g_rot[:, :, 0],
                      g_rot[:, :, 0]).astype(dtype)
  q = sum(jnp.einsum("bpj,brpk->brjk", a_rot, g_rot) for a_rot, g_rot in rotated)
  return jnp.einsum("brjk,jk,bsjk->brs", q, inverse, q).astype(dtype)


def player(curvature: Any, player_: games_lib.Player, f: lin.Linearised, n: int,
           factor_next: State, step: Any, damping: jax.Array) -> jax.Array:
  """S for one player of stage ``f`` (the Kronecker route when it applies)."""
  theta = f.thetas[n]
  if isinstance(step, kronecker.KroneckerStep):
    return kronecker_players(f, (n,), factor_next, step, damping)
  inv_diag = curvature.inverse_diagonal(step, damping, theta)
  if (inv_diag is not None and isinstance(player_.layer, games_lib.Dense) and
      f.fn is games_lib.layer_stage_fn(player_.layer)):
    return dense_layer(player_.layer, theta, f.x, factor_next, inv_diag)
  if (inv_diag is not None and lin.partition_safe() and
      layer_taps.has_kronecker_structure(player_, theta)):
    return layer_from_taps(f, n, factor_next, theta, inv_diag)
  q = f.per_sample_vjp_theta(n, factor_next)
  if inv_diag is not None:
    return _contract(q, jax.tree.map(lambda a, d: a * d, q, inv_diag))
  solved = jax.vmap(jax.vmap(lambda v: curvature.solve(step, v, damping)))(q)
  return _contract(q, solved)


def joint(curvature: Any, f: lin.Linearised, factor_next: State, step: Any,
          damping: jax.Array) -> jax.Array:
  """S for all players of a stage with one joint (non block-diagonal) curvature."""
  if isinstance(step, kronecker.KroneckerStep):
    return kronecker_players(f, tuple(range(len(f.thetas))), factor_next, step, damping)
  q = f.per_sample_vjp_thetas(factor_next)
  solved = jax.vmap(jax.vmap(lambda v: curvature.solve(step, v, damping)))(q)
  return _contract(q, solved)
