"""Diagonal and dense curvatures C ~ Q_theta_theta of a player (DGNOpt eq. 13; DDPNOpt Table 2).

Each is a :class:`curvature_base.Curvature` (the protocol the solver calls,
and how an update uses ``C``); the Kronecker-factored ones are in
:mod:`kronecker`, all of them side by side in docs/ALGORITHM.md §5.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

from dgnopt_jax._src import curvature_base
from dgnopt_jax._src import guards
from dgnopt_jax._src import kronecker

Params = Any


@dataclasses.dataclass(frozen=True)
class Identity(curvature_base.Curvature):
  """C = I: DDP-SGD (DDPNOpt Table 2); with no feedback, plain SGD (Theorem 6)."""

  name = "identity"

  def init(self, theta: Params, player: Any = None) -> tuple:
    del theta, player
    return ()

  def update(self, state, q_theta, ggn_matvec=None, statistics=None):
    del q_theta, ggn_matvec, statistics
    return state, ()

  def solve(self, step, v: Params, damping) -> Params:
    del step
    return jax.tree.map(lambda x: x / (1.0 + damping), v)

  def inverse_diagonal(self, step, damping, like: Params) -> Params:
    del step
    return jax.tree.map(lambda x: jnp.asarray(1.0 / (1.0 + damping), x.dtype), like)


class _Diagonal(curvature_base.Curvature):
  """A curvature ``C = diag(c)`` with ``c = self._diag(step)``: elementwise solves."""

  def _diag(self, step: Any) -> Params:
    raise NotImplementedError

  def solve(self, step, v: Params, damping) -> Params:
    return jax.tree.map(lambda x, d: x * d, v, self.inverse_diagonal(step, damping, v))

  def inverse_diagonal(self, step, damping, like: Params) -> Params:
    del like
    return jax.tree.map(lambda c: kronecker.safe_reciprocal(c + damping), self._diag(step))


class RMSPropState(NamedTuple):
  nu: Params
  count: jax.Array


@dataclasses.dataclass(frozen=True)
class RMSProp(_Diagonal):
  """C = diag(sqrt(E[Q_theta^2]) ...): DDP-RMSprop (DGNOpt eq. 13).

  The statistics are the exponential moving average of ``Q_theta * Q_theta``
  with the conventions of ``optax.rmsprop`` (same argument names and defaults),
  so that the open-loop solver with this curvature is exactly ``optax.rmsprop``.
  """

  decay: float = 0.9
  eps: float = 1e-8
  initial_scale: float = 0.0
  eps_in_sqrt: bool = True
  bias_correction: bool = False
  name = "rmsprop"

  def __post_init__(self):
    guards.check_coefficient("rmsprop", "decay", self.decay, 0.0, 1.0)
    guards.check_coefficient("rmsprop", "eps", self.eps, 0.0)
    guards.check_coefficient("rmsprop", "initial_scale", self.initial_scale, 0.0)

  def init(self, theta: Params, player: Any = None) -> RMSPropState:
    del player
    nu = jax.tree.map(lambda x: jnp.full_like(x, self.initial_scale), theta)
    return RMSPropState(nu, jnp.zeros([], jnp.int32))

  def update(self, state: RMSPropState, q_theta, ggn_matvec=None, statistics=None):
    del ggn_matvec, statistics
    nu = jax.tree.map(lambda g, n: (1 - self.decay) * g ** 2 + self.decay * n,
                      q_theta, state.nu)
    count = state.count + 1
    nu_hat = nu
    if self.bias_correction:
      nu_hat = jax.tree.map(lambda n: n / (1 - self.decay ** count).astype(n.dtype), nu)
    return RMSPropState(nu, count), nu_hat

  def _diag(self, nu_hat):
    if self.eps_in_sqrt:
      return jax.tree.map(lambda n: jnp.sqrt(n + self.eps), nu_hat)
    return jax.tree.map(lambda n: jnp.sqrt(n) + self.eps, nu_hat)


class AdamState(NamedTuple):
  mu: Params
  nu: Params
  count: jax.Array


@dataclasses.dataclass(frozen=True)
class Adam(_Diagonal):
  """C = diag(sqrt(nu_hat + eps_root) + eps), direction mu_hat: DDP-Adam.

  Moments of ``Q_theta`` with ``optax.adam``'s conventions, so that the
  open-loop solver with this curvature is exactly ``optax.adam``.
  """

  b1: float = 0.9
  b2: float = 0.999
  eps: float = 1e-8
  eps_root: float = 0.0
  name = "adam"

  def __post_init__(self):
    for field, value in (("b1", self.b1), ("b2", self.b2)):
      guards.check_coefficient("adam", field, value, 0.0, 1.0)
    guards.check_coefficient("adam", "eps", self.eps, 0.0)
    guards.check_coefficient("adam", "eps_root", self.eps_root, 0.0)

  def init(self, theta: Params, player: Any = None) -> AdamState:
    del player
    zeros = jax.tree.map(jnp.zeros_like, theta)
    return AdamState(zeros, zeros, jnp.zeros([], jnp.int32))

  def update(self, state: AdamState, q_theta, ggn_matvec=None, statistics=None):
    del ggn_matvec, statistics
    mu = jax.tree.map(lambda g, m: (1 - self.b1) * g + self.b1 * m, q_theta, state.mu)
    nu = jax.tree.map(lambda g, n: (1 - self.b2) * g ** 2 + self.b2 * n, q_theta, state.nu)
    count = state.count + 1
    mu_hat = jax.tree.map(lambda m: m / (1 - self.b1 ** count).astype(m.dtype), mu)
    nu_hat = jax.tree.map(lambda n: n / (1 - self.b2 ** count).astype(n.dtype), nu)
    return AdamState(mu, nu, count), (mu_hat, nu_hat)

  def direction(self, step, q_theta: Params) -> Params:
    del q_theta
    return step[0]

  def _diag(self, step):
    return jax.tree.map(lambda n: jnp.sqrt(n + self.eps_root) + self.eps, step[1])


@dataclasses.dataclass(frozen=True)
class DenseExact(curvature_base.Curvature):
  """C = F_theta^T (V_xx + eps I) F_theta + l_theta_theta, materialised: vanilla DDP.

  The exact Gauss-Newton curvature of the player's Bellman objective
  (DGNOpt eq. 20, dynamics linearised), built column by column from
  Jacobian-vector products. Its symmetric eigendecomposition is clamped at
  zero (indefinite directions get no curvature) and pseudo-inverted, so a
  singular curvature never produces inf or NaN. For tiny players only:
  ``check`` rejects players with more than ``max_params`` parameters.
  """

  max_params: int = 4096
  name = "dense"
  needs_value_hessian = True
  default_damping = 1e-3

  def check(self, player, theta) -> None:
    size = sum(x.size for x in jax.tree.leaves(theta))
    if size > self.max_params:
      raise ValueError(
          f"curvature 'dense' cannot handle player {player.name!r}: it has {size} "
          f"parameters and the dense curvature materialises a {size}x{size} matrix "
          f"(limit max_params={self.max_params}); use identity, rmsprop or adam")

  def init(self, theta: Params, player: Any = None) -> tuple:
    del theta, player
    return ()

  def joint(self, stage, thetas: tuple) -> bool:
    """A stage's players are solved jointly, cross blocks kept (GR)."""
    del thetas
    return stage.num_players > 1

  def init_joint(self, stage, thetas: tuple) -> tuple:
    del stage, thetas
    return ()

  def update(self, state, q_theta, ggn_matvec: Callable[[Params], Params], statistics=None):
    del statistics
    flat, unravel = ravel_pytree(q_theta)
    basis = jnp.eye(flat.size, dtype=flat.dtype)
    cols = jax.vmap(lambda e: ravel_pytree(ggn_matvec(unravel(e)))[0])(basis)
    u, w = kronecker.psd_eigh(cols)
    return state, (u, w)

  def solve(self, step, v: Params, damping) -> Params:
    u, w = step  # float32 or wider, also for half-precision players
    flat, unravel = ravel_pytree(v)
    solved = u @ (kronecker.safe_reciprocal(w + damping) * (u.T @ flat.astype(u.dtype)))
    return unravel(solved.astype(flat.dtype))


