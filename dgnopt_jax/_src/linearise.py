"""A stage's dynamics linearised at the nominal trajectory, and the value-Hessian factor algebra.

Nothing here materialises a Jacobian: ``F_x``, ``F_theta`` and their
transposes are applied through ``jax.jvp`` / ``jax.vjp`` of the stage
function (docs/ALGORITHM.md §4). States are batched pytrees (leading axis B); a value
Hessian factor ``Z`` is a pytree like the state with an extra axis of size r
after the batch, ``V_xx^(i) = sum_r Z[i, r] Z[i, r]^T``.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

from dgnopt_jax._src import symmetric_eigh

State = Any
Params = Any


def tree_add(a, b):
  return jax.tree.map(jnp.add, a, b)


def tree_sub(a, b):
  return jax.tree.map(jnp.subtract, a, b)


def tree_scale(s, a):
  return jax.tree.map(lambda x: s * x, a)


def partition_safe() -> bool:
  """Whether per-sample terms must take the forms XLA partitions correctly.

  XLA (jax 0.10, CPU) partitioned a ``vmap`` over the samples of a
  convolution's VJP in its kernel (a grouped convolution over the batch)
  into wrong per-sample gradients when a jit-compiled step was split over a
  batch-sharded mesh; so with several devices the per-sample terms are
  formed from layer taps or per-sample params copies
  (:meth:`Linearised._per_sample_pullback`,
  :func:`quadratic_forms.diagonal_layer`), and on one device from the
  faster, leaner ``vmap``.
  """
  return jax.device_count() > 1


class Linearised:
  """``F_t`` linearised at ``(x, thetas)``: JVPs and VJPs in x and in players' params.

  ``players`` (a tuple of player indices; None: all of the stage's) selects
  whose params vary; tangents and cotangents in params are tuples over them.
  """

  def __init__(self, fn: Callable[[State, tuple], State], x: State, thetas: tuple):
    self.fn = fn
    self.x = x
    self.thetas = thetas

  def _own(self, players: tuple[int, ...] | None) -> tuple[tuple[int, ...], tuple]:
    """``players`` (None: all of the stage's) and their params."""
    players = tuple(range(len(self.thetas))) if players is None else players
    return players, tuple(self.thetas[n] for n in players)

  def _with(self, players: tuple[int, ...], own: tuple) -> tuple:
    """The stage's params with ``players``' replaced by ``own``."""
    thetas = list(self.thetas)
    for n, theta in zip(players, own):
      thetas[n] = theta
    return tuple(thetas)

  def _of_thetas(self, players: tuple[int, ...]) -> Callable[[tuple], State]:
    if players == tuple(range(len(self.thetas))):
      return lambda own: self.fn(self.x, own)
    return lambda own: self.fn(self.x, self._with(players, own))

  def jvp_x(self, dx: State) -> State:
    """F_x dx (per sample)."""
    return jax.jvp(lambda x: self.fn(x, self.thetas), (self.x,), (dx,))[1]

  def vjp_x(self, cotangent: State) -> State:
    """F_x^T c (per sample)."""
    return jax.vjp(lambda x: self.fn(x, self.thetas), self.x)[1](cotangent)[0]

  def vjp_x_columns(self, factor: State) -> State:
    """F_x^T Z column by column: the factor q_x of Q_xx = q_x q_x^T."""
    return jax.vmap(self.vjp_x, in_axes=1, out_axes=1)(factor)

  def jvp_thetas(self, dthetas: tuple, players: tuple[int, ...] | None = None) -> State:
    """sum_n F_theta_n dtheta_n over ``players`` (per sample; dtheta shared by the batch)."""
    players, own = self._own(players)
    return jax.jvp(self._of_thetas(players), (own,), (tuple(dthetas),))[1]

  def vjp_thetas(self, cotangent: State, players: tuple[int, ...] | None = None) -> tuple:
    """(sum_i F_theta_n^(i)T c^(i))_n for ``players``: one batched VJP."""
    players, own = self._own(players)
    return jax.vjp(self._of_thetas(players), own)[1](cotangent)[0]

  def vjp_x_thetas(self, cotangent: State,
                   players: tuple[int, ...] | None = None) -> tuple[State, tuple]:
    """(F_x^T c, (sum_i F_theta_n^T c)_n) from one pullback."""
    players, own = self._own(players)
    fn = lambda x, own: self.fn(x, self._with(players, own))
    return jax.vjp(fn, self.x, own)[1](cotangent)

  def per_sample_vjp_thetas(self, factor: State, players: tuple[int, ...] | None = None) -> tuple:
    """Per-sample F_theta_n^(i)T Z^(i) for ``players``: leaves of shape (B, r, *theta.shape).

    The generic route for players without a known structure, memory linear
    in B.
    """
    players, _ = self._own(players)
    if partition_safe():
      return self._per_sample_pullback(players, factor)
    return self._per_sample_vmap(players, factor)

  def _per_sample_vmap(self, players: tuple[int, ...], factor: State) -> tuple:
    """One VJP of the single-sample stage per sample and column (``vmap``)."""

    def one(xi, zi):
      def single(own):
        return self.fn(jax.tree.map(lambda a: a[None], xi), self._with(players, own))

      pull = jax.vjp(single, tuple(self.thetas[n] for n in players))[1]
      return jax.vmap(lambda c: pull(jax.tree.map(lambda a: a[None], c))[0])(zi)

    return jax.vmap(one)(self.x, factor)

  def _per_sample_pullback(self, players: tuple[int, ...], factor: State) -> tuple:
    """Per-sample VJPs in the given players' params, one pullback for all columns.

    Every sample gets its own copy of the params (leaves ``(B, *theta.shape)``)
    and the stage is evaluated sample by sample on its copy; the VJP in the
    copies is the per-sample parameter derivative. The form that partitions
    correctly over several devices (:func:`partition_safe`).
    """
    batch = jax.tree.leaves(self.x)[0].shape[0]
    copies = tuple(jax.tree.map(lambda t: jnp.broadcast_to(t, (batch,) + jnp.shape(t)),
                                self.thetas[n]) for n in players)

    def one_sample(xi, own):
      out = self.fn(jax.tree.map(lambda a: a[None], xi), self._with(players, own))
      return jax.tree.map(lambda a: a[0], out)

    pull = jax.vjp(lambda own: jax.vmap(one_sample)(self.x, own), copies)[1]
    # Columns one after the other: JAX cannot vmap the transpose of a
    # convolution in per-sample kernels (a conv with batch_group_count).
    columns = jax.tree.map(lambda z: jnp.moveaxis(z, 1, 0), factor)
    if jax.tree.leaves(factor)[0].shape[1] == 1:
      out = jax.tree.map(lambda q: q[None], pull(jax.tree.map(lambda c: c[0], columns))[0])
    else:
      out = jax.lax.map(lambda c: pull(c)[0], columns)
    return jax.tree.map(lambda q: jnp.moveaxis(q, 0, 1), out)


def linearise_stage(stage: Any, x: State, thetas: tuple) -> tuple[Linearised, Linearised]:
  """The stage's linearisation and the one its first-order terms come from.

  Returns ``(f, exact)``: ``f`` linearises ``stage.fn`` (every second-order
  term: Z, curvature statistics, forms, feedback gains) and ``exact`` linearises
  ``stage.gradient_fn`` where the stage has one (``Q_x = F_x^T V_x'`` and
  ``Q_theta = F_theta^T V_x'`` through the samples' coupling, e.g. batch
  statistics), else it is ``f`` itself.
  """
  f = Linearised(stage.fn, x, thetas)
  if stage.gradient_fn is None:
    return f, f
  return f, Linearised(stage.gradient_fn, x, thetas)


def per_sample_dot(a: jax.Array, b: jax.Array, shared: int) -> jax.Array:
  """``sum`` over the trailing ``shared`` axes of ``a * b`` (broadcast), as one dot.

  The per-sample contractions of the solver ("br...,b...->br",
  "br...,bs...->brs" and kin). The leading axes broadcast as in ``a * b``: an
  axis both operands have becomes a batch axis of the dot, one of size 1 in
  either is dropped from that operand (``b`` may have fewer axes); the result
  has the broadcast leading axes, e.g. (B, r) or (B, r, s). A dot, because
  XLA's CPU backend runs a multiply fused with its reduction slower; at JAX's
  default matmul precision, as the model's own layers do.
  """
  ndim = max(a.ndim, b.ndim)
  a = a.reshape((1,) * (ndim - a.ndim) + a.shape)
  b = b.reshape((1,) * (ndim - b.ndim) + b.shape)
  spec_a, spec_b, spec_out, drop_a, drop_b = "", "", "", [], []
  for axis in range(ndim):
    letter = chr(ord("a") + axis)
    if axis >= ndim - shared:  # contracted
      spec_a, spec_b = spec_a + letter, spec_b + letter
      continue
    spec_out += letter
    if a.shape[axis] == b.shape[axis] or 1 not in (a.shape[axis], b.shape[axis]):
      spec_a, spec_b = spec_a + letter, spec_b + letter
    elif a.shape[axis] == 1:
      drop_a, spec_b = drop_a + [axis], spec_b + letter
    else:
      drop_b, spec_a = drop_b + [axis], spec_a + letter
  return jnp.einsum(f"{spec_a},{spec_b}->{spec_out}", jnp.squeeze(a, drop_a),
                    jnp.squeeze(b, drop_b))


def factor_transpose_apply(factor: State, u: State) -> jax.Array:
  """Z^(i)T u^(i) for every sample: shape (B, r)."""
  parts = [per_sample_dot(z, jnp.expand_dims(v, 1).astype(z.dtype), z.ndim - 2)
           for z, v in zip(jax.tree.leaves(factor), jax.tree.leaves(u))]
  return sum(parts[1:], parts[0])


def expand_trailing(c: jax.Array, ndim: int) -> jax.Array:
  """``c`` with trailing unit axes up to ``ndim`` axes: (B, r) against (B, r, *feature) leaves."""
  return c.reshape(c.shape + (1,) * (ndim - c.ndim))


def factor_apply(factor: State, coeffs: jax.Array) -> State:
  """Z^(i) c^(i) for every sample, c of shape (B, r)."""
  return jax.tree.map(
      lambda z: jnp.sum(z * expand_trailing(coeffs.astype(z.dtype), z.ndim), axis=1), factor)


def is_zero(value: Any) -> bool:
  """Whether ``value`` is a Python number equal to zero (a term that can be dropped statically)."""
  return isinstance(value, (int, float)) and value == 0


def value_hessian_product(left: State, right: State, u: State, vxx_reg,
                          tikhonov: Callable[[State], State] = lambda u: u) -> State:
  """``left (right^T u) + eps tikhonov(u)`` per sample: a product with ``V~_xx = Z Z^T + eps I``.

  * ``(Z, Z)``: ``V~_xx u``;
  * ``(F_x^T Z, Z)``, ``tikhonov = F_x^T``: ``F_x^T V~_xx u``, the value
    gradient's correction (DGNOpt eq. 10, 25);
  * ``(Z, F_x^T Z)``, ``tikhonov = F_x``: ``V~_xx F_x dx``, the rollout's
    feedback cotangent (Alg. 1 line 10).

  ``F_x^T Z`` are the columns the factor update pulled back, so only the
  Tikhonov term needs a VJP or JVP of the stage.
  """
  out = factor_apply(left, factor_transpose_apply(right, u))
  if is_zero(vxx_reg):
    return out
  return tree_add(out, tree_scale(vxx_reg, tikhonov(u)))


def tree_vdot(a: Any, b: Any) -> jax.Array:
  """``sum`` of ``a * b`` over every leaf."""
  return sum(jnp.sum(x * y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


# The most Lanczos steps an injected (traced) ``coupling_iterations`` runs:
# the process keeps its basis, whose size must be static.
TRACED_COUNT_CAPACITY = 32


class ConvexityTest(NamedTuple):
  """A test that certifies ``lambda_max(c G) <= 1`` for the coupling matrix G of a stage.

  Attributes:
    certifies: ``c -> bool``: True only where ``lambda_max(c G) <= 1`` holds
      (False says nothing).
    products: its cost in products with G (multiplications, one ``v -> G v``
      counting as one), to weigh it against the Lanczos process.
  """

  certifies: Callable[[jax.Array], jax.Array]
  products: float


def coupling_scale(gram: Callable[[Any], Any], start: Any, trace: jax.Array | None,
                   iterations: int | jax.Array = 8, unroll: bool = False,
                   certified: Callable[[], jax.Array] | None = None) -> jax.Array:
  """w = 1 / max(1, lambda_max(G)): the shrinkage that keeps the stage's model convex.

  With ``V~_xx' = R R^T``, ``R = [Z', sqrt(eps) I]``, the stage's quadratic
  model over (dX, dtheta) is convex iff ``I - G`` is positive semi-definite,
  ``G = R^T F_theta M^-1 F_theta^T R`` (``G_ij = q_i^T M^-1 q_j`` over samples
  and columns, ``q_i = F_theta^(i)T R^(i)``; never formed). The exact
  curvature bounds ``G <= I``; a surrogate one (identity, RMSprop, Adam) does
  not, and the feedback then over-compensates every deviation by ``1 - G``.
  Scaling ``Q_theta_x`` by ``w`` keeps the closed-loop gain ``I - w G`` in
  [0, I] and ``q_x (I - w^2 S) q_x^T`` positive semi-definite, and leaves
  exact DDP untouched (docs/ALGORITHM.md §6).

  ``lambda_max(G) <= tr(G)``: where the trace is known and at most 1, ``w = 1``
  and nothing more is computed (``lax.cond``); then, where the caller has a
  cheaper certificate of ``lambda_max(G) <= 1`` (``certified``, e.g.
  :func:`quadratic_forms.rank_one_convexity_test`), ``w = 1`` where it holds.
  Both are exact: the Lanczos estimate never exceeds ``lambda_max(G)``, so it
  would give ``w = 1`` there too. Otherwise ``lambda_max(G)`` is
  estimated by ``iterations`` steps of the Lanczos process from ``start``:
  with ``Q_k`` an orthonormal basis of the Krylov space
  ``span{v, G v, .., G^(k-1) v}`` (Gram-Schmidt against every earlier
  vector, twice), the largest eigenvalue of the k x k tridiagonal
  ``T_k = Q_k^T G Q_k`` is the largest Rayleigh quotient over that space.
  So it never exceeds ``lambda_max(G)``, and never falls below the power
  iteration's estimate from the same start with as many products with G (its
  iterates lie in the same space); its error falls like ``exp(-4 k sqrt(gap))``
  where the power iteration's falls like ``(1 - gap)^(2k)`` (the Kaniel-Paige
  bound, with ``gap`` the relative spectral gap). A new direction shorter
  than ``sqrt(machine eps) |G q|`` after the orthogonalisation means the
  space is invariant: the process stops there (the rest of T is zero, and
  ``lambda_max(T) >= 0`` as G is positive semi-definite).

  Args:
    gram: ``v -> G v`` on vectors shaped like ``start`` (arrays or pytrees).
    start: the first vector (not normalised).
    trace: ``tr(G)``, or None where it is not cheap to form.
    iterations: products with G. A traced count (``optax.inject_hyperparams``)
      runs as a loop of at most :data:`TRACED_COUNT_CAPACITY` steps.
    unroll: a Python loop rather than a ``fori_loop`` (static counts).
    certified: ``() -> bool``, True only where ``lambda_max(G) <= 1``; run
      where the trace test fails, before the Lanczos process.

  Returns:
    The scalar w in (0, 1].
  """
  leaves = jax.tree.leaves(start)
  dtype = jnp.result_type(*leaves)
  # The tridiagonal and its eigenvalues in at least float32: LAPACK has no
  # half-precision eigensolver, and bfloat16 scalars would lose the estimate.
  scalar = jnp.promote_types(dtype, jnp.float32)
  static = isinstance(iterations, int)
  capacity = iterations if static else TRACED_COUNT_CAPACITY

  def normalised(v):
    return tree_scale(1.0 / (jnp.sqrt(tree_vdot(v, v)) + jnp.finfo(dtype).tiny), v)

  def projections(basis, w):  # q_m^T w for every basis vector: (capacity,)
    parts = [jnp.sum((b * x[None]).reshape(capacity, -1), axis=1)
             for b, x in zip(jax.tree.leaves(basis), jax.tree.leaves(w))]
    return sum(parts[1:], parts[0]).astype(scalar)

  def remove(basis, w, coeffs):  # w - sum_m coeffs_m q_m
    return jax.tree.map(
        lambda b, x: x - jnp.tensordot(coeffs.astype(x.dtype), b, axes=1), basis, w)

  def step(j, carry):
    basis, diagonal, off_diagonal = carry
    q = jax.tree.map(lambda b: b[j], basis)
    w = jax.tree.map(lambda g, x: g.astype(x.dtype), gram(q), q)
    alpha = tree_vdot(q, w).astype(scalar)
    size = jnp.sqrt(tree_vdot(w, w)).astype(scalar)
    for _ in range(2):  # against every earlier vector, twice (Kahan's "twice is enough")
      w = remove(basis, w, projections(basis, w))
    beta = jnp.sqrt(tree_vdot(w, w)).astype(scalar)
    beta = jnp.where(beta > jnp.sqrt(jnp.finfo(dtype).eps) * size, beta, 0.0)
    following = tree_scale(jnp.where(beta > 0, 1.0 / jnp.where(beta > 0, beta, 1.0), 0.0), w)
    basis = jax.tree.map(lambda b, x: b.at[j + 1].set(x.astype(b.dtype), mode="drop"),
                         basis, following)
    return basis, diagonal.at[j].set(alpha), off_diagonal.at[j].set(beta)

  def lanczos():
    first = normalised(start)
    basis = jax.tree.map(lambda x: jnp.zeros((capacity,) + x.shape, x.dtype).at[0].set(x), first)
    carry = (basis, jnp.zeros(capacity, scalar), jnp.zeros(capacity, scalar))
    if static and unroll:
      for j in range(capacity):
        carry = step(j, carry)
    else:
      count = capacity if static else jnp.minimum(iterations, capacity)
      carry = jax.lax.fori_loop(0, count, step, carry)
    _, diagonal, off_diagonal = carry
    tridiagonal = (jnp.diag(diagonal) + jnp.diag(off_diagonal[:-1], 1) +
                   jnp.diag(off_diagonal[:-1], -1))
    largest = symmetric_eigh.symmetric_eigh(tridiagonal)[0][-1]
    return (1.0 / jnp.maximum(largest, 1.0)).astype(dtype)

  ones = lambda: jnp.ones([], dtype)
  estimate = lanczos
  if certified is not None:
    estimate = lambda: jax.lax.cond(certified(), ones, lanczos)
  if trace is None:
    return estimate()
  # tr(G) <= 1 bounds lambda_max(G) <= 1: the model is convex, w = 1.
  return jax.lax.cond(trace <= 1.0, ones, estimate)


def guarded_factor_update(factor_next: State, q_x: State, s: jax.Array,
                          pull: Callable[[State], Any], solve: Callable[[Any], Any],
                          push: Callable[[Any], State], iterations: int,
                          gram: Callable[[jax.Array], jax.Array] | None = None,
                          vxx_reg: Any = 0.0, jacobian_trace: jax.Array | None = None,
                          convexity_test: ConvexityTest | None = None
                          ) -> tuple[jax.Array, State]:
  """``(w, Z)``: the coupling scale and the new factor ``Z = q_x (I - w^2 S)_+^{1/2}``.

  Without the Tikhonov term (``vxx_reg = 0``) the coupling matrix of
  :func:`coupling_scale` lives on the columns of Z' (vectors (B, r)) and its
  trace is ``sum_i tr(S^(i))``. With it, ``R = [Z', sqrt(eps) I]`` adds a
  state-shaped part: ``v = (c, X)`` and
  ``G v = (Z'^T y, sqrt(eps) y)``, ``y = push(solve(pull(Z' c + sqrt(eps) X)))``,
  with ``tr(G) = sum_i tr(S^(i)) + eps sum_i tr(F_theta^(i) M^-1 F_theta^(i)T)``
  where the caller knows the second trace.

  Args:
    factor_next: Z' at t+1.
    q_x: ``F_x^T Z'`` column by column.
    s: per-sample ``S = q_theta^T M^-1 q_theta`` (B, r, r).
    pull: ``c -> F_theta^T c`` (the stage's players' VJP).
    solve: ``g -> M^-1 g``.
    push: ``d -> F_theta d`` (the players' JVP).
    iterations: Lanczos steps (products with G) of :func:`coupling_scale`.
    gram: ``v -> G v`` on the columns of Z' where the caller has a cheaper
      form of it (from per-sample gradients, :class:`quadratic_forms.Form`);
      by default ``Z'^T push(solve(pull(Z' v)))``. Used with ``vxx_reg = 0``.
    vxx_reg: eps, the value Hessian's Tikhonov term.
    jacobian_trace: ``sum_i tr(F_theta^(i) M^-1 F_theta^(i)T)`` where cheap,
      else None (with ``vxx_reg > 0`` the Lanczos process then always runs).
    convexity_test: a certificate of ``lambda_max(G) <= 1`` (its ``certifies``
      called with 1: G here is already scaled), tried before the Lanczos
      process where it costs at most half of it (``products <=
      iterations / 2``; a traced count taken at its capacity). Used with
      ``vxx_reg = 0``.
  """
  diag = jnp.diagonal(s, axis1=-2, axis2=-1)
  columns_start = jnp.sqrt(jnp.maximum(diag, 0.0)) + 1e-3
  trace = jnp.sum(diag)
  if is_zero(vxx_reg):
    if gram is None:
      def gram(v):
        return factor_transpose_apply(factor_next,
                                      push(solve(pull(factor_apply(factor_next, v)))))
    certified = None
    budget = iterations if isinstance(iterations, int) else TRACED_COUNT_CAPACITY
    if convexity_test is not None and convexity_test.products <= budget / 2:
      certified = lambda: convexity_test.certifies(jnp.ones([], s.dtype))
    scale = coupling_scale(gram, columns_start, trace, iterations, certified=certified)
  else:
    root = jnp.sqrt(vxx_reg)

    def extended_gram(v):
      columns, states = v
      y = push(solve(pull(tree_add(factor_apply(factor_next, columns),
                                   tree_scale(root, states)))))
      return factor_transpose_apply(factor_next, y), tree_scale(root, y)

    states_start = jax.tree.map(lambda z: jnp.zeros(z.shape[:1] + z.shape[2:], z.dtype),
                                factor_next)
    # Unrolled up to 16 iterations: XLA's CPU backend runs the kernel-gradient
    # convolutions of the stage's VJP several times slower inside a loop body
    # (docs/PERFORMANCE.md, "Design choices"); more iterations would make the
    # program too long to compile.
    # A traced count (optax.inject_hyperparams) can only run as a loop.
    unroll = isinstance(iterations, int) and iterations <= 16
    scale = coupling_scale(extended_gram, (columns_start, states_start),
                           None if jacobian_trace is None else trace + vxx_reg * jacobian_trace,
                           iterations, unroll=unroll)
  return scale, mix_columns(q_x, psd_sqrt_of_identity_minus(scale * scale * s))


def psd_sqrt_of_identity_minus(s: jax.Array) -> jax.Array:
  """R with R R^T = (I - S)_+ for a batch of symmetric r x r matrices S.

  The clamp at zero keeps the factor real when the approximate curvature
  over-shoots (S > I); it never takes the square root of a negative number.
  """
  r = s.shape[-1]
  if r == 1:
    return jnp.sqrt(jnp.maximum(1.0 - s, 0.0))
  m = jnp.eye(r, dtype=s.dtype) - 0.5 * (s + jnp.swapaxes(s, -1, -2))
  w, u = symmetric_eigh.symmetric_eigh(m)
  return u * jnp.sqrt(jnp.maximum(w, 0.0))[..., None, :]


def mix_columns(factor: State, mixing: jax.Array) -> State:
  """Z R per sample: columns recombined by the (B, r, r') matrix R."""
  def mix(z):
    r = mixing.astype(z.dtype)
    if r.shape[1:] == (1, 1):
      return z * expand_trailing(r[:, 0], z.ndim)
    # sum_r z[b, r, None, ...] R[b, r, s]
    return jnp.sum(jnp.expand_dims(z, 2) * expand_trailing(r, z.ndim + 1), axis=1)

  return jax.tree.map(mix, factor)
