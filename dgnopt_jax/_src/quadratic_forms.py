"""Per-sample quadratic forms S = (F_theta^T Z')^T (C + damping)^-1 (F_theta^T Z').

They enter the value-Hessian factor update ``Z <- (F_x^T Z') (I - w^2 eta S)_+^{1/2}``
(GT-DDP Prop. 5-6), per sample, shape (B, r, r), and are the diagonal blocks
of the stage's coupling matrix ``G_ij = q_i^T (C + damping)^-1 q_j`` over
samples and columns (``q_i = F_theta^(i)T Z'^(i)``), whose largest eigenvalue
the convexity safeguard estimates (:func:`linearise.coupling_scale`). Where
a player's per-sample gradients ``q`` are formed anyway, :class:`Form` also
carries ``v -> G v`` from them: two contractions of size B r K O instead of
a VJP and a JVP of the stage. By player structure: docs/ALGORITHM.md §4.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp

from dgnopt_jax._src import games as games_lib
from dgnopt_jax._src import layer_taps
from dgnopt_jax._src import linearise as lin

State = Any
Params = Any


class LayerGradients(NamedTuple):
  """Per-sample, per-column gradients ``q_ir = F_theta^(i)T Z'_ir`` of a dense/conv player.

  Attributes:
    kernel: (B, r, K, O), rows in ``kernel.reshape(K, O)`` order.
    bias: (B, r, O), or None for a layer without bias.
  """

  kernel: jax.Array
  bias: Optional[jax.Array]


class RotatedGradients(NamedTuple):
  """Per-sample gradients of a dense/conv player in its Kronecker eigenbasis.

  ``q~_ir = U_A^T Q_ir U_G`` with ``Q_ir = F_theta^(i)T Z'_ir`` as the
  ``(Ka, O)`` matrix ``[kernel; bias]`` (:func:`layer_taps.to_matrix`). The
  Kronecker forms need ``q~`` for ``S`` and ``G``; contractions with a
  params-shaped ``d`` rotate the small ``(Ka, O)`` matrix instead of keeping
  ``Q`` as well (``q~ . (U_A^T D U_G) = Q . D``: the bases are orthogonal).

  Attributes:
    rotated: ``q~``, (B, r, Ka, O).
    input_basis: ``U_A``, (Ka, Ka).
    output_basis: ``U_G``, (O, O).
  """

  rotated: jax.Array
  input_basis: jax.Array
  output_basis: jax.Array


class DenseGradients(NamedTuple):
  """The per-sample gradients of a dense player, kept as their rank-one factors.

  ``q_ir = [a_i (x) g_ir, g_ir]``: the layer's input ``a_i`` and the column's
  derivative ``g_ir`` at the pre-activation. Products with them are two
  matrix products over the batch; ``q`` itself (B r K O) is never formed.

  Attributes:
    inputs: ``a``, (B, K).
    output_grads: ``g``, (B, r, O).
  """

  inputs: jax.Array
  output_grads: jax.Array


Gradients = LayerGradients | RotatedGradients | DenseGradients


def gradient_coefficients(grads: Gradients, dtheta: Params) -> jax.Array:
  """``Z'^(i)T F_theta^(i) dtheta = q_i . dtheta`` for every sample and column: (B, r)."""
  if isinstance(grads, RotatedGradients):
    q = grads.rotated
    mat = layer_taps.to_matrix(dtheta, grads.output_basis.shape[0]).astype(q.dtype)
    return jnp.einsum("brjl,jl->br", q, grads.input_basis.T @ mat @ grads.output_basis)
  if isinstance(grads, DenseGradients):
    g = grads.output_grads
    # F_theta dtheta at h, in the matrix view: (B, O).
    change = grads.inputs @ dtheta["kernel"].reshape(-1, g.shape[-1]).astype(g.dtype)
    if "bias" in dtheta:
      change = change + dtheta["bias"].reshape(-1).astype(g.dtype)
    return lin.per_sample_dot(g, change[:, None], 1)
  kernel = dtheta["kernel"].reshape(grads.kernel.shape[2:])
  out = jnp.einsum("brko,ko->br", grads.kernel, kernel.astype(grads.kernel.dtype))
  if grads.bias is not None:
    out = out + jnp.einsum("bro,o->br", grads.bias,
                           dtheta["bias"].reshape(-1).astype(grads.bias.dtype))
  return out


