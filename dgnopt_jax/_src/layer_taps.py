"""Per-sample Kronecker statistics of dense and convolutional players.

A dense or convolutional player's pre-activation is linear in its params,
``h = a W`` with ``a`` the layer input augmented by a 1 for the bias (one row
per output position for a convolution: the image patches). Its contribution
to ``Q_theta = F_theta^T V_x'`` is therefore

    Q_W = sum_i sum_p a_ip g_ip^T,   g_ip = dV/dh_ip          (GT-DDP eq. 43)

the derivative of the value with respect to the pre-activation, ``V_h``.
KFAC-style curvatures need ``a`` and ``g`` per sample (GT-DDP eq. 44,
DDPNOpt eq. 15). Both come from *taps*: the ready-made layers pass their
input and pre-activation through :func:`tap`, which, while
:func:`statistics` evaluates a stage, records the input and adds a zero
offset to ``h``; ``g`` is the VJP of the stage with respect to that offset.
Outside :func:`statistics` a tap is the identity.

A player is matched to its layer by the params object the stage function
hands to the layer (``thetas[n]`` passed on unchanged, as every ready-made
stage does).

Everything here works on the layer's *matrix view*: a kernel
``(K1..Kn, O1..Om)`` (a ``(D, H, hd)`` attention projection, a convolution's
``(kh, kw, C, O)``) and its bias ``(O1..Om)`` are the ``(Ka, O)`` matrix
``[kernel.reshape(K, O); bias.reshape(1, O)]`` (:func:`to_matrix`, ``O``
the layer's ``output_size``), ``a`` holds the input's rows in the same
row-major order and ``g`` the pre-activation's trailing output axes
flattened to ``O``.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

State = Any
Params = Any


class KroneckerStatistics(NamedTuple):
  """Per-sample factors of one player: ``a`` (B, P, Ka) and ``g`` (B, P, O).

  ``P`` is the number of output positions (1 for a dense layer), ``Ka`` the
  layer's input size (times the kernel window for a convolution) plus one for
  the bias, ``O`` its number of outputs.
  """

  inputs: jax.Array
  output_grads: jax.Array


class _Recorder:

  def __init__(self, thetas: tuple, offsets: tuple | None, marker: Any = None):
    self.index = {id(t): n for n, t in enumerate(thetas)}
    self.offsets = offsets
    self.marker = marker
    self.inputs: dict[int, jax.Array] = {}
    self.shapes: dict[int, Any] = {}
    self.layers: dict[int, tuple[Any, jax.Array]] = {}


_ACTIVE = threading.local()


def after(x: jax.Array, marker: Any) -> jax.Array:
  """``x``, made data-dependent on ``marker`` (a pytree) through a zero multiple of one of its elements.

  Layer inputs expanded for the statistics (a convolution's image patches,
  ``kh * kw`` times the layer's input) depend only on the forward pass, and
  XLA's CPU scheduler then forms every stage's expansion during the forward
  pass and keeps all of them alive until the backward pass reaches their
  stage. Built from ``after(x, V_x')`` they are formed when the backward pass
  is at their stage. (``0 * v`` is not folded away: it is NaN for an
  infinite ``v``, which the step's finiteness check reports in any case.)
  """
  if marker is None:
    return x
  element = jax.tree.leaves(marker)[0].reshape(-1)[0]
  return x + (0.0 * element).astype(x.dtype)


@contextlib.contextmanager
def _recording(thetas: tuple, offsets: tuple | None, marker: Any = None):
  stack = getattr(_ACTIVE, "stack", None)
  if stack is None:
    stack = _ACTIVE.stack = []
  rec = _Recorder(thetas, offsets, marker)
  stack.append(rec)
  try:
    yield rec
  finally:
    stack.pop()


def tap(layer: Any, params: Params, x: jax.Array, h: jax.Array) -> jax.Array:
  """Marks ``h = linear(params, x)`` of a ready-made layer (identity unless recording)."""
  stack = getattr(_ACTIVE, "stack", None)
  if not stack:
    return h
  rec = stack[-1]
  n = rec.index.get(id(params))
  if n is None:
    return h
  if n in rec.inputs:
    raise ValueError(
        f"the params of player {n} feed more than one layer of the stage; Kronecker "
        "statistics need one layer per player (use a diagonal curvature)")
  rec.inputs[n] = layer_inputs(layer, params, after(x, rec.marker))
  rec.layers[n] = (layer, x)
  rec.shapes[n] = jax.ShapeDtypeStruct(h.shape, h.dtype)
  if rec.offsets is not None and rec.offsets[n] is not None:
    h = h + rec.offsets[n]
  return h


def _padded_windows(x: jax.Array, kernel_size: tuple[int, int], strides: tuple[int, int],
                    padding: Any) -> list[jax.Array]:
  """The ``kh * kw`` strided slices of the padded input, each (B, ho, wo, C), in kernel order."""
  kh, kw = kernel_size
  sh, sw = strides
  pads = (jax.lax.padtype_to_pads(x.shape[1:3], (kh, kw), (sh, sw), padding)
          if isinstance(padding, str) else padding)
  xp = jnp.pad(x, ((0, 0), tuple(pads[0]), tuple(pads[1]), (0, 0)))
  ho = (xp.shape[1] - kh) // sh + 1
  wo = (xp.shape[2] - kw) // sw + 1
  return [xp[:, i:i + sh * (ho - 1) + 1:sh, j:j + sw * (wo - 1) + 1:sw, :]
          for i in range(kh) for j in range(kw)]


def per_sample_kernel_gradients(layer: Any, x: jax.Array, output_grads: jax.Array) -> jax.Array:
  """``q_r = sum_p a_p g_rp^T`` of a dense or conv layer per sample and column, (B, r, K, O).

  ``a_p`` are the layer's inputs (:func:`kernel_rows`), ``output_grads``
  the columns' derivatives at the pre-activation, (B, r, P, O). A
  convolution's image patches are contracted one kernel tap at a time, so
  that the patches (B, P, K: ``kh * kw`` times the layer's input) are never
  formed. The input is padded :func:`after` ``output_grads`` and each tap's
  window taken after the previous tap's product, so that one window at a
  time is alive and the padded input is not kept from the forward pass
  (peak memory; docs/PERFORMANCE.md, "Design choices").
  """
  if layer.kind != "conv":
    return jnp.einsum("bpk,brpo->brko", kernel_rows(layer, x), output_grads)
  previous = None  # the first window comes from x, already after output_grads
  parts = []
  x = after(x, output_grads)
  for window in _padded_windows(x, layer.kernel_size, layer.strides, layer.padding):
    window = after(window, previous)
    previous = jnp.einsum("bpc,brpo->brco", window.reshape(window.shape[0], -1, window.shape[-1]),
                          output_grads)
    parts.append(previous)
  q = jnp.stack(parts, axis=2)
  return q.reshape(q.shape[:2] + (-1, q.shape[-1]))


def kernel_rows(layer: Any, x: jax.Array, bias_column: bool = False) -> jax.Array:
  """The layer's inputs, (B, P, K): ``h_p = a_p kernel.reshape(K, O)``.

  For a dense layer one row (P = 1), on token rows its rows; for a
  convolution, the image patches in ``kernel.reshape(-1, O)`` order,
  built from ``kh * kw`` strided slices of the padded input (copies only):
  ``lax.conv_general_dilated_patches`` computes the same as a convolution
  with a one-hot kernel, ``kh * kw * C`` times more arithmetic.
  With ``bias_column`` a column of ones is appended in the same copy.
  """
  if layer.kind == "conv":
    parts = _padded_windows(x, layer.kernel_size, layer.strides, layer.padding)
  else:  # one row per sample (dense), or the rows of a (B, ..., K) state (rows)
    a = layer.linear_input(x)
    parts = [a.reshape(a.shape[0], -1, a.shape[-1])]
  if bias_column:
    parts.append(jnp.ones(parts[0].shape[:-1] + (1,), parts[0].dtype))
  a = jnp.concatenate(parts, axis=-1) if len(parts) > 1 else parts[0]
  return a.reshape(x.shape[0], -1, a.shape[-1])


def layer_inputs(layer: Any, params: Params, x: jax.Array) -> jax.Array:
  """The augmented inputs ``a`` of a dense or conv layer, shape (B, P, Ka): with the bias column."""
  return kernel_rows(layer, x, "bias" in params)


def tapped_layers(fn: Any, x: State, thetas: tuple, players: tuple[int, ...]
                  ) -> dict[int, tuple[Any, jax.Array]]:
  """``{n: (layer, layer input)}``: the ready-made layer each player feeds and what it sees."""
  rec = _find_layers(fn, x, thetas, players)
  return {n: rec.layers[n] for n in players}


def _find_layers(fn: Any, x: State, thetas: tuple, players: tuple[int, ...]) -> _Recorder:
  with _recording(thetas, None) as rec:
    fn(x, thetas)  # the unused forward is dead code to XLA
  missing = [n for n in players if n not in rec.layers]
  if missing:
    raise ValueError(
        f"players {missing} of this stage do not call their ready-made layer with their "
        "params unchanged, so their Kronecker statistics cannot be found")
  return rec


def to_matrix(theta: Params, output_size: int) -> jax.Array:
  """A dense/conv player's params as the (Ka, O) matrix ``[kernel; bias]``.

  ``output_size`` is ``O``, the layer's ``output_size`` (the product of the
  kernel's output axes: ``H * hd`` for a ``(D, H, hd)`` attention kernel);
  the kernel's leading axes are its rows, in row-major order, so that
  ``h = a @ kernel.reshape(-1, O)`` with ``a`` the rows of
  :func:`kernel_rows`.
  """
  kernel = theta["kernel"]
  mat = kernel.reshape(-1, output_size)
  if "bias" in theta:
    mat = jnp.concatenate([mat, theta["bias"].reshape(1, output_size)], axis=0)
  return mat


def from_matrix(mat: jax.Array, like: Params) -> Params:
  """Inverse of :func:`to_matrix` (``O = mat.shape[1]``), shaped like ``like``."""
  kernel = like["kernel"]
  rows = kernel.size // mat.shape[1]
  out = {"kernel": mat[:rows].reshape(kernel.shape)}
  if "bias" in like:
    out["bias"] = mat[rows].reshape(like["bias"].shape)
  return out


def matrix_shape(theta: Params, output_size: int) -> tuple[int, int]:
  """(Ka, O) of :func:`to_matrix`."""
  return (theta["kernel"].size // output_size + ("bias" in theta), output_size)


def has_kronecker_structure(player: Any, theta: Params) -> bool:
  """Whether ``player`` is a ready-made dense/conv layer whose params it owns whole.

  Its kernel's trailing axes and its bias are the layer's ``feature_shape``, so
  that the matrix view (:func:`to_matrix`) is the layer's product.
  """
  layer = getattr(player, "layer", None)
  if getattr(layer, "kind", None) not in ("dense", "rows", "conv"):
    return False
  if not (isinstance(theta, dict) and set(theta) == ({"kernel", "bias"} if layer.use_bias
                                                       else {"kernel"})):
    return False
  outputs = layer.feature_shape
  shape = tuple(theta["kernel"].shape)
  return (len(shape) > len(outputs) and shape[len(shape) - len(outputs):] == outputs and
          (not layer.use_bias or tuple(theta["bias"].shape) == outputs))


def statistics(fn: Any, x: State, thetas: tuple, v_next: State,
               players: tuple[int, ...], marker: Any = None) -> dict[int, KroneckerStatistics]:
  """``a`` and ``g = V_h`` of the given players of stage ``fn`` at ``(x, thetas)``.

  ``thetas`` are the objects ``fn`` receives, ``v_next`` the value gradient
  ``V_x'`` at x_{t+1}; ``g = dV/dh`` with ``V`` the batch-mean value carries
  the factor 1/B of the mean. The inputs ``a`` are formed :func:`after`
  ``marker`` (``v_next`` when None; under a ``vmap`` over ``v_next`` pass an
  unmapped one, or ``a`` is formed once per mapped column).

  Raises:
    ValueError: if a requested player's layer was not met while evaluating the stage.
  """
  rec = _find_layers(fn, x, thetas, players)
  zeros = tuple(jnp.zeros(rec.shapes[n].shape, rec.shapes[n].dtype) if n in players else None
                for n in range(len(thetas)))

  def probed(offsets):
    with _recording(thetas, offsets, v_next if marker is None else marker) as inner:
      y = fn(x, thetas)
    return y, {n: inner.inputs[n] for n in players}

  _, pull, inputs = jax.vjp(probed, zeros, has_aux=True)
  grads = pull(v_next)[0]
  # (B, P, O): the pre-activation's trailing output axes are the matrix view's O.
  flat = lambda n: grads[n].reshape(grads[n].shape[0], -1, rec.layers[n][0].output_size)
  return {n: KroneckerStatistics(inputs[n], flat(n)) for n in players}