def identity() -> Identity:
  """Identity curvature (DDP-SGD)."""
  return Identity()


def rmsprop(decay: float = 0.9, eps: float = 1e-8, *, initial_scale: float = 0.0,
            eps_in_sqrt: bool = True, bias_correction: bool = False) -> RMSProp:
  """RMSprop curvature built from Q_theta (DDP-RMSprop); optax.rmsprop's conventions."""
  return RMSProp(decay, eps, initial_scale, eps_in_sqrt, bias_correction)


def adam(b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8,
         eps_root: float = 0.0) -> Adam:
  """Adam curvature and first moment built from Q_theta (DDP-Adam); optax.adam's conventions."""
  return Adam(b1, b2, eps, eps_root)


def dense(max_params: int = 4096) -> DenseExact:
  """Exact (Gauss-Newton) dense curvature per player: vanilla DDP, tiny networks only."""
  return DenseExact(max_params)


_BY_NAME = {"identity": identity, "sgd": identity, "rmsprop": rmsprop, "adam": adam,
            "kfac": kronecker.kfac, "ekfac": kronecker.ekfac, "dense": dense}


def get_curvature(curvature: Any):
  """Resolves a curvature object or a name: identity/sgd, rmsprop, adam, kfac, ekfac, dense."""
  if isinstance(curvature, str):
    if curvature not in _BY_NAME:
      raise ValueError(f"unknown curvature {curvature!r}; known: {sorted(_BY_NAME)}")
    return _BY_NAME[curvature]()
  if isinstance(curvature, type) or (callable(curvature) and not hasattr(curvature, "init")):
    what = "class" if isinstance(curvature, type) else "function"
    name = getattr(curvature, "__name__", repr(curvature))
    by_class = {type(make()).__name__: key for key, make in _BY_NAME.items() if key != "sgd"}
    key = by_class.get(name, name if name in _BY_NAME else "adam")
    raise TypeError(
        f"curvature must be a curvature object or a name, got the {what} {name}: pass an "
        f"instance such as dgnopt.curvature.{key}() or the name {key!r}")
  if not isinstance(curvature, curvature_base.Curvature):
    raise TypeError(f"curvature {curvature!r} is not a dgnopt_jax.curvature.Curvature: "
                    f"subclass it and implement init, update and solve, or pass a name "
                    f"{sorted(_BY_NAME)}")
  return curvature