def gradient_pullback(grads: Gradients, coeffs: jax.Array, like: Params) -> Params:
  """``F_theta^T (Z' c) = sum_ir q_ir c_ir``, shaped like ``like``."""
  if isinstance(grads, RotatedGradients):
    q = grads.rotated
    rotated = jnp.einsum("brjl,br->jl", q, coeffs.astype(q.dtype))
    mat = grads.input_basis @ rotated @ grads.output_basis.T
    return jax.tree.map(lambda m, t: m.astype(t.dtype), layer_taps.from_matrix(mat, like), like)
  if isinstance(grads, DenseGradients):
    g = grads.output_grads
    combined = lin.factor_apply(g, coeffs)  # sum_r c_ir g_ir: (B, O)
    kernel = (grads.inputs.T @ combined).reshape(like["kernel"].shape)
    out = {"kernel": kernel.astype(like["kernel"].dtype)}
    if "bias" in like:
      out["bias"] = jnp.sum(combined, axis=0).reshape(like["bias"].shape).astype(
          like["bias"].dtype)
    return out
  kernel = jnp.einsum("brko,br->ko", grads.kernel, coeffs.astype(grads.kernel.dtype))
  out = {"kernel": kernel.reshape(like["kernel"].shape).astype(like["kernel"].dtype)}
  if grads.bias is not None:
    bias = jnp.einsum("bro,br->o", grads.bias, coeffs.astype(grads.bias.dtype))
    out["bias"] = bias.reshape(like["bias"].shape).astype(like["bias"].dtype)
  return out


class Form(NamedTuple):
  """A stage's (or one player's) per-sample forms and, where cheap, its coupling matvec.

  Attributes:
    s: ``S^(i) = q_i^T (C + damping)^-1 q_i``, shape (B, r, r).
    gram: ``v -> G v`` on (B, r) arrays with ``G_ij = q_i^T (C + damping)^-1 q_j``,
      or None where the solver applies ``G`` through the stage's VJP and JVP.
    gradients: the players' :class:`LayerGradients`, :class:`RotatedGradients`
      or :class:`DenseGradients` where formed (a tuple over the players of a
      stage), else None. With them ``Z'^T F_theta d`` and ``F_theta^T Z' c``
      are contractions instead of a JVP and a VJP.
    jacobian_trace: ``sum_i tr(F_theta^(i) (C + damping)^-1 F_theta^(i)T)``
      where cheap (dense players), else None: the Tikhonov term's share of
      the coupling matrix's trace (:func:`linearise.guarded_factor_update`).
    convexity_test: a certificate of ``lambda_max(c G) <= 1`` cheaper than
      the Lanczos process (:func:`rank_one_convexity_test`), or None.
  """

  s: jax.Array
  gram: Optional[Callable[[jax.Array], jax.Array]] = None
  gradients: Any = None
  jacobian_trace: Optional[jax.Array] = None
  convexity_test: Optional[lin.ConvexityTest] = None


def sum_forms(forms: list) -> Form:
  """The forms of players with a block-diagonal curvature: ``S`` and ``G`` add up."""
  s = forms[0].s
  for f in forms[1:]:
    s = s + f.s
  every = lambda field: all(getattr(f, field) is not None for f in forms)
  gram = (lambda v: sum(f.gram(v) for f in forms)) if every("gram") else None
  gradients = tuple(f.gradients for f in forms) if every("gradients") else None
  jacobian_trace = sum(f.jacobian_trace for f in forms) if every("jacobian_trace") else None
  # A certificate of one player's G is one of the stage's only when it is the only player.
  convexity_test = forms[0].convexity_test if len(forms) == 1 else None
  return Form(s, gram, gradients, jacobian_trace, convexity_test)


