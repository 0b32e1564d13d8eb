"""Step acceptance for the feedback solvers: the rollout's batch objective against its quadratic model.

The feedback policy ``theta <- theta - (k + K dx)`` is the minimiser of a
quadratic model of the value; its deviation term ``K dx`` trusts that model
over the whole change the rollout makes to the network's outputs. Where the
outputs move further than the terminal loss is quadratic (a large learning
rate; cross-entropy is asymptotically linear in the logits), the feedback
acts on a model that no longer describes the loss, and a step can raise the
very batch it was solved on. As iLQR does after its forward pass (Tassa,
Erez and Todorov 2012, §II-F; Levenberg-Marquardt's schedule), every step
is checked where the rollout ends:

* **acceptance** (sufficient decrease): with the second-order model of the
  objective at the realised output change

  .. math::
     m = \\sum_i V_x^{(i)\\top} \\Delta_i
         + \\tfrac12 \\Delta_i^\\top \\nabla^2 \\phi^{(i)} \\Delta_i / B
         + \\sum_n \\Delta l_n,
     \\quad \\Delta = x'_T - x_T

  (the stage costs are quadratic, so their change ``Delta l_n`` is exact),
  the step is applied only if ``J' - J <= ACCEPT min(m, 0)``, i.e. the
  reduction ratio ``rho = (J' - J) / m`` is at least ``ACCEPT = 1/2`` where
  the model predicts a decrease, and the objective did not rise where it
  does not; ``J = L(x_T) + sum_n l_n(theta_n)`` is the batch-mean terminal
  loss plus the stage costs. A rejected step changes no params; the
  curvature statistics still take in the batch (a momentum that points
  uphill must see the new gradients to turn).
* **step scale** ``alpha`` in ``[MIN_SCALE, 1]``: the effective learning rate
  of the next step is ``alpha * learning_rate`` (``M = C / (alpha eta)``:
  the whole step, feedforward, feedback and the value updates, is solved
  for the smaller step). ``alpha`` is halved after a rejected step and
  grown by ``GROW`` (at most to 1) after one with ``rho > HIGH``; changes
  within the round-off of the loss move neither.

Why half the model's decrease and not merely no increase: ``rho`` says how
far the step went beyond where its model holds. A step whose batch objective
falls by less than half of what its own model predicts has moved the outputs
into the range where the loss is no longer quadratic (the cross-entropy of a
confidently wrong sample is linear in its logits), and these are the steps
that lower their batch a little while raising the loss on the rest of the
data. Any step its model describes, and every step near a minimiser, has
``rho`` near 1 and passes.

Where the model is exact (a quadratic loss and linear dynamics, the LQ case)
``rho = 1``, every step is accepted and ``alpha`` stays 1: the exact step is
untouched. Open-loop steps (no rollout) are not checked.
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
  """``rho = actual / m``; 1 where the model predicts no decrease and the objective did not rise.

  Args:
    actual: the objective's change over the step, ``J' - J``.
    model_change: ``m``, its second-order model's change.

  Returns:
    The scalar ratio; ``-1`` where the model predicts no decrease and the
    objective rose, and not finite where ``actual`` is not.
  """
  predicted_decrease = model_change < 0
  safe = jnp.where(predicted_decrease, model_change, -1.0)
  return jnp.where(predicted_decrease, actual / safe, jnp.where(actual <= 0, 1.0, -1.0))


def accepts(actual: jax.Array, model_change: jax.Array, noise: jax.Array) -> jax.Array:
  """Whether a step is applied: ``J' - J <= ACCEPT min(m, 0) + noise``.

  Args:
    actual: the objective's change over the step, ``J' - J``.
    model_change: ``m``, its second-order model's change.
    noise: :func:`roundoff` of the nominal loss.

  Returns:
    A scalar bool, False where ``actual`` is not finite.
  """
  return actual <= ACCEPT * jnp.minimum(model_change, 0.0) + noise


def next_scale(scale: jax.Array, actual: jax.Array, model_change: jax.Array,
               applied: jax.Array, noise: jax.Array) -> jax.Array:
  """The step scale of the next step.

  Args:
    scale: this step's ``alpha``.
    actual, model_change: as :func:`reduction_ratio`.
    applied: whether this step was applied (finite and accepted).
    noise: :func:`roundoff` of the nominal loss.

  Returns:
    ``max(MIN_SCALE, alpha / 2)`` after a step not applied,
    ``min(1, GROW alpha)`` after an applied one with ``rho > HIGH``, else
    (and where both changes are within ``noise``) ``alpha``.
  """
  applied = jnp.asarray(applied, bool)
  grown = jnp.where(reduction_ratio(actual, model_change) > HIGH,
                    jnp.minimum(1.0, scale * GROW), scale)
  changed = jnp.where(applied, grown, jnp.maximum(MIN_SCALE, scale * SHRINK))
  negligible = applied & (jnp.abs(actual) <= noise) & (jnp.abs(model_change) <= noise)
  return jnp.where(negligible, scale, changed).astype(scale.dtype)
