"""Multi-armed bandits over a game's alignments: EXP3++ (DGNOpt Alg. 3), uniform, fixed.

A bandit is a triple of pure functions on a pytree state, so that drawing an
arm and learning from its reward run inside a jit-compiled train step:

* ``init() -> state``;
* ``probabilities(state) -> p`` (shape ``(num_arms,)``, the distribution the
  next arm is drawn from);
* ``update(state, arm, reward) -> state`` with a reward in ``[0, 1]``.
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp


class BanditState(NamedTuple):
  """State of a bandit.

  Attributes:
    round: ``k``, the index of the next round (1 before the first update).
    cumulative_loss: ``L_k(m)``, each arm's cumulative importance-weighted loss.
    pulls: how often each arm was drawn.
  """

  round: jax.Array
  cumulative_loss: jax.Array
  pulls: jax.Array


class Bandit(NamedTuple):
  """A bandit as pure functions (see the module docstring)."""

  num_arms: int
  init: Callable[[], BanditState]
  probabilities: Callable[[BanditState], jax.Array]
  update: Callable[[BanditState, jax.Array, jax.Array], BanditState]


def _check_arms(num_arms: int) -> int:
  if int(num_arms) != num_arms or num_arms < 1:
    raise ValueError(f"num_arms must be a positive integer, got {num_arms!r}")
  return int(num_arms)


def _init(num_arms: int) -> BanditState:
  return BanditState(jnp.ones([], jnp.int32), jnp.zeros([num_arms], jnp.float32),
                     jnp.zeros([num_arms], jnp.int32))


def _count(state: BanditState, arm: jax.Array, loss_estimate: jax.Array) -> BanditState:
  one_hot = jax.nn.one_hot(arm, state.pulls.shape[0], dtype=state.cumulative_loss.dtype)
  return BanditState(state.round + 1, state.cumulative_loss + one_hot * loss_estimate,
                     state.pulls + one_hot.astype(state.pulls.dtype))


def exp3pp(num_arms: int, gap_constant: float = 18.0) -> Bandit:
  r"""EXP3++ (Seldin & Slivkins, 2014; DGNOpt Appendix E, Alg. 3), for non-stationary rewards.

  At round ``k`` with cumulative loss estimates ``L_k``:

  .. math::
     \eta_k = \beta_k = \tfrac12\sqrt{\ln M / (k M)},\qquad
     \hat\Delta_k(m) = \min\{1, (L_k(m) - \min_{m'} L_k(m')) / k\},\qquad
     \xi_k(m) = c \ln^2 k / (k \hat\Delta_k(m)^2),

  .. math::
     \epsilon_k(m) = \min\{1/(2M), \beta_k, \xi_k(m)\},\qquad
     \rho_k(m) \propto e^{-\eta_k L_k(m)},\qquad
     \tilde\rho_k(m) = (1 - \textstyle\sum_{m'}\epsilon_k(m'))\rho_k(m) + \epsilon_k(m);

  the drawn arm ``m`` with reward ``r`` adds ``(1 - r)/\tilde\rho_k(m)`` to
  ``L(m)``. ``xi_k(m)`` is infinite where the empirical gap is zero (the
  exploration is then ``min{1/(2M), beta_k}``).

  Args:
    num_arms: M, the number of alignments.
    gap_constant: c in ``xi_k``; the analysis of Seldin & Slivkins uses 18,
      smaller values explore less once a gap shows.

  Returns:
    A :class:`Bandit`.
  """
  num_arms = _check_arms(num_arms)
  if not gap_constant >= 0:
    raise ValueError(f"gap_constant must be >= 0, got {gap_constant!r}")
  log_arms = math.log(num_arms)

  def probabilities(state: BanditState) -> jax.Array:
    k = state.round.astype(state.cumulative_loss.dtype)
    losses = state.cumulative_loss
    rate = 0.5 * jnp.sqrt(log_arms / (k * num_arms))
    gap = jnp.minimum(1.0, (losses - jnp.min(losses)) / k)
    xi = jnp.where(gap > 0, gap_constant * jnp.log(k) ** 2 / (k * jnp.maximum(gap, 1e-30) ** 2),
                   jnp.inf)
    exploration = jnp.minimum(jnp.minimum(1.0 / (2 * num_arms), rate), xi)
    weights = jax.nn.softmax(-rate * losses)
    return (1.0 - jnp.sum(exploration)) * weights + exploration

  def update(state: BanditState, arm: jax.Array, reward: jax.Array) -> BanditState:
    p = probabilities(state)[arm]
    reward = jnp.asarray(reward, state.cumulative_loss.dtype)
    reward = jnp.where(jnp.isfinite(reward), jnp.clip(reward, 0.0, 1.0), 0.0)  # NaN: no reward
    return _count(state, arm, (1.0 - reward) / p)

  return Bandit(num_arms, lambda: _init(num_arms), probabilities, update)


def uniform(num_arms: int) -> Bandit:
  """A new alignment drawn uniformly at random every round (DGNOpt Table 5, "random")."""
  num_arms = _check_arms(num_arms)
  return Bandit(num_arms, lambda: _init(num_arms),
                lambda state: jnp.full([num_arms], 1.0 / num_arms, state.cumulative_loss.dtype),
                lambda state, arm, reward: _count(state, arm, jnp.zeros([], jnp.float32)))


def fixed(num_arms: int, arm: int = 0) -> Bandit:
  """Always the same alignment (DGNOpt Table 5, "fixed")."""
  num_arms = _check_arms(num_arms)
  if not 0 <= arm < num_arms:
    raise ValueError(f"arm must be in [0, {num_arms}), got {arm!r}")
  return Bandit(num_arms, lambda: _init(num_arms),
                lambda state: jax.nn.one_hot(arm, num_arms, dtype=state.cumulative_loss.dtype),
                lambda state, drawn, reward: _count(state, drawn, jnp.zeros([], jnp.float32)))


def draw(bandit: Bandit, state: BanditState, key: jax.Array) -> jax.Array:
  """An arm drawn from ``bandit.probabilities(state)`` (int32 scalar)."""
  p = bandit.probabilities(state)
  return jax.random.choice(key, bandit.num_arms, p=p).astype(jnp.int32)