def rank_one_convexity_test(inputs: jax.Array, output_grads: jax.Array,
                            inverse: jax.Array) -> lin.ConvexityTest:
  """Certifies ``lambda_max(c G) <= 1`` for a player whose per-sample gradients are rank one.

  For one output position the gradients are ``q_ir = a_i (x) g_ir`` (``a_i``:
  the layer's input with a 1 for the bias, ``g_ir``: the column's derivative
  at the pre-activation; rotated into the eigenbasis under a Kronecker
  curvature) and, with the diagonal inverse curvature ``D`` (Ka x O),
  ``G_ir,js = sum_ko a_ik a_jk g_iro g_jso D_ko``. For any ``u, v >= 0`` with
  ``D_ko <= u_k v_o``::

      G <= G' = P o Q,   P_ij = sum_k u_k a_ik a_jk,   Q_ir,js = sum_o v_o g_iro g_jso

  (Loewner order; ``G' - G = X diag(u v^T - D) X^T`` with X's rows ``q_ir``),
  so ``I - c G'`` positive definite (its Cholesky factorisation exists)
  implies ``lambda_max(c G) < 1``. The majorant is ``v_o = max_k D_ko``,
  ``u_k = max_o D_ko / v_o`` over the rows some sample's ``a`` uses (the
  others do not enter G): exact for a constant ``D`` (the identity
  curvature), and close where ``D`` is nearly a product of a row and a
  column scale, where the trace test before it (``lambda_max(G) <= tr(G)``)
  is loose by about the number of G's significant eigenvalues (how close, on
  Adam's diagonal: docs/PERFORMANCE.md). The test costs
  ``n (Ka + r^2 O) + (B r)^3 / 3`` multiplications, ``n ~ 3 B^2 / 4`` the
  sample pairs of the triangle LAPACK reads; ``products`` prices it with
  ``n = B^2``, in products with G (``2 B Ka O`` each). It is formed in at
  least float32 (LAPACK has no half-precision Cholesky).

  Args:
    inputs: ``a``, (B, Ka).
    output_grads: ``g``, (B, r, O).
    inverse: ``D``, (Ka, O), non-negative.

  Returns:
    The :class:`linearise.ConvexityTest`.
  """
  batch, ka = inputs.shape
  rank, out = output_grads.shape[1:]
  rows = batch * rank
  half = batch // 2
  # Priced as if the whole matrix were formed (a margin for the extra ops).
  products = (batch * batch * (ka + rank * rank * out) + rows ** 3 / 3) / (2 * batch * ka * out)

  def certifies(scale: jax.Array) -> jax.Array:
    dtype = jnp.promote_types(jnp.result_type(inputs, output_grads, inverse), jnp.float32)
    a, g = inputs.astype(dtype), output_grads.astype(dtype)
    used = jnp.any(a != 0, axis=0)  # rows of D that enter G
    d = jnp.where(used[:, None], inverse.astype(dtype), 0.0)
    v = jnp.max(d, axis=0)
    u = jnp.max(jnp.where(v > 0, d / jnp.where(v > 0, v, 1.0), 0.0), axis=1)
    scaled_u = a * u
    g = g.reshape(batch, rank, out)

    def shifted_rows(first: int, last: int) -> jax.Array:
      """Rows [first, last) of ``I - scale P o Q`` from column ``first`` on (samples)."""
      p = scaled_u[first:last] @ a[first:].T
      q = jnp.einsum("bro,cso->brcs", g[first:last] * v, g[first:])
      block = (q * p[:, None, :, None]).reshape((last - first) * rank, (batch - first) * rank)
      return jnp.eye(*block.shape, dtype=dtype) - scale.astype(dtype) * block

    # The matrix is symmetric and LAPACK reads one triangle: the upper one
    # is formed (two row blocks, 3/4 of the products), the rest left zero.
    # Its transpose is its column-major layout, which LAPACK takes without
    # the transposing copy XLA's CPU backend otherwise makes.
    top = shifted_rows(0, half)
    bottom = jnp.concatenate([jnp.zeros(((batch - half) * rank, half * rank), dtype),
                              shifted_rows(half, batch)], axis=1)
    shifted = jnp.concatenate([top, bottom], axis=0)
    factor = jax.lax.linalg.cholesky(shifted.T, symmetrize_input=False)
    return jnp.all(jnp.isfinite(jnp.diagonal(factor)))

  return lin.ConvexityTest(certifies, products)


