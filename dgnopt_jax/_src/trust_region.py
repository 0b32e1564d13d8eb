"""Step acceptance for the feedback solvers: the rollout's batch objective against its quadratic model.

The feedback term ``K dx`` of ``theta <- theta - (k + K dx)`` trusts the
stage's quadratic model over the whole change the rollout makes to the
outputs; where the outputs move beyond where the loss is quadratic
(cross-entropy is linear in the logits of a confidently wrong sample) a step
can raise the very batch it was solved on. As iLQR does after its forward
pass (Tassa, Erez and Todorov 2012, §II-F), every step is checked where the
rollout ends, against the second-order model of the objective
``J = L(x_T) + sum_n l_n(theta_n)`` at the realised output change:

.. math::
   m = \\sum_i V_x^{(i)\\top} \\Delta_i
       + \\tfrac12 \\Delta_i^\\top \\nabla^2 \\phi^{(i)} \\Delta_i / B
       + \\sum_n \\Delta l_n,
   \\quad \\Delta = x'_T - x_T

* **acceptance**: ``J' - J <= ACCEPT min(m, 0)`` (the reduction ratio
  ``rho = (J' - J) / m`` at least ``ACCEPT = 1/2`` where the model predicts
  a decrease: a step that falls short of it has left the range where its
  model holds). A rejected step changes no params.
* **step scale** ``alpha`` in ``[MIN_SCALE, 1]``: the next step is solved at
  ``alpha * learning_rate``; halved after a rejected step, grown by ``GROW``
  (at most to 1) after one with ``rho > HIGH``.

Where the model is exact (the LQ case) ``rho = 1`` and the exact step is
untouched. The rule, its reasons and its constants: docs/ALGORITHM.md §6.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# A step is applied only if it achieves this fraction of its model's decrease.
ACCEPT = 0.5
# Reduction ratios above HIGH grow the step scale.
HIGH = 0.75
SHRINK = 0.5
GROW = 1.2
# The scale never falls below this (a step of 2^-20 of the learning rate).
MIN_SCALE = 2.0 ** -20
# Changes within this many units of round-off of the nominal loss are noise.
ROUNDOFF_UNITS = 16


def roundoff(loss: jax.Array) -> jax.Array:
  """The round-off of an objective change near ``loss``: ``ROUNDOFF_UNITS eps |loss|``.

  ``J' - J`` is a difference of two sums near ``loss``; a change below this
  says nothing about the step (a converged step on a loss with a positive
  minimum), so it neither rejects the step nor moves the scale.
  """
  return ROUNDOFF_UNITS * jnp.finfo(jnp.result_type(loss)).eps * jnp.abs(loss)


def reduction_ratio(actual: jax.Array, model_change: jax.Array) -> jax.Array:
  """``rho = actual / m`` with ``actual = J' - J`` and ``m`` its model's change.

  Where the model predicts no decrease: 1 if the objective did not rise, else
  -1. Not finite where ``actual`` is not.
  """
  predicted_decrease = model_change < 0
  safe = jnp.where(predicted_decrease, model_change, -1.0)
  return jnp.where(predicted_decrease, actual / safe, jnp.where(actual <= 0, 1.0, -1.0))


def accepts(actual: jax.Array, model_change: jax.Array, noise: jax.Array) -> jax.Array:
  """Whether a step is applied: ``J' - J <= ACCEPT min(m, 0) + noise``.

  ``noise`` is the :func:`roundoff` of the nominal loss. False where
  ``actual`` is not finite.
  """
  return actual <= ACCEPT * jnp.minimum(model_change, 0.0) + noise


def next_scale(scale: jax.Array, actual: jax.Array, model_change: jax.Array,
               applied: jax.Array, noise: jax.Array) -> jax.Array:
  """The next step's scale from this step's ``alpha = scale``.

  ``max(MIN_SCALE, alpha / 2)`` after a step not applied (not finite or not
  accepted), ``min(1, GROW alpha)`` after an applied one with ``rho > HIGH``
  (:func:`reduction_ratio`), else, and where both changes are within
  ``noise`` (:func:`roundoff`), ``alpha``.
  """
  applied = jnp.asarray(applied, bool)
  grown = jnp.where(reduction_ratio(actual, model_change) > HIGH,
                    jnp.minimum(1.0, scale * GROW), scale)
  changed = jnp.where(applied, grown, jnp.maximum(MIN_SCALE, scale * SHRINK))
  negligible = applied & (jnp.abs(actual) <= noise) & (jnp.abs(model_change) <= noise)
  return jnp.where(negligible, scale, changed).astype(scale.dtype)
