"""Terminal losses phi(x_T, target) and the factors of their Hessians.

The value recursion starts from the batch-mean terminal cost
(DDPNOpt eq. 34, GT-DDP Prop. 5)::

    V_x^(i)  = grad phi(x_T^(i)) / B
    V_xx^(i) = Z^(i) Z^(i)^T,        Z^(i) = factor(x_T^(i)) / sqrt(B)

with three choices of factor, from the per-sample loss Hessian ``H`` and
gradient ``g = grad phi``:

* ``"projected"``: rank 1, ``z = H g / sqrt(g^T H g)`` (0 where
  ``g^T H g = 0``). ``z z^T`` is ``H`` restricted to the gradient's direction
  (a rank-one Nystrom approximation): exact along ``g`` and, by
  Cauchy-Schwarz, ``H - z z^T`` is positive semi-definite, so the model never
  has more curvature than the loss. One Hessian-vector product a sample.
* ``"outer"``: rank 1, ``z = g``, the outer-product factor of GT-DDP
  Prop. 5 (the empirical Fisher). For a confidently wrong sample under
  softmax cross-entropy ``|g|^2 -> 2`` while ``H -> 0``: the model sees
  curvature where the loss is flat, which makes the value correction and the
  feedback cancel most of the gradient of such samples (Kunstner, Balles and
  Hennig 2019, "Limitations of the empirical Fisher approximation").
* ``"exact"``: an exact factor of the loss Hessian, ``H = sum_r f_r f_r^T``
  (rank C for softmax cross-entropy, ``f_c = sqrt(p_c) (e_c - p)``).
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Union

import jax
import jax.numpy as jnp
import numpy as np

from dgnopt_jax._src import symmetric_eigh

Array = jax.Array


class TerminalLoss(NamedTuple):
  """A per-sample terminal cost and an exact factor of its Hessian.

  Attributes:
    name: a readable name used in error messages.
    per_sample: ``(output, target) -> scalar`` for ONE sample (no batch axis).
    hessian_factor: ``(output, target) -> F`` with ``F`` of shape
      ``(r, *output.shape)`` such that the Hessian of ``per_sample`` with
      respect to ``output`` equals ``sum_r F[r] F[r]^T``.
    check_target: optional ``(outputs, targets) -> None`` raising a clear
      ``ValueError`` for targets of the wrong shape or dtype (batched).
    check_target_values: optional ``(outputs, targets) -> None`` raising a
      clear ``ValueError`` for target values the loss cannot take (class
      labels out of range); called only on concrete targets, outside ``jit``.
  """

  name: str
  per_sample: Callable[[Array, Array], Array]
  hessian_factor: Callable[[Array, Array], Array]
  check_target: Callable[[Array, Array], None] | None = None
  check_target_values: Callable[[Array, Array], None] | None = None


def _is_label(output: Array, target: Array) -> bool:
  return target.ndim == output.ndim - 1


def _softmax_ce(output: Array, target: Array) -> Array:
  """Cross-entropy; a label outside [0, classes) gives NaN (the step is then skipped or raises)."""
  logp = jax.nn.log_softmax(output)
  if _is_label(output, target):
    label = target.astype(jnp.int32)
    valid = (label >= 0) & (label < output.shape[-1])
    picked = jnp.take_along_axis(logp, jnp.clip(label, 0, output.shape[-1] - 1)[..., None], -1)
    return jnp.where(valid, -picked.sum(), jnp.nan)
  return -(target * logp).sum()


def _softmax_ce_factor(output: Array, target: Array) -> Array:
  """Rows sqrt(p_c)(e_c - p): sum_c f_c f_c^T = diag(p) - p p^T, the exact Hessian."""
  del target
  p = jax.nn.softmax(output)
  eye = jnp.eye(p.shape[-1], dtype=p.dtype)
  return jnp.sqrt(p)[:, None] * (eye - p[None, :])


def _check_ce_target(outputs: Array, targets: Array) -> None:
  if outputs.ndim != 2:
    raise ValueError(
        "softmax_cross_entropy expects network outputs of shape (batch, classes), "
        f"got {outputs.shape}")
  if targets.ndim == 1:
    if not jnp.issubdtype(targets.dtype, jnp.integer):
      raise ValueError(
          "softmax_cross_entropy expects integer class labels of shape (batch,) "
          f"or one-hot targets of shape (batch, classes); got dtype {targets.dtype}")
  elif targets.shape != outputs.shape:
    raise ValueError(
        "softmax_cross_entropy expects integer labels of shape "
        f"({outputs.shape[0]},) or one-hot targets of shape {outputs.shape}; "
        f"got targets of shape {targets.shape}")


def _check_ce_labels(outputs: Array, targets: Array) -> None:
  if targets.ndim != 1:
    return
  classes = outputs.shape[-1]
  labels = np.asarray(targets)  # concrete: read on the host, never staged
  low, high = int(labels.min()), int(labels.max())
  if low < 0 or high >= classes:
    bad = low if low < 0 else high
    raise ValueError(
        f"softmax_cross_entropy: class label {bad} is outside [0, {classes}) "
        f"for a network with {classes} outputs")


def _squared_error(output: Array, target: Array) -> Array:
  return 0.5 * jnp.sum((output - target) ** 2)


def _squared_error_factor(output: Array, target: Array) -> Array:
  del target
  n = output.size
  return jnp.eye(n, dtype=output.dtype).reshape((n,) + output.shape)


def _check_same_shape(name: str) -> Callable[[Array, Array], None]:
  def check(outputs: Array, targets: Array) -> None:
    if targets.shape != outputs.shape:
      raise ValueError(
          f"{name} expects targets of the same shape as the network outputs "
          f"{outputs.shape}; got {targets.shape}")
  return check


def _sigmoid_bce(output: Array, target: Array) -> Array:
  return jnp.sum(jax.nn.softplus(output) - target * output)


def _sigmoid_bce_factor(output: Array, target: Array) -> Array:
  del target
  s = jax.nn.sigmoid(output).reshape(-1)
  n = s.size
  return (jnp.eye(n, dtype=output.dtype) * jnp.sqrt(s * (1 - s))[None, :]).reshape(
      (n,) + output.shape)


def _generic_factor(per_sample: Callable[[Array, Array], Array]) -> Callable:
  """Exact factor of an arbitrary loss: eigendecomposition of its Hessian.

  Negative eigenvalues (a non-convex loss) are clamped to zero, so the factor
  describes the positive part of the Hessian.
  """

  def factor(output: Array, target: Array) -> Array:
    flat = output.reshape(-1)
    h = jax.hessian(lambda o: per_sample(o.reshape(output.shape), target))(flat)
    w, u = symmetric_eigh.symmetric_eigh(0.5 * (h + h.T))
    f = (u * jnp.sqrt(jnp.maximum(w, 0.0))[None, :]).T
    return f.reshape((flat.size,) + output.shape)

  return factor


softmax_cross_entropy = TerminalLoss(
    "softmax_cross_entropy", _softmax_ce, _softmax_ce_factor, _check_ce_target,
    _check_ce_labels)
squared_error = TerminalLoss(
    "squared_error", _squared_error, _squared_error_factor,
    _check_same_shape("squared_error"))
sigmoid_binary_cross_entropy = TerminalLoss(
    "sigmoid_binary_cross_entropy", _sigmoid_bce, _sigmoid_bce_factor,
    _check_same_shape("sigmoid_binary_cross_entropy"))

_BUILTIN = {
    "softmax_cross_entropy": softmax_cross_entropy,
    "cross_entropy": softmax_cross_entropy,
    "squared_error": squared_error,
    "mse": squared_error,
    "sigmoid_binary_cross_entropy": sigmoid_binary_cross_entropy,
    "sigmoid_cross_entropy": sigmoid_binary_cross_entropy,
}

LossLike = Union[str, TerminalLoss, Callable[[Array, Array], Array]]


def get_loss(loss: LossLike) -> TerminalLoss:
  """Resolves a loss name, a :class:`TerminalLoss` or a per-sample callable."""
  if isinstance(loss, TerminalLoss):
    return loss
  if isinstance(loss, str):
    if loss not in _BUILTIN:
      raise ValueError(
          f"unknown loss {loss!r}; built-in losses are {sorted(_BUILTIN)}, or pass "
          "a per-sample callable (output, target) -> scalar")
    return _BUILTIN[loss]
  if callable(loss):
    name = getattr(loss, "__name__", "custom_loss")
    return TerminalLoss(name, loss, _generic_factor(loss), None)
  raise TypeError(f"loss must be a name, a TerminalLoss or a callable, got {type(loss)}")


VALUE_RANKS = ("projected", "outer", "exact")


def _hessian_vector(loss: TerminalLoss, output: Array, target: Array, v: Array) -> Array:
  """``H v`` for one sample's loss Hessian in the output (forward over reverse)."""
  return jax.jvp(jax.grad(lambda o: loss.per_sample(o, target)), (output,), (v,))[1]