def gram_blocks(a: jax.Array, b: jax.Array) -> jax.Array:
  """Per-sample ``a_i^T b_i`` over the trailing axes: (B, r, ...), (B, s, ...) -> (B, r, s)."""
  return lin.per_sample_dot(jnp.expand_dims(a, 2), jnp.expand_dims(b, 1), a.ndim - 2)


def apply_gram(q: jax.Array, inverse: jax.Array, v: jax.Array) -> jax.Array:
  """``(G v)_ir = q_ir^T D (sum_js q_js v_js)`` for gradients q (B, r, ...) and a diagonal D.

  Both contractions are matrix-vector products with ``q`` flattened to
  (B r, K O). Written as a per-sample dot over the trailing axes, XLA's CPU
  backend copies ``q`` into a transposed layout in every Lanczos step of
  the convexity safeguard; as a multiply fused with its reduction it is
  slower still.
  """
  flat = q.reshape(q.shape[0] * q.shape[1], -1)
  u = v.reshape(-1).astype(q.dtype) @ flat  # sum_js v_js q_js
  return (flat @ (inverse * u.reshape(q.shape[2:])).reshape(-1)).reshape(v.shape)


def contract(q: Any, solved: Any) -> jax.Array:
  """Per-sample ``q_r . solved_s`` summed over the leaves: (B, r, s)."""
  parts = [gram_blocks(a, b) for a, b in zip(jax.tree.leaves(q), jax.tree.leaves(solved))]
  return sum(parts[1:], parts[0])


def dense_layer(layer: games_lib.Dense, theta: Params, x: State, factor_next: State,
                inv_diag: Params) -> Form:
  """Kronecker route for a dense player with a diagonal curvature D^-1.

  ``F_theta^T z = [a (x) g, g]`` with ``a = flatten(x)`` and
  ``g = act'(h) z``, so ``S_rs = g_r^T diag((a*a) D_kernel + D_bias) g_s``
  and ``(G v)_ir = g_ir^T (a_i^T (D_kernel * U) + D_bias * u)`` with
  ``U = sum_js v_js a_j g_js^T``, ``u = sum_js v_js g_js``: two matrix
  products per Lanczos step of the convexity safeguard, and the factors
  (:class:`DenseGradients`) serve the value correction and the rollout's
  feedback; they also give the safeguard a test cheaper than its Lanczos
  process (:func:`rank_one_convexity_test`). No per-sample gradient is formed. For the named (elementwise)
  activations the Jacobian's share of the trace is
  ``sum_io act'(h_io)^2 ((a_i*a_i)^T D_kernel + D_bias)_o``.
  """
  a = layer.linear_input(x)
  h = layer.preactivation(theta, x)
  act_pull = jax.vjp(games_lib.get_activation(layer.activation), h)[1]
  g = jax.vmap(lambda c: act_pull(c)[0], in_axes=1, out_axes=1)(factor_next)
  g = g.reshape(g.shape[:2] + (layer.output_size,))  # the matrix view's outputs: (B, r, O)
  slope = None
  if layer.activation is None or isinstance(layer.activation, str):  # elementwise
    slope = act_pull(jnp.ones_like(h))[0].reshape(h.shape[0], -1)  # act'(h): (B, O)
  return _dense_form(layer, theta, a, g, inv_diag, slope)


