"""Kronecker-factored curvatures from value derivatives: DDP-KFAC and DDP-EKFAC.

For a dense or convolutional player with augmented inputs ``a`` (the layer
input and a 1 for the bias; image patches for a convolution) and value
derivatives ``g = V_h`` at its pre-activation (GT-DDP eq. 43), the curvature
is the Kronecker product of two running averages (GT-DDP eq. 44, DDPNOpt
eq. 15, with V_h in place of the loss gradient)::

    C = A (x) G,   A = E_{i,p}[a_ip a_ip^T],   G = E_i[sum_p g~_ip g~_ip^T]

with ``g~ = B g`` the derivative of the per-sample value and ``p`` a
convolution's output positions (Grosse & Martens' spatially uncorrelated
approximation): ``C`` approximates the empirical Fisher
``E_i[Q_theta^(i) Q_theta^(i)T]`` of the per-sample Bellman objectives. With
``A = U_A diag(lambda_A) U_A^T`` and ``G = U_G diag(lambda_G) U_G^T``, the
damped solve is exact Tikhonov in the Kronecker eigenbasis::

    (C + damping I)^-1 vec(V) = vec(U_A [(U_A^T V U_G) / (lambda_A lambda_G^T + damping)] U_G^T)

for the player's params as the matrix ``V = [kernel; bias]`` (``Ka x O``).
The eigendecompositions are refreshed every ``inverse_every`` steps; the
batch's statistics are folded in every ``statistics_every`` steps and on
every refresh step (kfac-jax's curvature update period), as forming ``A``
(``kh * kw`` times a convolution's own arithmetic) is the largest single
cost of a step on convolutions. EKFAC (George et al. 2018) keeps the
eigenbasis and replaces ``lambda_A lambda_G^T`` by the running second
moments of the per-sample gradients in it, ``s = E_i[(U_A^T Q_W^(i) U_G)^2]``
(restarted at every refresh). Players that are not a ready-made dense or
conv layer get the diagonal of the same empirical Fisher, ``E_i[Q_theta^(i)^2]``.

Cooperative players (GR with ``cross_terms``) are stacked into one augmented
layer ``h^ = w x^`` (GT-DDP eq. 49) factored as ``A_ww (x) G_ww`` with the
cross blocks ``A_uv = E[a_u a_v^T]``, ``G_uv = E[g_u g_v^T]`` (eq. 50); the
gains are the players' diagonal blocks of the joint solve::

    [k_1 .. k_N] = blocks( (A_ww (x) G_ww + damping I)^-1 vec(blockdiag(d_1, ..., d_N)) )

With ``damping -> 0`` these are GT-DDP eq. 18 / DGNOpt Prop. 5 (Schur
complements of the factors, eq. 16-17; DGNOpt eq. 14-15, 31). Players that
provably share their statistics (``Stage.shared_statistics``, GT-DDP Fig. 7a)
have singular stacked factors and every block equal to ``K = U diag(e) U^T``;
their system ``(J_N (x) K + damping I)^-1`` (``J_N`` all ones) is solved
exactly in K's eigenbasis::

    k_u = U [ mean_v(V~_v) / (N e + damping) + (V~_u - mean_v(V~_v)) / damping ] U^T

(for two players GT-DDP Cor. 7, eq. 24). All of it: docs/ALGORITHM.md §5.
"""

from __future__ import annotations

import dataclasses
import numbers
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from dgnopt_jax._src import curvature_base
from dgnopt_jax._src import guards
from dgnopt_jax._src import layer_taps
from dgnopt_jax._src import linearise as lin
from dgnopt_jax._src import quadratic_forms
from dgnopt_jax._src import symmetric_eigh

Params = Any

# Steps between updates of the Kronecker factors' running averages (the
# default; the refresh steps always update): cheaper steps, and training
# reached the same accuracy as with every step's batch (docs/PERFORMANCE.md).
STATISTICS_EVERY = 5