def _projected_factor(loss: TerminalLoss, output: Array, target: Array, grad: Array) -> Array:
  """``H g / sqrt(g^T H g)`` for one sample, 0 where ``g^T H g <= 0``."""
  h_g = _hessian_vector(loss, output, target, grad)
  along = jnp.vdot(grad, h_g)
  positive = along > 0
  return jnp.where(positive, h_g / jnp.sqrt(jnp.where(positive, along, 1.0)), 0.0)


def terminal_value(loss: TerminalLoss, outputs: Array, targets: Array,
                   rank: str) -> tuple[Array, Array, Array]:
  """Batch-mean loss and the terminal value derivatives (DDPNOpt eq. 34).

  Args:
    loss: the terminal cost.
    outputs: network outputs x_T, shape ``(B, ...)``.
    targets: targets, leading axis ``B``.
    rank: ``"projected"``, ``"outer"`` or ``"exact"`` (module docstring).

  Returns:
    ``(mean_loss, V_x, Z)`` with ``V_x`` of the shape of ``outputs`` and ``Z`` of
    shape ``(B, r, ...)``, so that ``V_xx^(i) = Z[i]^T Z[i]`` over the r axis.
  """
  batch = outputs.shape[0]
  values, grads = jax.vmap(jax.value_and_grad(loss.per_sample))(outputs, targets)
  v_x = grads / batch
  scale = 1.0 / jnp.sqrt(jnp.asarray(batch, outputs.dtype))
  if rank == "outer":
    factor = grads[:, None] * scale
  elif rank == "projected":
    projected = jax.vmap(lambda o, t, g: _projected_factor(loss, o, t, g))
    factor = projected(outputs, targets, grads)[:, None] * scale
  elif rank == "exact":
    factor = jax.vmap(loss.hessian_factor)(outputs, targets) * scale
  else:
    raise ValueError(f"vxx_rank must be one of {VALUE_RANKS}, got {rank!r}")
  return jnp.mean(values), v_x, factor.astype(outputs.dtype)