def tapped_dense_layer(f: lin.Linearised, n: int, factor_next: State, theta: Params,
                       inv_diag: Params) -> Form:
  """:func:`dense_layer` for a dense player inside another stage function (a traced stage).

  ``F_theta^T z = [a (x) g, g]`` holds whatever follows the layer in the
  stage, with ``g`` the stage's VJP at the layer's pre-activation per column
  (:func:`layer_taps.statistics`) and ``a`` the input its tap saw; only the
  Jacobian's share of the trace needs the layer to end the stage (None here).
  """
  g = _column_output_grads(f, n, factor_next)[:, :, 0]  # one output position: (B, r, O)
  layer, layer_x = layer_taps.tapped_layers(f.fn, f.x, f.thetas, (n,))[n]
  return _dense_form(layer, theta, layer.linear_input(layer_x), g, inv_diag, None)


def _dense_form(layer: games_lib.Dense, theta: Params, a: jax.Array, g: jax.Array,
                inv_diag: Params, slope: Optional[jax.Array]) -> Form:
  """The forms of :func:`dense_layer` from ``a`` (B, K), ``g`` (B, r, O) and ``act'(h)`` (or None).

  ``D`` is taken in the layer's (K, O) matrix view (:func:`layer_taps.to_matrix`).
  """
  size = layer.output_size
  dk, db = inv_diag["kernel"], inv_diag.get("bias")
  dk = dk if dk.ndim == 0 else dk.reshape(-1, size)
  db = db if db is None or db.ndim == 0 else db.reshape(size)
  w = jnp.sum(a * a, axis=-1, keepdims=True) * dk if dk.ndim == 0 else (a * a) @ dk
  augmented, inverse = a, jnp.broadcast_to(dk, (a.shape[-1], size))
  if layer.use_bias:
    w = w + db
    augmented = jnp.concatenate([a, jnp.ones_like(a[:, :1])], axis=1)
    inverse = jnp.concatenate([inverse, jnp.broadcast_to(db, (size,))[None]], axis=0)
  s = gram_blocks(g, g * jnp.expand_dims(w, 1))
  jacobian_trace = None if slope is None else jnp.sum(slope * slope * w)

  def gram(v: jax.Array) -> jax.Array:
    combined = lin.factor_apply(g, v)  # sum_s v_js g_js: (B, O)
    back = a @ (dk * (a.T @ combined))
    if layer.use_bias:
      back = back + db * jnp.sum(combined, axis=0)
    return lin.per_sample_dot(g, back[:, None], 1).astype(v.dtype)

  return Form(s, gram, DenseGradients(a, g), jacobian_trace,
              rank_one_convexity_test(augmented, g, inverse))


def explicit_gradients_pay(f: lin.Linearised, n: int, factor_next: State) -> bool:
  """Whether forming player n's per-sample gradients is the cheaper route.

  For a convolution with P output positions and O output maps, the gradients
  ``q`` (B, r, K, O) are no larger than the image patches (B, P, K) they are
  made from when ``r O <= P``; a coupling matvec from them then costs
  ``2 B r K O`` multiplications against ``~2 B P K O`` through the stage's
  VJP and JVP.
  """
  layer, layer_x = layer_taps.tapped_layers(f.fn, f.x, f.thetas, (n,))[n]
  if layer.kind != "conv":
    return False
  positions = jax.eval_shape(lambda x: layer_taps.kernel_rows(layer, x), layer_x).shape[1]
  return jax.tree.leaves(factor_next)[0].shape[1] * layer.features <= positions


def _column_output_grads(f: lin.Linearised, n: int, factor_next: State) -> jax.Array:
  """``g_r = dZ'_r/dh`` at player ``n``'s pre-activation, per column: (B, r, P, O)."""
  return jax.vmap(
      lambda z: layer_taps.statistics(f.fn, f.x, f.thetas, z, (n,))[n].output_grads,
      in_axes=1, out_axes=1)(factor_next)