def safe_reciprocal(x: jax.Array) -> jax.Array:
  """1/x where x > 0, else 0 (the pseudo-inverse of a non-negative diagonal)."""
  tiny = jnp.finfo(x.dtype).tiny
  return jnp.where(x > tiny, 1.0 / jnp.where(x > tiny, x, 1.0), 0.0)


class KroneckerState(NamedTuple):
  """Running Kronecker statistics of one player (or of a cooperative stage).

  Attributes:
    input_cov: running average of ``A`` (Ka x Ka).
    output_cov: running average of ``G`` (O x O).
    input_basis, input_eigenvalues: eigendecomposition of the debiased ``A``
      at the last refresh.
    output_basis, output_eigenvalues: likewise for ``G``.
    eigenbasis_moments: EKFAC's running ``s`` (Ka x O) since the last refresh.
    count: steps so far.
    updates: steps whose statistics were folded into ``input_cov`` and
      ``output_cov`` (their bias correction).
    moments_count: updates of ``eigenbasis_moments`` since the last refresh.
  """

  input_cov: jax.Array
  output_cov: jax.Array
  input_basis: jax.Array
  input_eigenvalues: jax.Array
  output_basis: jax.Array
  output_eigenvalues: jax.Array
  eigenbasis_moments: jax.Array
  count: jax.Array
  updates: jax.Array
  moments_count: jax.Array


class KroneckerStep(NamedTuple):
  """What a step's solves need: the eigenbasis and the curvature in it (Ka x O)."""

  input_basis: jax.Array
  output_basis: jax.Array
  eigenvalues: jax.Array


class SharedKroneckerState(KroneckerState):
  """Statistics of a stage whose players share one Kronecker factorisation."""


class SharedKroneckerStep(KroneckerStep):
  """The shared eigenbasis and eigenvalues of a stage with shared statistics."""


class DiagonalState(NamedTuple):
  second_moment: Params
  count: jax.Array


def _debias(ema: Any, decay: float, count: jax.Array) -> Any:
  return jax.tree.map(lambda m: m / (1 - jnp.asarray(decay, m.dtype) ** count), ema)


def _stacked_output_size(v: Params) -> int:
  """``O`` of a player of a cooperative stage: its bias's size, else its kernel's last axis.

  :meth:`Kronecker.joint` stacks a kernel with several output axes only with its bias.
  """
  return v["bias"].size if "bias" in v else v["kernel"].shape[-1]