def batch_loss(loss: TerminalLoss, outputs: Array, targets: Array) -> Array:
  """The batch-mean terminal loss."""
  return jnp.mean(jax.vmap(loss.per_sample)(outputs, targets))


def quadratic_model_change(loss: TerminalLoss, outputs: Array, trial_outputs: Array,
                           targets: Array, v_x: Array) -> Array:
  """The second-order model of the batch-mean loss at an output change.

  ``m = sum_i V_x^(i)T D_i + 1/2 D_i^T H_i D_i / B`` with ``D = trial_outputs -
  outputs``, ``V_x = grad phi / B`` (:func:`terminal_value`) and ``H_i`` the
  exact Hessian of the per-sample loss (one Hessian-vector product a sample,
  in the output's dimension).

  Args:
    loss: the terminal cost.
    outputs: the nominal outputs x_T, shape ``(B, ...)``.
    trial_outputs: the outputs where the rollout ends, x'_T.
    targets: the targets.
    v_x: the terminal value gradient at ``outputs``.

  Returns:
    The scalar model change.
  """
  batch = outputs.shape[0]
  delta = trial_outputs - outputs
  h_delta = jax.vmap(lambda o, t, d: _hessian_vector(loss, o, t, d))(outputs, targets, delta)
  return jnp.sum(v_x * delta) + 0.5 * jnp.sum(delta * h_delta) / batch
