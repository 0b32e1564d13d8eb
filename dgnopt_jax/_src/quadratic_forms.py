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


def player(curvature: Any, player_: games_lib.Player, f: lin.Linearised, n: int,
           factor_next: State, step: Any, damping: jax.Array) -> jax.Array:
  """S for one player of stage ``f`` (the Kronecker route when it applies)."""
  theta = f.thetas[n]
  inv_diag = curvature.inverse_diagonal(step, damping, theta)
  if (inv_diag is not None and isinstance(player_.layer, games_lib.Dense) and
      f.fn is games_lib.layer_stage_fn(player_.layer)):
    return dense_layer(player_.layer, theta, f.x, factor_next, inv_diag)
  q = f.per_sample_vjp_theta(n, factor_next)
  if inv_diag is not None:
    return _contract(q, jax.tree.map(lambda a, d: a * d, q, inv_diag))
  solved = jax.vmap(jax.vmap(lambda v: curvature.solve(step, v, damping)))(q)
  return _contract(q, solved)


def joint(curvature: Any, f: lin.Linearised, factor_next: State, step: Any,
          damping: jax.Array) -> jax.Array:
  """S for all players of a stage with one joint (non block-diagonal) curvature."""
  q = f.per_sample_vjp_thetas(factor_next)
  solved = jax.vmap(jax.vmap(lambda v: curvature.solve(step, v, damping)))(q)
  return _contract(q, solved)