def diagonal_layer(f: lin.Linearised, n: int, factor_next: State, theta: Params,
                   inv_diag: Params) -> Form:
  """S and ``v -> G v`` of a dense/conv player with a diagonal curvature ``D^-1``.

  Per sample and column the player's gradient is ``q_r = sum_p a_p g_rp^T``
  (``a``: the layer's input at output position p, the image patch of a
  convolution; ``g_r``: the column's derivative at the pre-activation,
  :mod:`layer_taps`), so ``S_rs = sum_ko q_rko D_ko q_sko + sum_o
  qb_ro Db_o qb_so`` with ``D``, ``Db`` the inverse diagonal of the kernel
  and the bias and ``qb_r = sum_p g_rp``; ``(G v)_ir = q_ir^T D u`` with
  ``u = sum_js q_js v_js``. Batched contractions only: also the form XLA
  partitions correctly when the batch is split over devices
  (:func:`linearise.partition_safe`).
  """
  g = _column_output_grads(f, n, factor_next)
  layer, layer_x = layer_taps.tapped_layers(f.fn, f.x, f.thetas, (n,))[n]
  inv = jax.tree.map(lambda d, t: jnp.broadcast_to(d, t.shape), inv_diag, theta)
  inv_kernel = inv["kernel"].reshape(-1, layer.output_size)  # the matrix view
  q = layer_taps.per_sample_kernel_gradients(layer, layer_x, g)
  qb = jnp.sum(g, axis=2) if "bias" in inv else None
  dtype = jax.tree.leaves(factor_next)[0].dtype
  s = gram_blocks(q, q * inv_kernel)
  inv_bias = inv["bias"].reshape(-1) if qb is not None else None
  if qb is not None:
    s = s + gram_blocks(qb, qb * inv_bias)

  def gram(v: jax.Array) -> jax.Array:
    out = apply_gram(q, inv_kernel, v)
    if qb is not None:
      out = out + apply_gram(qb, inv_bias, v)
    return out.astype(v.dtype)

  return Form(s.astype(dtype), gram, LayerGradients(q, qb))


def player(curvature: Any, player_: games_lib.Player, f: lin.Linearised, n: int,
           factor_next: State, step: Any, damping: jax.Array) -> Form:
  """The forms of one player of stage ``f`` under a curvature of its own.

  A diagonal curvature (``inverse_diagonal`` not None) has closed forms for
  dense and conv players (:func:`dense_layer`, :func:`tapped_dense_layer`
  inside other stage functions, :func:`diagonal_layer`); any other player
  or curvature solves with each per-sample gradient.
  """
  theta = f.thetas[n]
  inv_diag = curvature.inverse_diagonal(step, damping, theta)
  if (inv_diag is not None and isinstance(player_.layer, games_lib.Dense) and
      player_.layer.kind == "dense"):  # one row per sample: a g^T is rank one
    if f.fn is games_lib.layer_stage_fn(player_.layer):
      return dense_layer(player_.layer, theta, f.x, factor_next, inv_diag)
    if layer_taps.has_kronecker_structure(player_, theta):
      return tapped_dense_layer(f, n, factor_next, theta, inv_diag)
  if (inv_diag is not None and layer_taps.has_kronecker_structure(player_, theta) and
      (lin.partition_safe() or explicit_gradients_pay(f, n, factor_next))):
    return diagonal_layer(f, n, factor_next, theta, inv_diag)
  (q,) = f.per_sample_vjp_thetas(factor_next, (n,))
  if inv_diag is not None:
    return Form(contract(q, jax.tree.map(lambda a, d: a * d, q, inv_diag)))
  solved = jax.vmap(jax.vmap(lambda v: curvature.solve(step, v, damping)))(q)
  return Form(contract(q, solved))