def psd_eigh(matrix: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(U, max(lambda, 0)) of the symmetric part of ``matrix``: its PSD projection.

  Half-precision matrices are decomposed in float32 (no backend has a
  bfloat16/float16 eigensolver, and their rounding would swamp small
  eigenvalues); the result is float32 then.
  """
  matrix = matrix.astype(jnp.promote_types(matrix.dtype, jnp.float32))
  w, u = symmetric_eigh.symmetric_eigh(0.5 * (matrix + matrix.T))
  return u, jnp.maximum(w, 0.0)


@dataclasses.dataclass(frozen=True)
class Kronecker(curvature_base.Curvature):
  """KFAC / EKFAC curvature built from value derivatives (see module docstring).

  Attributes:
    decay: running-average decay of the statistics.
    inverse_every: steps between eigendecompositions of the factors (the
      first step always decomposes).
    statistics_every: steps between updates of the factors' running averages
      (and of EKFAC's second moments); the refresh steps always update them,
      and the first step is one. The diagonal curvature of players without
      Kronecker structure takes in every step's batch.
    eigenbasis_rescaling: EKFAC's second moments in the eigenbasis instead of
      the Kronecker eigenvalues.
    max_factor_size: largest factor dimension accepted (each refresh costs an
      eigendecomposition of that size). The default admits ResNet18/34's
      last 3x3 convolutions (512 channels: a 4608-row input factor).
  """

  decay: float = 0.95
  inverse_every: int = 10
  eigenbasis_rescaling: bool = False
  max_factor_size: int = 8192
  statistics_every: int = STATISTICS_EVERY
  needs_statistics = True
  # The empirical Fisher shrinks with the gradients; a damping of this size keeps
  # the natural-gradient step bounded late in training (measured on DIGITS).
  default_damping = 0.1
  # The factors are low-rank running estimates: an undamped solve steps
  # without bound along their smallest eigenvalues (fne/gr/olne refuse 0).
  needs_damping = True

  def __post_init__(self):
    guards.check_coefficient(self.name, "decay", self.decay, 0.0, 1.0)
    for field in ("inverse_every", "statistics_every"):
      value = getattr(self, field)
      if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{field} must be a positive integer (a number of steps), got {value!r}")

  @property
  def name(self) -> str:
    return "ekfac" if self.eigenbasis_rescaling else "kfac"

  # -- players ---------------------------------------------------------------

  def check(self, player, theta) -> None:
    if not layer_taps.has_kronecker_structure(player, theta):
      return
    rows, cols = layer_taps.matrix_shape(theta, player.layer.output_size)
    if max(rows, cols) > self.max_factor_size:
      raise ValueError(
          f"curvature {self.name!r} cannot handle player {player.name!r}: its Kronecker "
          f"factors are {rows}x{rows} and {cols}x{cols}, above max_factor_size="
          f"{self.max_factor_size}; raise the limit or use a diagonal curvature")

  def _kronecker_init(self, layers: tuple, thetas: tuple) -> KroneckerState:
    """Fresh statistics of the players' stacked layer (one player: its own)."""
    shapes = [layer_taps.matrix_shape(t, l.output_size) for l, t in zip(layers, thetas)]
    rows, cols = sum(r for r, _ in shapes), sum(c for _, c in shapes)
    # Factors of half-precision players are kept (and decomposed) in float32.
    dtype = jnp.promote_types(thetas[0]["kernel"].dtype, jnp.float32)
    eye = lambda n: jnp.eye(n, dtype=dtype)
    zero = jnp.zeros([], jnp.int32)
    return KroneckerState(jnp.zeros((rows, rows), dtype), jnp.zeros((cols, cols), dtype),
                          eye(rows), jnp.zeros((rows,), dtype), eye(cols),
                          jnp.zeros((cols,), dtype), jnp.zeros((rows, cols), dtype), zero, zero,
                          zero)

  def init(self, theta: Params, player: Any = None) -> KroneckerState | DiagonalState:
    if layer_taps.has_kronecker_structure(player, theta):
      return self._kronecker_init((player.layer,), (theta,))
    return DiagonalState(jax.tree.map(jnp.zeros_like, theta), jnp.zeros([], jnp.int32))

  def joint(self, stage: Any, thetas: tuple) -> bool:
    """Whether the players can share one augmented layer (same output positions).

    Stacked factors larger than ``max_factor_size`` fall back to per-player factors.
    """
    players = stage.players
    if len(players) < 2 or not all(layer_taps.has_kronecker_structure(p, t)
                                   for p, t in zip(players, thetas)):
      return False
    layers = [p.layer for p in players]
    shapes = [layer_taps.matrix_shape(t, l.output_size) for l, t in zip(layers, thetas)]
    if not stage.shared_statistics and max(sum(r for r, _ in shapes),
                                           sum(c for _, c in shapes)) > self.max_factor_size:
      return False
    if all(l.kind == "dense" for l in layers):
      # The joint solve splits its columns by each player's last kernel axis
      # or bias (:meth:`solve`): a kernel with several output axes needs its bias.
      return all(len(l.feature_shape) == 1 or l.use_bias for l in layers)
    return (all(l.kind == "conv" and l.padding == "SAME" for l in layers) and
            len({tuple(l.strides) for l in layers}) == 1)

  def init_joint(self, stage: Any, thetas: tuple) -> KroneckerState:
    layers = tuple(p.layer for p in stage.players)
    if stage.shared_statistics:
      return SharedKroneckerState(*self._kronecker_init(layers[:1], thetas[:1]))
    return self._kronecker_init(layers, thetas)

  # -- statistics --------------------------------------------------------------

  def _update_kronecker(self, state: KroneckerState,
                        stats: layer_taps.KroneckerStatistics) -> tuple:
    a = stats.inputs.astype(state.input_cov.dtype)
    g = stats.output_grads.astype(state.input_cov.dtype)
    batch, positions = a.shape[0], a.shape[1]
    count = state.count + 1
    refresh = (count - 1) % self.inverse_every == 0
    collect = refresh | ((count - 1) % self.statistics_every == 0)
    ema = lambda old, new: self.decay * old + (1 - self.decay) * new

    def folded_factors(_):
      # One contracted axis (samples x positions): XLA's CPU backend runs a
      # dot contracting two axes slower.
      rows_a, rows_g = a.reshape(-1, a.shape[-1]), g.reshape(-1, g.shape[-1])
      input_cov = (rows_a.T @ rows_a) / (batch * positions)
      output_cov = batch * (rows_g.T @ rows_g)
      return ema(state.input_cov, input_cov), ema(state.output_cov, output_cov)

    new_input, new_output = self._on_statistics_steps(
        collect, folded_factors, (state.input_cov, state.output_cov))
    updates = state.updates + collect.astype(state.updates.dtype)

    def decompose(_):
      ua, la = psd_eigh(_debias(new_input, self.decay, updates))
      ug, lg = psd_eigh(_debias(new_output, self.decay, updates))
      return ua, la, ug, lg

    def keep(_):
      return (state.input_basis, state.input_eigenvalues, state.output_basis,
              state.output_eigenvalues)

    ua, la, ug, lg = jax.lax.cond(refresh, decompose, keep, None)
    moments, moments_count = state.eigenbasis_moments, state.moments_count
    if self.eigenbasis_rescaling:

      def folded_moments(_):
        if positions == 1:
          a_rot, g_rot = a[:, 0] @ ua, g[:, 0] @ ug
          batch_moments = batch * jnp.einsum("bi,bo->io", a_rot ** 2, g_rot ** 2)
        else:
          # Per-sample gradients rotated after the sum over positions: two
          # large matrix products instead of rotating the layer inputs
          # (B P Ka^2 multiplications).
          per_sample = jnp.einsum("bpi,bpo->bio", a, g)
          per_sample = jnp.einsum("ij,bio->bjo", ua, per_sample) @ ug
          batch_moments = batch * jnp.sum(per_sample ** 2, axis=0)
        return ema(jnp.where(refresh, jnp.zeros_like(moments), moments), batch_moments)

      moments = self._on_statistics_steps(collect, folded_moments, moments)
      moments_count = (jnp.where(refresh, 0, moments_count) +
                       collect.astype(moments_count.dtype))
      eigenvalues = _debias(moments, self.decay, moments_count)
    else:
      eigenvalues = jnp.outer(la, lg)
    new_state = KroneckerState(new_input, new_output, ua, la, ug, lg, moments, count, updates,
                               moments_count)
    return new_state, KroneckerStep(ua, ug, eigenvalues)

  def _on_statistics_steps(self, collect: jax.Array, folded: Any, kept: Any) -> Any:
    """``folded(None)`` on the steps that collect statistics, else ``kept``.

    A conditional, so that the other steps skip the products.
    """
    if self.statistics_every == 1:
      return folded(None)
    return jax.lax.cond(collect, folded, lambda _: kept, None)

  def update(self, state, q_theta, ggn_matvec=None, statistics=None):
    """New statistics from this step's per-sample ``a``, ``g`` (or gradients)."""
    del q_theta, ggn_matvec
    if isinstance(state, DiagonalState):
      leaves = jax.tree.leaves(statistics)
      batch = leaves[0].shape[0]
      count = state.count + 1
      moment = jax.tree.map(
          lambda m, q: self.decay * m + (1 - self.decay) * batch * jnp.sum(q * q, axis=0),
          state.second_moment, statistics)
      return DiagonalState(moment, count), _debias(moment, self.decay, count)
    if isinstance(state, SharedKroneckerState):  # every player has the first one's statistics
      new_state, step = self._update_kronecker(state, statistics[0])
      return SharedKroneckerState(*new_state), SharedKroneckerStep(*step)
    if not isinstance(statistics, layer_taps.KroneckerStatistics):  # a cooperative stage: stacked
      statistics = layer_taps.KroneckerStatistics(
          *(jnp.concatenate(parts, axis=-1) for parts in zip(*statistics)))
    return self._update_kronecker(state, statistics)

  # -- solves --------------------------------------------------------------------

  def _solve_matrix(self, step: KroneckerStep, mat: jax.Array, damping) -> jax.Array:
    rotated = step.input_basis.T @ mat.astype(step.input_basis.dtype) @ step.output_basis
    rotated = rotated * safe_reciprocal(step.eigenvalues + damping)
    return (step.input_basis @ rotated @ step.output_basis.T).astype(mat.dtype)

  def solve(self, step, v: Params, damping) -> Params:
    """``(C + damping I)^-1 v``; for a cooperative stage ``v`` is a tuple per player.

    ``v`` is solved in its matrix view ``[kernel; bias]`` (Ka, O)
    (:func:`layer_taps.to_matrix`), ``O`` the width of the output factor;
    in a cooperative stage player ``n``'s ``O_n`` is its bias's size, or its
    kernel's last axis (:meth:`joint` stacks only such players).
    """
    if not isinstance(step, KroneckerStep):
      return jax.tree.map(lambda x, d: x * safe_reciprocal(d + damping), v, step)
    if isinstance(step, SharedKroneckerStep):
      return self._solve_shared(step, v, damping)
    if isinstance(v, tuple):  # a cooperative stage: one vector per player
      mats = [layer_taps.to_matrix(vn, _stacked_output_size(vn)) for vn in v]
      solved = self._solve_matrix(step, jax.scipy.linalg.block_diag(*mats), damping)
      out, r, c = [], 0, 0
      for m, vn in zip(mats, v):  # the diagonal blocks
        out.append(layer_taps.from_matrix(solved[r:r + m.shape[0], c:c + m.shape[1]], vn))
        r, c = r + m.shape[0], c + m.shape[1]
      return tuple(out)
    mat = layer_taps.to_matrix(v, step.output_basis.shape[0])
    return layer_taps.from_matrix(self._solve_matrix(step, mat, damping), v)

  def _solve_shared(self, step: SharedKroneckerStep, v: tuple, damping) -> tuple:
    """``(J_N (x) K + damping I)^-1`` on the players' vectors, in K's eigenbasis."""
    dtype = step.input_basis.dtype
    outputs = step.output_basis.shape[0]  # every player's: they share their statistics
    rotated = [step.input_basis.T @ layer_taps.to_matrix(vn, outputs).astype(dtype) @
               step.output_basis for vn in v]
    mean = sum(rotated) / len(rotated)
    common = mean * safe_reciprocal(len(rotated) * step.eigenvalues + damping)
    out = []
    for r, vn in zip(rotated, v):
      solved = common + (r - mean) * safe_reciprocal(jnp.asarray(damping, r.dtype))
      solved = step.input_basis @ solved @ step.output_basis.T
      out.append(layer_taps.from_matrix(solved.astype(vn["kernel"].dtype), vn))
    return tuple(out)

  def inverse_diagonal(self, step, damping, like: Params) -> Params | None:
    del like
    if isinstance(step, KroneckerStep):
      return None
    return jax.tree.map(lambda d: safe_reciprocal(d + damping), step)

  # -- quadratic forms -------------------------------------------------------------

  def player_form(self, player, f, n, factor_next, step, damping) -> quadratic_forms.Form:
    """From the factor's taps for a Kronecker player (:func:`kronecker_forms`); else diagonal."""
    if isinstance(step, KroneckerStep):
      return kronecker_forms(f, (n,), factor_next, step, damping)
    return super().player_form(player, f, n, factor_next, step, damping)

  def joint_form(self, f, factor_next, step, damping) -> quadratic_forms.Form:
    """The stage's stacked players from the factor's taps (:func:`kronecker_forms`)."""
    return kronecker_forms(f, tuple(range(len(f.thetas))), factor_next, step, damping)


def kronecker_forms(f: Any, players: tuple[int, ...], factor_next: Any,
                    step: KroneckerStep, damping: jax.Array) -> quadratic_forms.Form:
  """The forms of dense/conv players under a Kronecker curvature, from the factor's taps.

  Per sample and factor column the players' gradients are ``sum_p a_ip g_irp^T``
  (placed block-diagonally when several players share one stacked layer);
  in the eigenbasis, ``S_rs = sum_jk Q~_rjk Q~_sjk / (e_jk + damping)`` with
  ``Q~_r = U_A^T Q_r U_G``. For one dense player (one position) ``Q~_ir =
  a~_i g~_ir^T`` is rank one and never formed:
  ``S_rs = sum_jk a~_j^2 g~_rk g~_sk / (e_jk + damping)`` and
  ``(G v)_ir = g~_ir^T (a~_i^T (D * U))``, ``U = sum_js v_js a~_j g~_js^T``,
  ``D = 1 / (e + damping)``: two (B x Ka) by (Ka x O) products per Lanczos
  step of the convexity safeguard, where the stage's VJP, a Kronecker
  solve and the stage's JVP cost two such products and four rotations; the
  same factors give the safeguard a test cheaper than its Lanczos process
  (:func:`quadratic_forms.rank_one_convexity_test`).
  Otherwise ``(G v)_ir = sum_jk Q~_irjk u_jk / (e_jk + damping)`` with
  ``u = sum_js Q~_js v_js``.
  """
  copies = 1
  if isinstance(step, SharedKroneckerStep):
    # N players with one gradient q each: S = N q^T (N K + damping)^-1 q.
    players, copies = players[:1], len(players)
  stats = jax.vmap(lambda z: layer_taps.statistics(f.fn, f.x, f.thetas, z, players,
                                                   marker=factor_next),
                   in_axes=1, out_axes=1)(factor_next)  # leaves (B, r, P, .)
  inverse = copies * safe_reciprocal(copies * step.eigenvalues + damping)
  dtype = jax.tree.leaves(factor_next)[0].dtype
  if len(players) == 1 and stats[players[0]].inputs.shape[2] == 1:
    a, g = stats[players[0]].inputs[:, 0, 0], stats[players[0]].output_grads[:, :, 0]
    a_rot = a @ step.input_basis  # (B, Ka)
    g_rot = g @ step.output_basis  # (B, r, O)
    s = quadratic_forms.gram_blocks(g_rot, g_rot * ((a_rot * a_rot) @ inverse)[:, None])

    def rank_one_gram(v: jax.Array) -> jax.Array:
      combined = lin.factor_apply(g_rot, v.astype(g_rot.dtype))  # sum_s v_js g~_js: (B, O)
      back = a_rot @ (inverse * (a_rot.T @ combined))  # a~_i^T (D * U): (B, O)
      return lin.per_sample_dot(g_rot, back[:, None], 1).astype(v.dtype)

    return quadratic_forms.Form(
        s.astype(dtype), rank_one_gram,
        convexity_test=quadratic_forms.rank_one_convexity_test(a_rot, g_rot, inverse))
  # Per-sample gradients in the eigenbasis, U_A^T (sum_p a_p g_p^T) U_G: the sum
  # over positions first, then two large matrix products, rather than rotating
  # the layer inputs first (B P Ka^2 multiplications) or g (as wide as all the
  # stacked players' outputs).
  rows = cols = 0
  q = 0.0
  for n in players:
    a, g = stats[n].inputs[:, 0], stats[n].output_grads  # a does not depend on the column
    ka, o = a.shape[-1], g.shape[-1]
    summed = jnp.einsum("bpk,brpo->brko", a, g)
    rotated = jnp.einsum("kj,brko->brjo", step.input_basis[rows:rows + ka], summed)
    q = q + jnp.einsum("brjo,ol->brjl", rotated, step.output_basis[cols:cols + o])
    rows, cols = rows + ka, cols + o

  def gram(v: jax.Array) -> jax.Array:
    return quadratic_forms.apply_gram(q, inverse, v).astype(v.dtype)

  gradients = None
  if len(players) == 1 and copies == 1:
    gradients = quadratic_forms.RotatedGradients(q, step.input_basis, step.output_basis)
  s = quadratic_forms.gram_blocks(q, q * inverse)
  return quadratic_forms.Form(s.astype(dtype), gram, gradients)


def kfac(decay: float = 0.95, inverse_every: int = 10, *, max_factor_size: int = 8192,
         statistics_every: int = STATISTICS_EVERY) -> Kronecker:
  """KFAC curvature from value derivatives (DDP-KFAC; GT-DDP eq. 44).

  Args:
    decay: running-average decay of the factors ``A`` and ``G``, per update.
    inverse_every: steps between eigendecompositions of the factors.
    max_factor_size: largest factor dimension accepted.
    statistics_every: steps between updates of the factors (and on every
      refresh step); 1 folds in every step's batch.

  Returns:
    The curvature, for ``olne``/``fne``/``gr``.
  """
  return Kronecker(decay, inverse_every, False, max_factor_size, statistics_every)


def ekfac(decay: float = 0.95, inverse_every: int = 10, *, max_factor_size: int = 8192,
          statistics_every: int = STATISTICS_EVERY) -> Kronecker:
  """EKFAC curvature from value derivatives (DDP-EKFAC; DDPNOpt eq. 15).

  Args: as :func:`kfac`; ``statistics_every`` also sets how often the second
  moments in the eigenbasis take in a batch.

  Returns:
    The curvature, for ``olne``/``fne``/``gr``.
  """
  return Kronecker(decay, inverse_every, True, max_factor_size, statistics_every)


def statistics_gradient(stats: layer_taps.KroneckerStatistics, like: Params) -> Params:
  """``Q_theta = F_theta^T V_x' = sum_ip a_ip g_ip^T`` from the statistics of ``V_x'``.

  One matrix product over samples and positions of the layer inputs that
  the factor ``E[a a^T]`` needs anyway; for a convolution it replaces the
  VJP's kernel-gradient convolution, several times slower on XLA's CPU
  backend. Shaped like ``like``.
  """
  a, g = stats.inputs, stats.output_grads
  mat = a.reshape(-1, a.shape[-1]).T @ g.reshape(-1, g.shape[-1]).astype(a.dtype)
  return layer_taps.from_matrix(mat.astype(like["kernel"].dtype), like)


def statistics_gradients(stats: tuple, thetas: tuple) -> tuple | None:
  """Every player's ``Q_theta`` from its statistics (:func:`statistics_gradient`), or None.

  None unless every player has :class:`layer_taps.KroneckerStatistics` (the
  others' statistics are their per-sample gradients, no cheaper than a VJP).
  """
  if not all(isinstance(s, layer_taps.KroneckerStatistics) for s in stats):
    return None
  return tuple(statistics_gradient(s, t) for s, t in zip(stats, thetas))


def gather_statistics(f: Any, players: tuple, indices: tuple[int, ...], v_next: Any,
                      marker: Any = None) -> dict:
  """Per-sample statistics under ``V_x'`` for the players ``indices`` of stage ``f``.

  ``{n: KroneckerStatistics}`` for ready-made dense/conv players and
  ``{n: per-sample gradients (B, *theta.shape)}`` for the others. The layer
  inputs are formed after ``marker`` (:func:`layer_taps.statistics`): given
  the factor ``Z'`` that the stage's forms use as theirs, the two form the
  same inputs, which XLA then computes once.
  """
  kron = tuple(n for n in indices
               if layer_taps.has_kronecker_structure(players[n], f.thetas[n]))
  out = layer_taps.statistics(f.fn, f.x, f.thetas, v_next, kron, marker) if kron else {}
  column = jax.tree.map(lambda v: v[:, None], v_next)
  for n in indices:
    if n not in out:
      out[n] = jax.tree.map(lambda q: q[:, 0], f.per_sample_vjp_thetas(column, (n,))[0])
  return out
