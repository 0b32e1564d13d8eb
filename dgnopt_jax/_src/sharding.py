"""Data-parallel training on a device mesh with ``jax.sharding``.

A DGNOpt step is written on the global batch: the forward pass, the backward
recursion (DGNOpt Alg. 1 lines 3-7) and the rollout treat the leading axis of
every state as the batch, and every batch statistic the solvers use (the
gradients ``Q_theta``, the per-sample quadratic forms, the Kronecker factors
``A = E[a a^T]``, ``B = E[g g^T]``, the stage's ``G`` of the convexity
safeguard) is a mean over that axis. Under ``jax.jit`` with the batch
sharded over a mesh axis, XLA partitions these computations and turns each
mean over the batch into a cross-device reduction, so the step computes the
same global-batch quantities on one device or on many (up to the order of
floating-point additions).

This module only says where arrays live: the batch split along its leading
axis over the ``data`` axis of a mesh, params and optimizer state replicated,
or, for large kernels, split over a ``model`` axis with the state that
mirrors them (Adam's moments) split alike. The step itself is the ordinary
jit-compiled train step with those shardings as ``in_shardings`` and
``out_shardings``, so nothing is resharded between steps.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import jax
import numpy as np
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec

DATA_AXIS = "data"
MODEL_AXIS = "model"


def make_mesh(devices: Sequence[jax.Device] | None = None, *, model: int = 1,
              axis_names: tuple[str, str] = (DATA_AXIS, MODEL_AXIS)) -> Mesh:
  """A ``(data, model)`` mesh over ``devices`` (default: all, on every host).

  Args:
    devices: the devices, in order; default ``jax.devices()`` (the global
      list: after ``jax.distributed.initialize`` it spans all hosts).
    model: size of the model axis (1: pure data parallelism).
    axis_names: names of the two axes.

  Returns:
    A ``jax.sharding.Mesh`` of shape ``(len(devices) // model, model)``.
  """
  devices = list(jax.devices() if devices is None else devices)
  if model < 1 or len(devices) % model:
    raise ValueError(f"the model axis ({model}) must divide the number of devices "
                     f"({len(devices)})")
  return Mesh(np.asarray(devices).reshape(len(devices) // model, model), axis_names)


def replicated(mesh: Mesh) -> NamedSharding:
  """Every device holds the whole array."""
  return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh, axis: str = DATA_AXIS) -> NamedSharding:
  """The leading (batch) axis split over the mesh axis ``axis``."""
  return NamedSharding(mesh, PartitionSpec(axis))


def shard_batch(batch: Any, mesh: Mesh, axis: str = DATA_AXIS) -> Any:
  """Places a batch pytree on the mesh, split along its leading axis.

  Each host passes its own part of the global batch (on one host, the whole
  batch): the global array is assembled with
  ``jax.make_array_from_process_local_data``, so host ``i`` feeds rows
  ``i * B / num_hosts .. (i + 1) * B / num_hosts`` of a global batch of ``B``.

  Args:
    batch: a pytree of arrays (numpy or jax) whose leading axis is this
      host's share of the batch.
    mesh: the device mesh.
    axis: the mesh axis the batch is split over.

  Returns:
    The batch as global ``jax.Array``s sharded by :func:`batch_sharding`.
  """
  sharding = batch_sharding(mesh, axis)
  local_devices = mesh.shape[axis] // max(jax.process_count(), 1)

  def put(leaf):
    leaf = np.asarray(leaf) if not isinstance(leaf, jax.Array) else leaf
    if leaf.ndim == 0:
      raise ValueError("every batch leaf needs a leading batch axis; got a scalar")
    if local_devices and leaf.shape[0] % local_devices:
      raise ValueError(
          f"this host's batch has {leaf.shape[0]} samples, not divisible by its "
          f"{local_devices} shards of the mesh axis {axis!r} (size {mesh.shape[axis]}); "
          "choose a batch size that is a multiple of it")
    return jax.make_array_from_process_local_data(sharding, leaf)

  return jax.tree.map(put, batch)


def params_sharding(params: Any, mesh: Mesh, *, model_axis: str | None = None,
                    min_size: int = 2 ** 18) -> Any:
  """Shardings for params: replicated, or large kernels split over ``model_axis``.

  Args:
    params: params or their ``jax.ShapeDtypeStruct``s.
    mesh: the device mesh.
    model_axis: a mesh axis to split large params over (default: none, every
      leaf replicated, i.e. pure data parallelism).
    min_size: only leaves with at least this many elements whose last axis
      the model axis divides are split (along their last axis: a Dense
      kernel's outputs, a Conv kernel's output channels).

  Returns:
    A pytree of ``NamedSharding`` shaped like ``params``.
  """
  rep = replicated(mesh)
  if model_axis is None or mesh.shape.get(model_axis, 1) == 1:
    return jax.tree.map(lambda _: rep, params)
  ways = mesh.shape[model_axis]

  def choose(leaf):
    shape = np.shape(leaf)
    if len(shape) >= 2 and math.prod(shape) >= min_size and shape[-1] % ways == 0:
      return NamedSharding(mesh, PartitionSpec(*([None] * (len(shape) - 1)), model_axis))
    return rep

  return jax.tree.map(choose, params)


def state_sharding(init_fn: Any, params: Any, params_shardings: Any, mesh: Mesh) -> Any:
  """Shardings for the optimizer state that follow the params' shardings.

  The state is computed abstractly (``jax.eval_shape(init_fn, params)``;
  ``params`` may be ``jax.ShapeDtypeStruct``s). Every subtree of the state
  with the structure and shapes of the params, or of one subtree of them
  (one player's ``{"kernel", "bias"}`` inside ``DGNOptState.curvature``, the
  moments of Adam), takes the corresponding params' shardings; everything
  else (counters, Kronecker factors, eigenbases) is replicated.

  Args:
    init_fn: the transformation's ``init`` (``tx.init``).
    params: params or their ``jax.ShapeDtypeStruct``s.
    params_shardings: their shardings, e.g. from :func:`params_sharding`.
    mesh: the device mesh.

  Returns:
    A pytree of ``NamedSharding`` shaped like the optimizer state.
  """
  abstract = jax.eval_shape(init_fn, params)
  rep = replicated(mesh)
  templates = []

  def collect(node, shardings):
    leaves, treedef = jax.tree.flatten(node)
    if leaves:
      templates.append((treedef, [np.shape(l) for l in leaves], shardings))
    children = _children(node)
    if children is None:
      return
    sharding_children = _children(shardings)
    for child, child_shardings in zip(children, sharding_children):
      collect(child, child_shardings)

  collect(params, params_shardings)

  def assign(node):
    leaves, treedef = jax.tree.flatten(node)
    shapes = [l.shape for l in leaves]
    for t_def, t_shapes, t_shardings in templates:
      if leaves and t_def == treedef and t_shapes == shapes:
        return t_shardings
    children = _children(node)
    if children is None:
      return rep
    return jax.tree_util.tree_unflatten(
        jax.tree_util.tree_structure(node, is_leaf=lambda x: x is not node),
        [assign(c) for c in children])

  return assign(abstract)


def _children(node: Any) -> list | None:
  """The direct children of a pytree node, or None for a leaf."""
  children, treedef = jax.tree_util.tree_flatten(node, is_leaf=lambda x: x is not node)
  if treedef.num_leaves == 1 and treedef.num_nodes == 1:
    return None
  return children


# ----------------------------------------------------------------------------
# Explicit sharding (sharding in types).
# ----------------------------------------------------------------------------


def _explicit_axes(mesh: Any) -> tuple:
  names = getattr(mesh, "axis_names", ()) or ()
  types = getattr(mesh, "axis_types", None) or ()
  explicit = getattr(jax.sharding, "AxisType", None)
  if explicit is None:
    return ()
  return tuple(n for n, t in zip(names, types) if t == explicit.Explicit)


def explicit_mesh(tree: Any) -> Any:
  """The (abstract) mesh with ``Explicit`` axes that ``tree``'s arrays are typed on, or None.

  Looks at the context mesh (``jax.set_mesh``) and at the sharding in the
  type of every array of ``tree`` (an array placed on an explicit-axes mesh
  carries it even outside the context). None under the default, ``Auto``,
  axes, where XLA propagates the shardings itself.
  """
  typeof = getattr(jax, "typeof", None)
  get_mesh = getattr(jax.sharding, "get_abstract_mesh", None)
  context = get_mesh() if get_mesh is not None else None
  if context is not None and _explicit_axes(context):
    return context
  if typeof is None:
    return None
  for leaf in jax.tree.leaves(tree):
    mesh = getattr(getattr(typeof(leaf), "sharding", None), "mesh", None)
    if mesh is not None and _explicit_axes(mesh):
      return mesh
  return None


def _auto_axes(fn: Callable, out_sharding: Any) -> Callable | None:
  auto = getattr(jax.sharding, "auto_axes", None)
  if auto is not None:
    return auto(fn, out_sharding=out_sharding)
  try:  # older JAX: the experimental module, whose keyword is plural
    from jax.experimental.shard import auto_axes  # pylint: disable=g-import-not-at-top
  except ImportError:
    return None
  return auto_axes(fn, out_shardings=out_sharding)


def sharding_type_of(tree: Any, mesh: Any) -> Any:
  """The sharding in the type of each array of ``tree``, on ``mesh`` (replicated where it has none)."""
  typeof = jax.typeof

  def one(leaf):
    sharding = getattr(typeof(leaf), "sharding", None)
    if isinstance(sharding, NamedSharding) and _explicit_axes(sharding.mesh):
      return sharding
    return NamedSharding(mesh, PartitionSpec())

  return jax.tree.map(one, tree)


def call_with_auto_axes(fn: Callable, args: tuple, out_sharding: Callable[[Any], Any]) -> Any:
  """``fn(*args)``, with a mesh's ``Explicit`` axes switched to ``Auto`` inside.

  Under explicit sharding every operation must say how its output is
  sharded; a DGNOpt step's per-sample contractions, concatenated layer
  inputs and vmapped VJPs mix batch-sharded and replicated operands, where
  that is ambiguous. Inside ``jax.sharding.auto_axes`` XLA propagates the
  shardings itself, as it does for a jit-compiled step under the default
  axes (:mod:`sharding`'s data-parallel recipe), and the outputs are given
  the sharding types ``out_sharding(mesh)`` names, so a step's outputs have
  the types of its inputs from one step to the next. Without explicit axes
  ``fn(*args)`` is called as it is.

  Args:
    fn: the function.
    args: its positional arguments.
    out_sharding: ``mesh -> `` a pytree of ``NamedSharding`` shaped like
      ``fn``'s outputs.

  Returns:
    ``fn(*args)``.
  """
  mesh = explicit_mesh(args)
  if mesh is None:
    return fn(*args)
  wrapped = _auto_axes(fn, out_sharding(mesh))
  if wrapped is None:
    raise NotImplementedError(
        "this JAX has explicit mesh axes but no auto_axes; use Auto axes (the default)")
  return wrapped(*args)
