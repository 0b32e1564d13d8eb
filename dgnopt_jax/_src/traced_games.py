"""Games traced from a JAX function: :func:`from_function`.

A network written as an arbitrary function ``apply_fn(params, x)`` (a plain
JAX function, a custom ``@nn.compact`` or setup-style Flax module's
``apply``) is traced to a jaxpr on an example batch and cut into the stages of
a game (DGNOpt §3.1, eq. 3):

* **Inlining.** Nested ``jit`` / ``closed_call`` / ``checkpoint`` sub-jaxprs
  are inlined, so that layers inside jitted helpers and Flax modules are
  visible; ``custom_jvp_call`` / ``custom_vjp_call`` equations (``jax.nn.relu``,
  ``jax.nn.softmax``) and control flow stay whole. Dead equations are dropped.
* **Dependence.** An equation is *batch-dependent* when one of its inputs
  depends on the input ``x``. The others compute from params and constants
  only (a bias reshape, a weight normalisation); a stage recomputes the ones
  it needs, so that a state never carries them.
* **Players.** A batch-dependent equation *consumes* the params leaves its
  other inputs are computed from. Leaves are grouped by their parent path into
  players (Flax: ``params/Dense_0/{kernel, bias}`` is the player
  ``("params", "Dense_0")``); a leaf directly under the root, or under a node
  that also holds another player's leaves, is a player of its own.
* **Stages.** A player's *layer* is the range of batch-dependent equations
  from its first consumer to its last; overlapping ranges are one layer, and
  a range that begins with an elementwise op applied to the output of one of
  the previous range's parametric equations (a bias added right after a
  kernel's ``dot_general``, held as separate leaves) joins it. Layers play
  at levels (:func:`_levels`, the ``alignment``): layers at one level share a
  stage (parallel branches, attention's projections, a projection shortcut
  beside a residual body's last or first layer), a parameter-free equation
  plays at the latest level of what it reads (an activation in its layer's
  stage), but for a chain of them from a fork to one layer, which plays in
  that layer's stage (an inception branch's pooling), and the equations are
  put in level order, so each stage is a contiguous range. A parameter-free
  equation other than an elementwise one that maps the whole state to the
  whole state (a pooling, a flattening between two layers) is a stage of its
  own. These are the cuts of the hand-written games (``games.sequential``
  with ``AvgPool``/``Flatten`` stages, ``games.InceptionBlock``), which the
  value Hessian's Tikhonov term, a state cost at every stage's output, would
  tell apart. The state between two stages is what is live across the cut: the batch-dependent values computed before it and used
  after it (a residual stream comes out as a second value), a bare array where
  there is one, else a tuple in the order they are computed. The first stage's
  state is the input ``x``, the last stage's output is the model's output.
* **Kronecker structure.** A player whose params are ``{"kernel"[, "bias"]}``
  and whose kernel ``(K1..Kn, O1..Om)`` is the right operand of a
  ``dot_general`` contracting, in order and without batch dimensions, the
  last ``n`` axes of a ``(B, K1..Kn)`` or ``(B, ..., K1..Kn)`` input with its
  first ``n`` (``nn.Dense``, ``x @ W + b``, on token rows too;
  ``nn.DenseGeneral``; the projections of ``nn.MultiHeadDotProductAttention``,
  query/key/value ``(B, T, D) @ (D, H, hd)`` and out
  ``(B, T, H, hd) @ (H, hd, D)``), or of a ``conv_general_dilated`` on NHWC
  inputs with an HWIO kernel (``nn.Conv``), the input's leading axis being
  the samples, the kernel used as it is (or converted to another dtype), its
  bias ``(O1..Om)`` (if any) broadcast over the trailing axes and added to
  that product alone, gets a :class:`games.Dense` / :class:`games.Conv2D`
  ``layer``. A multi-axis product is a dense layer in its matrix view::

    h.reshape(B, P, O) = x.reshape(B, P, K) @ kernel.reshape(K, O) + bias.reshape(O)

  with ``K = K1...Kn``, ``O = O1...Om`` and ``P`` the rows (1 for a
  ``(B, K1..Kn)`` input; on token rows, ``rows=True``, each row an output
  position, GT-DDP eq. 43: ``Q_W = sum_p a_p g_p^T``): the layer is
  ``Dense(features=(O1..Om), rows=..., contracted_axes=n)``, ``rows`` where
  the input has axes besides the samples and the contracted ones, and its
  statistics, factors and solves are those of the ``(K [+1], O)`` matrix
  ``[kernel; bias]`` (:func:`layer_taps.to_matrix`). The stage function
  passes the product's input and the pre-activation through
  :func:`layer_taps.tap`, so that the Kronecker curvatures find their
  statistics as for the ready-made layers. Other players (a ``dot_general``
  over other axes, a kernel transposed before its product, a LayerNorm
  scale) have ``layer=None``: the diagonal curvatures and the per-sample VJP
  handle them.

* **Repeated stages.** Stages whose programs are the same up to the names
  of their values share one stage function object, so that
  :func:`segments.plan_segments` solves a run of them (equal layers, the
  stages of equal residual blocks) with ``lax.scan`` and the compiled step
  does not grow with the depth. The same means: the same equations in
  order (primitives; params equal by value, sub-jaxprs by structure, a
  ``custom_jvp``'s JVP rule through the jaxpr it traces, a ``custom_vjp``'s
  rules by identity), the same avals,
  each input wired alike (the state's n-th array, the stage's own earlier
  outputs, its n-th player's m-th leaf, constants and literals of equal
  value), the same taps and Kronecker layers, the same outputs. The shared
  function evaluates the first such stage's equations on each stage's own
  state and params. The form of each stage is computed once, when the game
  is built (and checked again for each batch size traced later).

Samples must propagate independently (the per-sample Jacobians of the game
are block-diagonal over the batch): the program is traced at two batch sizes,
the axes whose size follows the batch are the batch axes of each value, and
an operation that combines values across a batch axis (a reduction, a
cumulative op, a contraction, a window or slice along it, a value that loses
its batch axis) is an error naming the primitive and where it is, with one
exception:

* **Batch statistics.** A ``reduce_sum`` over every batch axis of its operand
  at the top level of the program (a mean, a mean of squares: a train-mode
  ``nn.BatchNorm``, ``x - x.mean(0)``) makes a *statistic*, a value without
  a batch axis, and so does every operation on statistics, params and
  constants alone (``var = max(0, m2 - m^2)``, ``rsqrt(var + eps)``). They
  follow the BatchNorm rule (docs/GAMES.md): a parameter-free
  *statistics stage* ``F_stats(x) = (x, sg(mean), sg(var))`` begins with the
  parameter-free operations before the sum whose values only the statistics
  use (Flax's ``x**2``) and ends before the first operation that makes a
  batched value from a statistic (``x - mean``) or reads one computed before
  it, or at the next layer; it hands on the values live across its end, each
  statistic as one copy per sample (``(B,) + shape``) under
  ``jax.lax.stop_gradient``, and its ``Stage.gradient_fn`` is the same map
  without the stop-gradient. So the first-order terms (``Q_x``,
  ``Q_theta``) are exact, ``Q_theta`` is ``jax.grad`` of the train-mode loss
  (``olne`` is optax on it), and the second-order terms hold the statistics
  fixed. The operations after a statistics stage join the next layer's stage
  when statistics are live where that layer begins (Flax's BatchNorm: its
  ``scale`` multiplies ``rsqrt(var + eps)``), else they form a stage of their
  own, so Flax's ``Conv, BatchNorm, relu`` is cut as conv | statistics |
  normalisation and relu, with the statistics as ``(B, 1, C)`` copies of
  Flax's broadcast ``(1, C)`` statistics. This is the Gauss-Newton model in
  which the batch statistics are constants of the step; in the rollout the
  statistics stage recomputes them on the rolled-out batch, so the rollout
  is the train-mode forward pass at the new params.
  A stage whose state holds statistics is evaluated *sample by sample*:
  ``jax.vmap`` over the samples of its equations traced on a batch of one,
  each sample reading its own copy where the batch program reads the
  shared statistic. Rewriting the broadcasts instead would need a rule per
  primitive that consumes a statistic (``sub``, ``mul``, ``broadcast_in_dim``,
  a ``dot_general`` with a statistic operand...); the batch-of-one program
  has them all, its Jacobians act on each sample alone by construction, and
  ``vmap`` batches its convolutions and products back into one. Its players
  are generic (the Kronecker taps record statistics outside that ``vmap``).
  A sum over the batch inside a layer (between two uses of one player's
  params) or inside control flow or a custom derivative has no place to cut
  and is an error.
* **Flax variables.** When ``params`` is a dict with a ``"params"``
  collection, only its leaves are players; leaves of other collections (a
  BatchNorm's running averages) must not act on the batch (an error names
  the leaf). ``apply_fn`` may return Flax's ``(outputs, mutated
  collections)`` (``model.apply(v, x, train=True, mutable=["batch_stats"])``,
  recognised by a second item laid out as those collections of ``params``):
  the game's output is the first item, and :func:`games.update_batch_stats`
  replaces the collections by the second, Flax's own running averages.
* **Random draws.** Random numbers must be a function of each sample alone:
  drawn from keys of the batch (:func:`per_sample_rngs`: one key per sample
  from a seed in the batch), they are. Without an rng Flax's error is
  reported with the module's path, and random numbers of a batch-sized
  shape drawn from a key ``apply_fn`` holds are an error (the stages are
  evaluated at other batch sizes, where that key draws others).

A stage function is evaluated by binding its equations in order
(``primitive.bind``, as ``jax.core.eval_jaxpr``). The solver calls stage
functions on other batch sizes (and on single samples under ``vmap``), so
``apply_fn`` is traced again at each batch size it meets (once each), and the
batch-dependent part of that trace must match the example's equation by
equation. The first stage reads its input in the example's dtypes: the
solver hands the input over as floats where it differentiates through the
states, and integer inputs (token ids) are converted back. Later states are
floats too: a boolean (a dropout mask) as 0/1, an integer as its two 16-bit
halves (:func:`_encoded`), read back by the stage that takes them.

Not yet done: params shared by two layers (an error naming the leaf). Flax NNX modules
are traced through ``nnx.merge`` by :mod:`nnx_games`.
"""

from __future__ import annotations

import dataclasses
import heapq
import itertools
from typing import Any, Callable, Mapping, Optional, Sequence

from flax import errors as flax_errors
import flax.linen as nn
import jax
from jax.extend import core as jex_core
import jax.numpy as jnp
from jax.extend import source_info_util
import numpy as np

from dgnopt_jax._src import games as games_lib
from dgnopt_jax._src import layer_taps
from dgnopt_jax._src import losses as losses_lib
from dgnopt_jax._src import running_averages

Array = jax.Array
Params = Any
Path = tuple

# Call-like primitives whose sub-jaxpr is inlined, and the param holding it.
_INLINED = {"jit": "jaxpr", "pjit": "jaxpr", "closed_call": "call_jaxpr",
            "core_call": "call_jaxpr", "checkpoint": "jaxpr", "remat": "jaxpr"}
# Ops that only re-lay out one value: followed through when tracing a value to its source.
_STRUCTURAL = frozenset({"reshape", "convert_element_type", "broadcast_in_dim", "squeeze",
                         "expand_dims", "copy", "copy_p"})
# Elementwise ops through which a range's parametric output continues into the next range.
_EPILOGUE = frozenset({"add", "add_any", "sub", "mul", "div", "max", "min"})
_REDUCTIONS = frozenset({"reduce_sum", "reduce_max", "reduce_min", "reduce_prod", "reduce_and",
                         "reduce_or", "reduce_xor", "argmax", "argmin"})
_CUMULATIVE = frozenset({"cumsum", "cumprod", "cummax", "cummin", "cumlogsumexp"})
_WINDOWED = frozenset({"reduce_window_sum", "reduce_window_max", "reduce_window_min",
                       "reduce_window"})
_CONTROL_FLOW = frozenset({"while", "scan", "cond"})
# Ops acting on each element alone (an activation, an affine map with
# constants): they continue the stage of what they read.
_ELEMENTWISE = frozenset({
    "abs", "acos", "acosh", "add", "add_any", "and", "asin", "asinh", "atan", "atan2", "atanh",
    "cbrt", "ceil", "clamp", "convert_element_type", "copy", "copy_p", "cos", "cosh", "div",
    "eq", "erf", "erf_inv", "erfc", "exp", "exp2", "expm1", "floor", "ge", "gt", "integer_pow",
    "is_finite", "le", "log", "log1p", "logistic", "lt", "max", "min", "mul", "ne", "neg",
    "nextafter", "not", "or", "pow", "reduce_precision", "rem", "round", "rsqrt", "select_n",
    "sign", "sin", "sinh", "sqrt", "square", "sub", "tan", "tanh", "xor"})
_NHWC_HWIO = ((0, 3, 1, 2), (3, 2, 0, 1), (0, 3, 1, 2))
# How a stage is evaluated: on the batch; on the batch, its statistics handed
# on as one copy per sample; sample by sample (its state holds statistics).
_BATCH, _STATISTICS, _PER_SAMPLE = "batch", "statistics", "per sample"
# Levels of custom JVP rules compared between stages: the rules themselves
# (first derivatives, all the solver takes), not the rules of the functions
# they call (second derivatives; tracing those costs as much again per level).
_JVP_ORDERS = 1


@dataclasses.dataclass(frozen=True, eq=False)
class _Eqn:
  """One equation of the inlined program; values are integer ids, constants ``Literal``s."""

  primitive: Any
  params: dict
  inputs: tuple
  outputs: tuple
  where: str
  ctx: Any


def _is_var(a: Any) -> bool:
  return isinstance(a, int)


def _where(eqn: Any, prefix: str) -> str:
  names = "/".join(s for s in (prefix, str(eqn.source_info.name_stack)) if s)
  source = source_info_util.summarize(eqn.source_info)
  return f"{names or '<top level>'} ({source})"


def _is_elementwise(primitive: Any, params: dict) -> bool:
  """Whether an equation acts on each element alone: an elementwise primitive, or a call
  (``jax.nn.relu``'s ``custom_jvp_call``) of such primitives and scalar broadcasts."""
  if primitive.name in _ELEMENTWISE:
    return True
  jaxprs = [j for value in params.values() for j in _sub_jaxprs(value)]
  return bool(jaxprs) and primitive.name not in _CONTROL_FLOW and all(
      (e.primitive.name == "broadcast_in_dim" and not getattr(e.invars[0].aval, "shape", ()))
      or _is_elementwise(e.primitive, e.params) for j in jaxprs for e in j.eqns)


def _sub_jaxprs(value: Any) -> list:
  """The jaxprs held by an equation param (a jaxpr, a closed jaxpr or a tuple of them)."""
  if isinstance(value, jex_core.ClosedJaxpr):
    return [value.jaxpr]
  if isinstance(value, jex_core.Jaxpr):
    return [value]
  if isinstance(value, (tuple, list)):
    return [j for v in value for j in _sub_jaxprs(v)]
  return []


class _Program:
  """``apply_fn`` traced at one batch size: the inlined equations and their dependences.

  Attributes (value ids are integers):
    eqns: live equations in program order.
    param_ids, x_ids: the ids of the params leaves and the input leaves.
    consts: ``{id: value}`` of the jaxpr's constants.
    out_ids, out_tree: the outputs (ids or literals) and their pytree.
    avals: ``{id: aval}``.
    batch_values: ids that depend on ``x``.
    sources: ``{id: frozenset of params leaf indices}`` for the other values.
    x_eqns: positions in ``eqns`` of the batch-dependent equations.
    x_index: ``{id: index in x_eqns of its equation}`` (-1: an input leaf).
    defining: ``{id: position in eqns of the equation computing it}``.
    consumed: per batch-dependent equation, the params leaves it consumes.
    signature: what must agree between two traces for the cuts to carry over.
    uses: ``{id: indices in x_eqns of the batch-dependent equations reading it}``.
  """

  def __init__(self, apply_fn: Callable, params_avals: Any, x_avals: Any):
    closed, out_shapes = jax.make_jaxpr(apply_fn, return_shape=True)(params_avals, x_avals)
    # ``model.apply(..., mutable=[...])`` returns ``(outputs, collections)``:
    # the game's output is the first, the second updates the variables
    # (update_batch_stats), no stage computes it.
    self.mutable = _returns_collections(out_shapes, params_avals)
    model_out = out_shapes[0] if self.mutable else out_shapes
    self.out_tree = jax.tree.structure(model_out)
    self.avals: dict[int, Any] = {}
    self.consts: dict[int, Any] = {}
    self.eqns: list[_Eqn] = []
    self._next = 0
    jaxpr = closed.jaxpr
    num_params = len(jax.tree.leaves(params_avals))
    invars = [self._new(v.aval) for v in jaxpr.invars]
    self.param_ids, self.x_ids = invars[:num_params], invars[num_params:]
    const_ids = [self._new(v.aval) for v in jaxpr.constvars]
    self.consts.update(zip(const_ids, closed.consts))
    outs = self._inline(jaxpr, const_ids + invars, "")
    self.out_ids = outs[:self.out_tree.num_leaves]
    self._dead_code_elimination()
    self._analyse()

  def _new(self, aval: Any) -> int:
    self._next += 1
    self.avals[self._next] = aval
    return self._next

  def _inline(self, jaxpr: Any, in_ids: list, prefix: str) -> list:
    env = dict(zip(list(jaxpr.constvars) + list(jaxpr.invars), in_ids))
    read = lambda a: a if isinstance(a, jex_core.Literal) else env[a]
    for eqn in jaxpr.eqns:
      name = eqn.primitive.name
      args = [read(a) for a in eqn.invars]
      if name in _INLINED and _INLINED[name] in eqn.params:
        sub = eqn.params[_INLINED[name]]
        inner = sub.jaxpr if isinstance(sub, jex_core.ClosedJaxpr) else sub
        consts = []
        for c in getattr(sub, "consts", ()):
          cid = self._new(jax.typeof(c))
          self.consts[cid] = c
          consts.append(cid)
        outs = self._inline(inner, consts + args, "/".join(
            s for s in (prefix, str(eqn.source_info.name_stack)) if s))
      else:
        outs = [self._new(v.aval) for v in eqn.outvars]
        self.eqns.append(_Eqn(eqn.primitive, dict(eqn.params), tuple(args), tuple(outs),
                              _where(eqn, prefix), eqn.ctx))
      for v, o in zip(eqn.outvars, outs):
        env[v] = o
    return [read(v) for v in jaxpr.outvars]

  def _dead_code_elimination(self) -> None:
    needed = {a for a in self.out_ids if _is_var(a)}
    kept = []
    for eqn in reversed(self.eqns):
      if any(o in needed for o in eqn.outputs):
        kept.append(eqn)
        needed.update(a for a in eqn.inputs if _is_var(a))
    self.eqns = kept[::-1]

  def _analyse(self) -> None:
    leaf_of = {v: i for i, v in enumerate(self.param_ids)}
    self.batch_values = set(self.x_ids)
    self.sources: dict[int, frozenset] = {v: frozenset([i]) for v, i in leaf_of.items()}
    self.x_eqns, self.consumed, self.x_index = [], [], {v: -1 for v in self.x_ids}
    self.defining: dict[int, int] = {}
    for pos, eqn in enumerate(self.eqns):
      for o in eqn.outputs:
        self.defining[o] = pos
      args = [a for a in eqn.inputs if _is_var(a)]
      if not any(a in self.batch_values for a in args):
        self.sources.update((o, frozenset().union(*[self.sources.get(a, frozenset())
                                                     for a in args])) for o in eqn.outputs)
        continue
      j = len(self.x_eqns)
      consumed = frozenset().union(*[self.sources.get(a, frozenset()) for a in args
                                     if a not in self.batch_values])
      self.x_eqns.append(pos)
      self.consumed.append(consumed)
      self.batch_values.update(eqn.outputs)
      for o in eqn.outputs:
        self.x_index[o] = j
    self._index()

  def _index(self) -> None:
    """``signature`` and ``uses`` from the order of ``x_eqns``."""
    self.signature = tuple((self.eqns[pos].primitive.name, len(self.eqns[pos].outputs),
                            tuple(self._describe(a) for a in self.eqns[pos].inputs))
                           for pos in self.x_eqns)
    self.uses: dict[int, list[int]] = {}
    for j, pos in enumerate(self.x_eqns):
      for a in self.eqns[pos].inputs:
        if _is_var(a):
          self.uses.setdefault(a, []).append(j)

  def reorder(self, order: list[int]) -> None:
    """Puts the batch-dependent equations in ``order`` (old indices; a topological order)."""
    new_index = {old: new for new, old in enumerate(order)}
    self.x_eqns = [self.x_eqns[j] for j in order]
    self.consumed = [self.consumed[j] for j in order]
    self.x_index = {v: new_index.get(j, -1) for v, j in self.x_index.items()}
    self._index()

  def _describe(self, a: Any) -> tuple:
    if not _is_var(a):
      return ("literal",)
    if a in self.batch_values:
      if a in self.x_ids:
        return ("input", self.x_ids.index(a))
      eqn = self.eqns[self.defining[a]]
      return ("value", self.x_index[a], eqn.outputs.index(a))
    return ("params", tuple(sorted(self.sources.get(a, ()))))

  def live_counts(self) -> list[int]:
    """The number of values :meth:`live` at every cut ``0 .. len(x_eqns)``."""
    count = len(self.x_eqns)
    outputs = {a for a in self.out_ids if _is_var(a)}
    change = [0] * (count + 2)
    vals = list(self.x_ids) + [o for pos in self.x_eqns for o in self.eqns[pos].outputs]
    for v in vals:
      first = self.x_index[v] + 1  # live from the cut after its equation
      last = count if v in outputs else max(self.uses.get(v, ()), default=-1)
      if last >= first:  # live at the cuts first .. last
        change[first] += 1
        change[last + 1] -= 1
    return list(itertools.accumulate(change))[:count + 1]

  def live(self, cut: int) -> list[int]:
    """The batch-dependent values computed before x-equation ``cut`` and used from it on."""
    uses = self.uses
    outputs = {a for a in self.out_ids if _is_var(a)}
    vals = [v for v in self.x_ids]
    for pos in self.x_eqns:
      vals.extend(self.eqns[pos].outputs)
    return [v for v in vals if self.x_index[v] < cut and
            (v in outputs or any(u >= cut for u in uses.get(v, ())))]


def _returns_collections(out: Any, params: Any) -> bool:
  """Whether ``out`` is Flax's ``(outputs, mutated collections)`` for the variables ``params``.

  The second item of a pair must map names of collections of ``params``
  other than ``"params"`` to trees of their leaves' paths and shapes (the
  dtypes may differ: float32 running averages updated from float64 inputs).
  """
  if not (isinstance(out, tuple) and len(out) == 2 and isinstance(out[1], Mapping) and out[1]
          and isinstance(params, Mapping)):
    return False
  layout = lambda tree: [(tuple(games_lib._key_name(k) for k in kp), tuple(np.shape(a)))  # pylint: disable=protected-access
                         for kp, a in jax.tree_util.tree_flatten_with_path(tree)[0]]
  return all(name != "params" and name in params and layout(tree) == layout(params[name])
             for name, tree in out[1].items())


def _batch_axes(a: Any, b: Any) -> frozenset:
  """The axes of a value whose size follows the batch: those that differ between two traces."""
  return frozenset(i for i, (p, q) in enumerate(zip(a.shape, b.shape)) if p != q)


def _avals(atoms: Any, avals: dict) -> list:
  """The avals of equation inputs or outputs (value ids looked up in ``avals``, literals' own)."""
  return [avals[a] if _is_var(a) else a.aval for a in atoms]


def _mixing(name: str, params: dict, ins_a: list, ins_b: list, outs_a: list,
            outs_b: list) -> Optional[str]:
  """Why an equation combines samples (None if it does not), from its avals at two batch sizes."""
  axes = [_batch_axes(a, b) if hasattr(a, "shape") else frozenset()
          for a, b in zip(ins_a, ins_b)]
  out_axes = [_batch_axes(a, b) if hasattr(a, "shape") else frozenset()
              for a, b in zip(outs_a, outs_b)]
  batched = [n for n, ax in enumerate(axes) if ax]
  if not batched:
    return None
  first = axes[batched[0]]
  if name in _REDUCTIONS and first & set(params.get("axes", ())):
    return "reduces over the batch axis"
  if name in _CUMULATIVE and params.get("axis") in first:
    return "accumulates along the batch axis"
  if name == "sort" and params.get("dimension") in first:
    return "sorts along the batch axis"
  if name == "rev" and first & set(params.get("dimensions", ())):
    return "reverses the batch axis"
  if name == "concatenate" and any(params["dimension"] in ax for ax in axes):
    return "concatenates along the batch axis"
  if name == "pad" and any(tuple(params["padding_config"][d]) != (0, 0, 0) for d in first):
    return "pads the batch axis"
  if name == "slice":
    shape = ins_a[0].shape
    for d in first:
      strides = params.get("strides") or (1,) * len(shape)
      if (params["start_indices"][d], params["limit_indices"][d], strides[d]) != (0, shape[d], 1):
        return "slices the batch axis"
  if name in ("dynamic_slice", "gather"):
    shape = ins_a[0].shape
    keep = set(getattr(params.get("dimension_numbers"), "operand_batching_dims", ()))
    if any(params["slice_sizes"][d] != shape[d] and d not in keep for d in axes[0]):
      return "indexes into the batch axis"
  if name == "dot_general":
    (lc, rc), (lb, rb) = params["dimension_numbers"]
    if axes[0] & set(lc) or (len(axes) > 1 and axes[1] & set(rc)):
      return "contracts the batch axis"
    if len(batched) == 2 and not (axes[0] <= set(lb) and axes[1] <= set(rb)):
      return "multiplies the samples of one operand with those of the other"
  if name == "conv_general_dilated":
    if axes[1] or params["batch_group_count"] != 1 or not axes[0] <= {
        params["dimension_numbers"].lhs_spec[0]}:
      return "convolves across the batch axis"
  if name == "scan":
    scanned = range(params["num_consts"] + params["num_carry"], len(axes))
    if any(0 in axes[n] for n in scanned):
      return "scans along the batch axis"
  if name in _WINDOWED:
    for d in first:
      pad = tuple(params["padding"][d]) if "padding" in params else (0, 0)
      if (params["window_dimensions"][d], params["window_strides"][d], pad) != (1, 1, (0, 0)):
        return "pools across the batch axis"
  # Control flow may return loop counters beside batch values; its bodies are checked.
  if name not in _CONTROL_FLOW and any(not ax and hasattr(o, "shape")
                                       for ax, o in zip(out_axes, outs_a)):
    return "makes a value without the batch axis from batch-dependent inputs"
  return None


def _check_samples(name: str, params: dict, ins: tuple, outs: tuple, where: str) -> None:
  """Raises a ``ValueError`` if the equation (at two batch sizes) combines samples.

  ``ins``/``outs`` are pairs ``(avals at batch B, avals at batch B')``; the
  sub-jaxprs of ``custom_jvp_call``, control flow and the like are checked
  equation by equation.
  """
  reason = _mixing(name, params, ins[0], ins[1], outs[0], outs[1])
  if reason is not None:
    raise ValueError(
        f"from_function: {name} at {where} {reason}, so the samples of a batch do not "
        "propagate independently through the network (a game's stage must act on each "
        "sample alone; the one coupling supported is a batch statistic: a reduce_sum over "
        "every batch axis, outside control flow and custom derivatives, as a mean or a "
        "mean of squares)")


def _is_statistic(name: str, params: dict, ins: tuple, outs: tuple) -> bool:
  """Whether an equation (avals at two batch sizes) sums its operand over every batch axis."""
  if name != "reduce_sum" or not hasattr(ins[0][0], "shape"):
    return False
  axes = _batch_axes(ins[0][0], ins[1][0])
  return bool(axes) and axes <= set(params["axes"]) and not _batch_axes(outs[0][0], outs[1][0])


def _check_program_samples(prog_a: _Program, prog_b: _Program) -> set[int]:
  """Checks every batch-dependent equation of the example trace against the second trace.

  Returns:
    The x-equation indices of the batch statistics' reductions (sums over
    every batch axis, at the top level of the program), which the stages
    treat by the BatchNorm rule (module docstring); any other combination of
    samples is an error.
  """

  def check_jaxprs(ja: Any, jb: Any, where: str) -> None:
    if len(ja.eqns) != len(jb.eqns):
      return
    for ea, eb in zip(ja.eqns, jb.eqns):
      if ea.primitive.name != eb.primitive.name:
        return
      ins = ([v.aval for v in ea.invars], [v.aval for v in eb.invars])
      outs = ([v.aval for v in ea.outvars], [v.aval for v in eb.outvars])
      check_eqn(ea.primitive.name, ea.params, eb.params, ins, outs, where)

  def check_eqn(name, params_a, params_b, ins, outs, where):
    _check_samples(name, params_a, ins, outs, where)
    subs_a = [j for v in params_a.values() for j in _sub_jaxprs(v)]
    subs_b = [j for v in params_b.values() for j in _sub_jaxprs(v)]
    if len(subs_a) == len(subs_b):
      for ja, jb in zip(subs_a, subs_b):
        check_jaxprs(ja, jb, where)

  reductions = set()
  for j, (pa, pb) in enumerate(zip(prog_a.x_eqns, prog_b.x_eqns)):
    ea, eb = prog_a.eqns[pa], prog_b.eqns[pb]
    ins = (_avals(ea.inputs, prog_a.avals), _avals(eb.inputs, prog_b.avals))
    outs = (_avals(ea.outputs, prog_a.avals), _avals(eb.outputs, prog_b.avals))
    if _is_statistic(ea.primitive.name, ea.params, ins, outs):
      reductions.add(j)
    else:
      check_eqn(ea.primitive.name, ea.params, eb.params, ins, outs, ea.where)
  return reductions


_RANDOM = frozenset({"random_bits", "rng_bit_generator", "rng_uniform", "threefry2x32"})


def _check_random_draws(prog_a: _Program, prog_b: _Program) -> None:
  """Raises a ``ValueError`` if random numbers of a batch-sized shape come from a fixed key.

  Dropout with ``rngs={"dropout": key}`` closed over by ``apply_fn``: the
  solver evaluates the stages at other batch sizes and on single samples,
  where the same key draws other numbers, so the stages would not compute
  the network the example batch does.
  """
  if len(prog_a.eqns) != len(prog_b.eqns):
    return
  for ea, eb in zip(prog_a.eqns, prog_b.eqns):
    if any(_is_var(a) and a in prog_a.batch_values for a in ea.inputs):
      continue  # keys of the batch: each sample's numbers come from its own key
    if ea.primitive.name in _RANDOM and ea.primitive.name == eb.primitive.name and any(
        prog_a.avals[a].shape != prog_b.avals[b].shape for a, b in zip(ea.outputs, eb.outputs)):
      raise ValueError(
          f"from_function: {ea.primitive.name} at {ea.where} draws random numbers whose shape "
          "follows the batch from a key apply_fn holds (dropout with rngs={'dropout': key}?); "
          "the stages are evaluated on other batch sizes and single samples, where that key "
          "draws other numbers: give each sample its own key from a seed in the batch "
          "(games.per_sample_rngs), or apply the model with deterministic=True")


def _encoded(value: Array, dtype: Any, stage: str) -> Array:
  """A state value as floats of ``dtype``, exactly: the solver's states are float arrays.

  Floats pass unchanged; a boolean (a dropout mask) becomes 0/1; an integer
  of at most 32 bits (a per-sample seed, a token id) its high and low 16
  bits on a new last axis, exact in any float type. :func:`_decoded` inverts
  it. The solver differentiates through these floats; the stage that reads
  them converts them back, so their derivatives are zero.
  """
  kind = jnp.result_type(value)
  if jnp.issubdtype(kind, jnp.floating):
    return value
  if kind == jnp.bool_:
    return value.astype(dtype)
  if jnp.issubdtype(kind, jnp.integer) and np.dtype(kind).itemsize <= 4:
    bits = jax.lax.convert_element_type(value, jnp.uint32)
    return jnp.stack([bits >> 16, bits & 0xFFFF], axis=-1).astype(dtype)
  raise TypeError(f"from_function: {stage} hands on a value of dtype {kind} to the next "
                  "stage; states are floats, booleans or integers of at most 32 bits (a "
                  "PRNG key: derive it in the stage that draws from it, from a per-sample "
                  "seed in the batch)")


def _decoded(value: Array, dtype: Any) -> Array:
  """The state value :func:`_encoded` made floats of, back in the program's ``dtype``."""
  if jnp.result_type(value) == dtype:
    return value
  if dtype == jnp.bool_:
    return value > 0.5
  if jnp.issubdtype(dtype, jnp.integer):
    halves = jnp.round(value).astype(jnp.uint32)
    bits = (halves[..., 0] << 16) | halves[..., 1]
    return jax.lax.convert_element_type(bits, dtype)
  return value


def _failing_module(error: BaseException) -> str:
  """The path of the innermost Flax module whose method raised ``error`` ("?" if none)."""
  path, tb = "?", error.__traceback__
  while tb is not None:
    module = tb.tb_frame.f_locals.get("self")
    scope = getattr(module, "scope", None) if isinstance(module, nn.Module) else None
    if scope is not None:
      path = "/".join(scope.path) or type(module).__name__
    tb = tb.tb_next
  return path


def _array_key(value: Any) -> tuple:
  """A hashable key equal for two arrays exactly when their shapes, dtypes and values are."""
  a = np.asarray(value)
  return ("array", a.shape, str(a.dtype), a.tobytes())


class _CanonicalForms:
  """Forms of equation params and sub-jaxprs that are equal for programs equal up to renaming.

  Two stages share one stage function when their programs are the same up
  to the names of their variables (:meth:`_TracedGame.representatives`): the
  shared function binds one stage's equations to the other's state and
  params, so every part of an equation that its result depends on must be
  compared, by value, not by object: the primitive, its params (nested
  tuples, arrays by their bytes, sub-jaxprs by their own forms), the avals
  and the context it is bound in. Objects that cannot be compared by value
  (a Python callable such as a ``custom_vjp`` backward rule) are compared by
  identity, so that stages holding distinct ones keep their own functions.
  A ``custom_jvp_call``'s JVP rule is a thunk made afresh for every call: it
  is compared through the JVP jaxpr it traces (with every tangent nonzero,
  the only case whose jaxpr does not depend on which tangents the caller
  has; a rule that asks for ``symbolic_zeros`` is compared by identity).
  A JVP jaxpr may call the function again (``relu``'s does), so rules are
  traced to ``jvp_orders`` levels (:data:`_JVP_ORDERS`): the derivatives of
  the stage functions to that order are compared.

  One instance per program: the forms of sub-jaxprs and constants are
  computed once however many equations hold them. ``jvp_orders``: how many
  levels of JVP rules are traced (0: none, the rules are left out).
  """

  def __init__(self, consts: dict, jvp_orders: int):
    self._consts = consts
    self._jvp_orders = jvp_orders
    self._const_keys: dict[int, tuple] = {}
    self._jaxprs: dict[tuple, tuple] = {}  # (id, order) -> (the jaxpr, kept alive; its form)
    self._order = 0  # how many JVP rules the jaxpr being formed is nested in

  def const(self, v: int) -> tuple:
    if v not in self._const_keys:
      self._const_keys[v] = ("const", _array_key(self._consts[v]))
    return self._const_keys[v]

  def value(self, v: Any) -> Any:
    """The form of one equation param."""
    if isinstance(v, (jex_core.ClosedJaxpr, jex_core.Jaxpr)):
      return self.jaxpr(v)
    if isinstance(v, (np.ndarray, np.generic, jax.Array)):
      return _array_key(v)
    if isinstance(v, (tuple, list)):
      return (type(v), tuple(self.value(e) for e in v))
    if isinstance(v, dict):
      return (dict, tuple((k, self.value(e)) for k, e in v.items()))
    try:
      hash(v)
    except TypeError:
      return ("object", id(v))
    return (type(v), v)

  def params(self, primitive: Any, params: dict, num_inputs: int) -> tuple:
    """The form of an equation's params."""
    form = []
    for name, v in params.items():
      if primitive.name == "custom_jvp_call" and name == "jvp_jaxpr_fun":
        if self._order >= self._jvp_orders:
          continue
        if not params.get("symbolic_zeros", False):
          v = self._jvp(v, num_inputs - params["num_consts"])
      form.append((name, self.value(v)))
    return tuple(form)

  def _jvp(self, rule: Any, num_tangents: int) -> Any:
    """A ``custom_jvp_call``'s JVP rule as (its jaxpr, its constants, its zero outputs)."""
    try:
      jaxpr, consts, out_zeros = rule.call_wrapped(*[False] * num_tangents)
    except Exception:  # pylint: disable=broad-except  (compared by identity instead)
      return rule
    self._order += 1
    try:
      form = self.jaxpr(jaxpr)
    finally:
      self._order -= 1
    return ("jvp", form, tuple(_array_key(c) for c in consts), tuple(out_zeros))

  def jaxpr(self, j: Any) -> tuple:
    """The form of a (closed) jaxpr: its equations with variables named by position."""
    key = (id(j), self._order)
    if key in self._jaxprs:
      return self._jaxprs[key][1]
    inner = j.jaxpr if isinstance(j, jex_core.ClosedJaxpr) else j
    names = {v: ("const", n) for n, v in enumerate(inner.constvars)}
    names.update((v, ("in", n)) for n, v in enumerate(inner.invars))
    atom = lambda a: (("literal", a.aval, _array_key(a.val))
                      if isinstance(a, jex_core.Literal) else names[a])
    eqns = []
    for e, eqn in enumerate(inner.eqns):
      inputs = tuple(atom(a) for a in eqn.invars)
      names.update((v, ("eqn", e, n)) for n, v in enumerate(eqn.outvars))
      eqns.append((eqn.primitive, self.params(eqn.primitive, eqn.params, len(eqn.invars)),
                   inputs, tuple(v.aval for v in eqn.outvars), eqn.ctx))
    form = (tuple(v.aval for v in inner.constvars), tuple(v.aval for v in inner.invars),
            tuple(eqns), tuple(atom(a) for a in inner.outvars),
            tuple(_array_key(c) for c in getattr(j, "consts", ())))
    self._jaxprs[key] = (j, form)
    return form


def _levels(prog: _Program, layers: list[tuple[int, int]], alignment: str,
            statistics: frozenset = frozenset(),
            reductions: frozenset = frozenset()) -> tuple[list, list]:
  """The stage level of every layer, and the batch-dependent equations in stage order.

  ``layers`` are the x-equation ranges of the layers, in program order. A
  layer reads another when one of its equations reads, directly or through
  parameter-free equations, a value the other's equations compute. With
  ``"split"`` a layer plays at its depth, the longest chain of layers it
  reads (as early as its inputs allow: a projection shortcut beside the
  residual body's first layer); with ``"merge"`` at the deepest layer's
  depth less the longest chain of layers that read it (as late as its users
  allow: beside the body's last layer). Parallel branches of equal depth
  play at one level either way (DGNOpt Fig. 3a, 10a). A parameter-free
  equation plays at the latest level of the values it reads (an activation
  in the stage of the layer before it; what reads only the input, in the
  first stage).

  One exception: a chain of parameter-free equations that begins at a fork
  (a value other equations read too) and feeds one layer alone plays in that
  layer's stage (:func:`_branch_prefixes`): an inception branch's pooling
  joins the branch's convolution, and the state between the stages is the
  block's input, not the pooled copy beside it.

  Returns:
    (level per layer, level per x-equation, the x-equations in stage order). No equation's level
    is below the levels of the equations it reads, so the equations sorted
    by level are in an order the program can run in. Within a level the
    layers' equations come first, then the parameter-free equations reading
    them (a layer at a level reads only lower levels, or parameter-free
    equations on the input alone): the operations between the layers of one
    stage are those of the layers, and a batch statistic of one branch does
    not fall inside the stage's layers. Among the parameter-free equations,
    the early statistics (:func:`_early_statistics`) come first, so that the
    statistics of parallel branches (a residual body's and its projection
    shortcut's BatchNorms) are one statistics stage; program order otherwise.
  """
  owner = {j: n for n, (first, last) in enumerate(layers) for j in range(first, last + 1)}
  count = len(prog.x_eqns)
  producers = [sorted({prog.x_index[a] for a in prog.eqns[prog.x_eqns[j]].inputs
                       if _is_var(a) and a in prog.batch_values and a not in prog.x_ids})
               for j in range(count)]  # the x-equations each one reads
  reads: list[set] = []  # per equation, the layers it reads through parameter-free equations
  for j in range(count):
    reads.append(set().union(*[{owner[i]} if i in owner else reads[i] for i in producers[j]]))
  read_by_layer = [set() for _ in layers]
  for j, n in owner.items():
    read_by_layer[n] |= reads[j] - {n}
  depth: list[int] = []
  for n in range(len(layers)):
    depth.append(1 + max((depth[m] for m in read_by_layer[n]), default=-1))
  if alignment == "split":
    layer_levels = depth
  else:
    height = [0] * len(layers)
    for n in reversed(range(len(layers))):
      for m in read_by_layer[n]:
        height[m] = max(height[m], height[n] + 1)
    layer_levels = [max(depth) - h for h in height]
  eqn_levels: list[int] = []
  for j in range(count):
    eqn_levels.append(layer_levels[owner[j]] if j in owner else
                      max((eqn_levels[i] for i in producers[j]), default=0))
  for chain, n in _branch_prefixes(prog, owner, statistics):
    for j in chain:
      eqn_levels[j] = layer_levels[n]
  after_layers = [j not in owner and any(layer_levels[n] == eqn_levels[j] for n in reads[j])
                  for j in range(count)]
  early = _early_statistics(prog, producers, owner, statistics, reductions)
  # A topological order by (level, after the layers, not an early statistic, program order).
  key = lambda j: (eqn_levels[j], after_layers[j], not early[j], j)
  waiting = [len(producers[j]) for j in range(count)]
  readers: dict[int, set] = {}
  for j in range(count):
    for i in producers[j]:
      readers.setdefault(i, set()).add(j)
  ready = [key(j) for j in range(count) if not waiting[j]]
  heapq.heapify(ready)
  order = []
  while ready:
    j = heapq.heappop(ready)[-1]
    order.append(j)
    for r in readers.get(j, ()):
      waiting[r] -= 1
      if not waiting[r]:
        heapq.heappush(ready, key(r))
  return layer_levels, eqn_levels, order


def _branch_prefixes(prog: _Program, owner: dict, statistics: frozenset
                     ) -> list[tuple[list[int], int]]:
  """Chains of parameter-free equations from a fork to one layer: ``(x-equations, layer)``.

  A chain link is a parameter-free x-equation, not a statistic, with one
  batch-dependent input, whose outputs one equation alone reads (the next
  link, or an equation of the layer). A chain begins where its first link's
  input is a fork: a value other equations read too (a block's input read by
  every branch), or an output. A chain whose first link reads a value only
  it reads continues the stage before it instead (an activation after its
  layer). These are the parameter-free layers at the start of a branch
  (``[avg_pool, conv]``), which the branch's stage computes from the fork.
  """
  count = len(prog.x_eqns)
  outputs = {a for a in prog.out_ids if _is_var(a)}
  batch_input = {}
  reader = {}
  for j in range(count):
    if j in owner or j in statistics:
      continue
    eqn = prog.eqns[prog.x_eqns[j]]
    ins = {a for a in eqn.inputs if _is_var(a) and a in prog.batch_values}
    if len(ins) != 1 or outputs.intersection(eqn.outputs):
      continue
    users = {u for o in eqn.outputs for u in prog.uses.get(o, ())}
    if len(users) == 1:
      batch_input[j], reader[j] = ins.pop(), users.pop()
  target: dict[int, int] = {}
  for j in sorted(reader, reverse=True):
    if reader[j] in owner:
      target[j] = owner[reader[j]]
    elif reader[j] in target:
      target[j] = target[reader[j]]
  chains = []
  for j in sorted(target):
    v = batch_input[j]
    if prog.x_index[v] in target or prog.x_index[v] in statistics:  # a later link; statistics
      continue
    if len(set(prog.uses.get(v, ()))) > 1 or v in outputs:
      chain = [j]
      while reader[chain[-1]] not in owner:
        chain.append(reader[chain[-1]])
      chains.append((chain, target[j]))
  return chains


def _early_statistics(prog: _Program, producers: list, owner: dict, statistics: frozenset,
                      reductions: frozenset) -> list[bool]:
  """Per x-equation: whether it computes batch statistics before the batch first reads them.

  ``statistics`` are the x-equations with an output without a batch axis,
  ``reductions`` the batch reductions among them. A statistic is early when
  it comes, in program order, before the first equation that reads on the
  batch a statistic computed from the same reductions (a BatchNorm's mean
  and variance come before ``x - mean``; ``rsqrt(var + eps)``, after it,
  does not); a parameter-free equation whose values only early statistics
  read (``x * x`` for a mean of squares) is early too. The statistics of
  parallel BatchNorms (a residual body's and its projection shortcut's)
  then share one statistics stage, whichever branch each is on.
  """
  count = len(prog.x_eqns)
  roots: list[set] = [set() for _ in range(count)]  # the reductions a statistic is computed from
  for j in sorted(statistics):
    roots[j] = ({j} if j in reductions else set()).union(
        *[roots[p] for p in producers[j] if p in statistics])
  first_use: dict[int, int] = {}
  for j in range(count):
    if j not in statistics:
      for p in producers[j]:
        if p in statistics:
          for r in roots[p]:
            first_use.setdefault(r, j)
  outputs = {a for a in prog.out_ids if _is_var(a)}
  early = [False] * count
  for j in reversed(range(count)):
    if j in owner:
      continue
    outs = prog.eqns[prog.x_eqns[j]].outputs
    if j in statistics:
      early[j] = j < min((first_use.get(r, count) for r in roots[j]), default=count)
    else:
      users = {u for o in outs for u in prog.uses.get(o, ())}
      early[j] = bool(users) and not outputs.intersection(outs) and all(early[u] for u in users)
  return early


@dataclasses.dataclass(frozen=True)
class _Tap:
  """Where a Kronecker player's pre-activation is: x-equation indices and its layer."""

  player: int
  product: int  # the dot_general / conv
  preactivation: int  # the bias add (the product without a bias)
  layer: Any


class _TracedGame:
  """The cut of ``apply_fn``'s program into stages, and the stage functions' evaluator."""

  def __init__(self, apply_fn: Callable, params: Params, example_input: Any,
               alignment: str = "merge"):
    self.apply_fn = apply_fn
    self.alignment = alignment
    self._order: Optional[list[int]] = None
    self.params_avals = jax.tree.map(lambda p: jax.ShapeDtypeStruct(np.shape(p),
                                                                    jnp.result_type(p)),
                                     params)
    x_leaves, self.x_tree = jax.tree.flatten(example_input)
    if not x_leaves:
      raise ValueError("from_function: example_input has no arrays")
    self.x_avals = [jax.ShapeDtypeStruct(tuple(np.shape(x)), jnp.result_type(x))
                    for x in x_leaves]
    if any(len(a.shape) == 0 for a in self.x_avals):
      raise ValueError("from_function: every leaf of example_input needs a leading batch axis")
    sizes = {a.shape[0] for a in self.x_avals}
    if len(sizes) != 1:
      raise ValueError(f"from_function: the leaves of example_input have different batch "
                       f"sizes {sorted(sizes)}")
    self.batch = sizes.pop()
    self._programs: dict[int, _Program] = {}
    self._plans: dict[tuple[int, int], Any] = {}
    self.leaf_paths = [tuple(games_lib._key_name(k) for k in kp)  # pylint: disable=protected-access
                       for kp, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
    example = self.program(self.batch)
    self.other_batch = self.batch + 1 if self.batch > 1 else 2
    other = self.program(self.other_batch)
    self.reductions = _check_program_samples(example, other)
    _check_random_draws(example, other)
    # Batch-dependent values without a batch axis: (x-equation, output) keys.
    self.statistics = {
        (j, o) for j, (pa, pb) in enumerate(zip(example.x_eqns, other.x_eqns))
        for o, (va, vb) in enumerate(zip(example.eqns[pa].outputs, other.eqns[pb].outputs))
        if hasattr(example.avals[va], "shape") and
        not _batch_axes(example.avals[va], other.avals[vb])}
    self._cut(example, other)
    # Stage k is evaluated by the plan of stage representative[k]; every later
    # trace (another batch size) must group the stages alike.
    self.representative = self._representatives(example)
    self._check_representatives(other, f"batch size {self.other_batch}")

  # -- traces ---------------------------------------------------------------

  def program(self, batch: int) -> _Program:
    """The program traced at ``batch`` (once per batch size)."""
    if batch not in self._programs:
      x = jax.tree.unflatten(self.x_tree, [jax.ShapeDtypeStruct((batch,) + a.shape[1:], a.dtype)
                                           for a in self.x_avals])
      try:
        prog = _Program(self.apply_fn, self.params_avals, x)
      except flax_errors.InvalidRngError as e:
        raise ValueError(
            f"from_function: the module at {_failing_module(e)!r} draws random numbers "
            f"without an rng ({e}); for dropout in train mode give each sample its own key "
            "from a seed in the batch (games.per_sample_rngs), or apply the model with "
            "deterministic=True (or train=False for its dropout)"
        ) from e
      if self._order is not None:
        prog.reorder(self._order)
      if self._programs:
        self._check_same(prog, f"batch size {batch}")
      self._programs[batch] = prog
      if hasattr(self, "representative"):
        self._check_representatives(prog, f"batch size {batch}")
    return self._programs[batch]

  def _check_same(self, prog: _Program, what: str) -> None:
    example = self._programs[self.batch]
    if prog.signature == example.signature:
      return
    for j, (a, b) in enumerate(zip(example.signature, prog.signature)):
      if a != b:
        raise ValueError(
            f"from_function: traced at {what}, apply_fn computes differently from the example "
            f"batch (size {self.batch}): operation {j} on the batch is {b[0]} at "
            f"{prog.eqns[prog.x_eqns[j]].where}, where the example has {a[0]} at "
            f"{example.eqns[example.x_eqns[j]].where}; the stages need a program whose "
            "operations do not depend on the batch size")
    raise ValueError(
        f"from_function: traced at {what}, apply_fn has {len(prog.signature)} operations on "
        f"the batch, the example batch (size {self.batch}) {len(example.signature)}; the "
        "stages need a program whose operations do not depend on the batch size")

  # -- stages with the same program ------------------------------------------

  def _stage_form(self, prog: _Program, k: int, forms: _CanonicalForms) -> tuple:
    """Stage ``k``'s program up to the names of its values: equal for stages one function computes.

    Values are named by their role: the ``n``-th array of the incoming state,
    leaf ``m`` of the stage's ``n``-th player (by position in its params
    subtree), the ``n``-th output of the stage's ``e``-th equation, a constant
    or a literal by its value. Two stages with equal forms evaluate the same
    equations on the same kinds of values and hand on the same layout of
    values, so that one stage's plan evaluated on the other's state and
    params computes the other stage (:meth:`evaluate`). The taps (which
    equation, which player, which layer input) and the first and last stage's
    own handling of the input and output are part of the form.
    """
    inputs, eqns, positions, outputs, taps, leaf_ids = self._plan(prog, k)
    names = {v: ("state", n) for n, v in enumerate(inputs)}
    for n, ids in enumerate(leaf_ids):
      names.update((v, ("theta", n, m)) for m, v in enumerate(ids))

    def atom(a):
      if not _is_var(a):
        return ("literal", a.aval, _array_key(a.val))
      if a in names:
        return names[a]
      return forms.const(a)  # every other value a stage reads is a constant

    body = []
    for e, (pos, eqn) in enumerate(zip(positions, eqns)):
      args = tuple(atom(a) for a in eqn.inputs)
      names.update((o, ("eqn", e, n)) for n, o in enumerate(eqn.outputs))
      tap = taps.get(pos)
      body.append((eqn.primitive, forms.params(eqn.primitive, eqn.params, len(eqn.inputs)),
                   args, tuple(prog.avals[o] for o in eqn.outputs), eqn.ctx,
                   tap and (tap[0], atom(tap[1]), tap[2])))
    return (k == 0, k == len(self.units) - 1, self.kinds[k], tuple(prog.avals[v] for v in inputs),
            tuple(tuple(prog.avals[v] for v in ids) for ids in leaf_ids), tuple(body),
            tuple(atom(a) for a in outputs))

  def _representatives(self, prog: _Program) -> list[int]:
    """Per stage, the first stage whose program is the same up to renaming (:meth:`_stage_form`).

    Stages with one representative get one stage function object, so that
    :func:`segments.plan_segments` solves a run of them (equal layers, or the
    stages of equal blocks) with ``lax.scan``. Each stage's form is computed
    once, in one pass over its equations (sub-jaxprs once per program).
    """
    forms = _CanonicalForms(prog.consts, _JVP_ORDERS)
    first: dict[tuple, int] = {}
    return [first.setdefault(self._stage_form(prog, k, forms), k)
            for k in range(len(self.units))]

  def _check_representatives(self, prog: _Program, what: str) -> None:
    """Raises a ``ValueError`` unless every stage's program in ``prog`` is its representative's.

    The custom JVP rules, compared on the example's trace, are the same
    Python rules traced at another batch size: they are not traced again.
    """
    forms = _CanonicalForms(prog.consts, 0)
    of_representative = {}
    for k, r in enumerate(self.representative):
      if r == k:
        continue
      if r not in of_representative:
        of_representative[r] = self._stage_form(prog, r, forms)
      if self._stage_form(prog, k, forms) != of_representative[r]:
        raise ValueError(
            f"from_function: traced at {what}, stage {k} "
            f"({', '.join(self._name(u) for u in self.units[k])}) computes differently from "
            f"stage {r}, whose program it has on the example batch (size {self.batch}); the "
            "stages need a program whose operations do not depend on the batch size")

  # -- players and stages -----------------------------------------------------

  def _name(self, path: Path) -> str:
    return "/".join(map(str, path)) or "<root>"

  def is_statistic(self, prog: _Program, v: Any) -> bool:
    """Whether ``v`` is a batch statistic or computed from batch statistics alone (no batch axis)."""
    if not _is_var(v) or v not in prog.batch_values or v in prog.x_ids:
      return False
    j = prog.x_index[v]
    return (j, prog.eqns[prog.x_eqns[j]].outputs.index(v)) in self.statistics

  def _cut(self, prog: _Program, other: _Program) -> None:
    paths = self.leaf_paths
    # Flax variables: the "params" collection holds the players; the others
    # (a BatchNorm's running averages) must not act on the batch.
    flax_variables = isinstance(self.params_avals, Mapping) and "params" in self.params_avals
    owned = [i for i, p in enumerate(paths) if not flax_variables or p[:1] == ("params",)]
    consumers: dict[int, list[int]] = {}
    for j, leaves in enumerate(prog.consumed):
      for i in leaves:
        if i not in owned:
          eqn = prog.eqns[prog.x_eqns[j]]
          raise ValueError(
              f"from_function: the variable {self._name(paths[i])!r}, outside the 'params' "
              f"collection, acts on the batch ({eqn.primitive.name} at {eqn.where}); only "
              "'params' leaves are players, the other collections are state the game does "
              "not train: apply a BatchNorm in train mode (mutable=['batch_stats']), or "
              "close over eval-mode running averages in apply_fn")
        consumers.setdefault(i, []).append(j)
    if not consumers:
      raise ValueError("from_function: no params act on the batch in apply_fn, so the game "
                       "would have no players")
    unused = [self._name(paths[i]) for i in owned if i not in consumers]
    if unused:
      raise ValueError(f"from_function: params {unused} do not act on the batch in apply_fn "
                       "(unused, or used only for outputs that do not depend on the input); "
                       "every params leaf must belong to a player")
    # Players: leaves grouped by parent; a leaf under the root, or under a node
    # holding another group's leaves too, is a player of its own.
    parent = {i: paths[i][:-1] for i in owned}
    unit = {}
    for i in owned:
      owner = parent[i]
      nested = any(parent[k] != owner and paths[k][:len(owner)] == owner for k in parent)
      unit[i] = owner if owner and not nested else paths[i]
    units: dict[Path, list[int]] = {}
    for i in owned:
      units.setdefault(unit[i], []).append(i)
    for u, leaves in units.items():
      try:
        sub = games_lib.get_path(self.params_avals, u)
      except ValueError:
        sub = None
      if sub is None or len(jax.tree.leaves(sub)) != len(leaves):
        raise TypeError(f"from_function: the params node at {self._name(u)!r} cannot be "
                        "addressed by dict keys and sequence indices")
    # A leaf consumed on both sides of another player's layer is shared by two layers.
    owner_of = lambda j: {unit[i] for i in prog.consumed[j]}
    for i, js in consumers.items():
      for a, b in zip(js, js[1:]):
        between = [k for k in range(a + 1, b) if owner_of(k) - {unit[i]}]
        if between:
          other_layer = prog.eqns[prog.x_eqns[between[0]]]
          raise ValueError(
              f"from_function: params {self._name(paths[i])!r} are used by two layers (at "
              f"{prog.eqns[prog.x_eqns[a]].where} and at {prog.eqns[prog.x_eqns[b]].where}, "
              f"with {other_layer.primitive.name} at {other_layer.where} between them); "
              "tied weights are not supported: give each layer its own params")
    # Ranges of x-equations per player, merged where they overlap.
    spans = {}
    for u, leaves in units.items():
      js = [j for i in leaves for j in consumers[i]]
      spans[u] = (min(js), max(js))
    groups: list[list] = []  # [first, last, [units]]
    for u in sorted(spans, key=lambda u: spans[u]):
      first, last = spans[u]
      if groups and first <= groups[-1][1]:
        groups[-1][1] = max(groups[-1][1], last)
        groups[-1][2].append(u)
      elif groups and self._continues(prog, first, groups[-1]):
        groups[-1][1] = max(groups[-1][1], last)
        groups[-1][2].append(u)
      else:
        groups.append([first, last, [u]])
    # Layers at one level share a stage; the equations are put in stage order.
    layer_levels, eqn_levels, order = _levels(prog, [(g[0], g[1]) for g in groups], self.alignment,
                                  frozenset(j for j, _ in self.statistics),
                                  frozenset(self.reductions))
    new_index = {old: new for new, old in enumerate(order)}
    if order != list(range(len(order))):
      self._order = order
      for p in (prog, other):
        p.reorder(order)
      consumers = {i: sorted(new_index[j] for j in js) for i, js in consumers.items()}
      self.reductions = {new_index[r] for r in self.reductions}
      self.statistics = {(new_index[j], o) for j, o in self.statistics}
    levels: dict[int, list] = {}
    for (first, last, us), level in zip(groups, layer_levels):
      merged = levels.setdefault(level, [new_index[first], new_index[last], []])
      merged[0], merged[1] = min(merged[0], new_index[first]), max(merged[1], new_index[last])
      merged[2].extend(us)
    for old, level in enumerate(eqn_levels):  # a branch's parameter-free start (_branch_prefixes)
      if level in levels:
        levels[level][0] = min(levels[level][0], new_index[old])
    self._stages(prog, [levels[level] for level in sorted(levels)],
                 lambda v: self._is_state(prog, other, v))
    self.unit_leaves = units
    # States between stages must carry the batch on axis 0 alone (statistics:
    # one copy per sample).
    for k in range(1, len(self.starts)):
      for v in prog.live(self.starts[k]):
        if not self.is_statistic(prog, v):
          self._check_state(prog, other, v, f"the state before stage {k}")
    for v in prog.out_ids:
      if not _is_var(v) or v not in prog.batch_values:
        raise ValueError("from_function: an output of apply_fn does not depend on the input")
      self._check_state(prog, other, v, "the output")
    self.taps = {}
    for k, us in enumerate(self.units):
      if self.kinds[k] == _PER_SAMPLE:  # evaluated under vmap: the taps would leak
        continue
      for n, u in enumerate(us):
        tap = self._kronecker(prog, other, n, u, consumers)
        if tap is not None:
          self.taps[(k, n)] = tap

  def _stages(self, prog: _Program, groups: list, is_state: Callable[[int], bool]) -> None:
    """Cuts the program into stages at the players' layers and around the batch statistics.

    A statistics stage begins with the parameter-free operations before a
    batch reduction whose values only the statistics use, and ends before the
    first operation that makes a batched value from a statistic (``x - mean``)
    or reads a statistic computed before it, or at the next layer. The
    operations after it form a stage with the next layer when statistics are
    live where that layer begins (a BatchNorm's ``scale`` multiplies
    ``rsqrt(var + eps)``), else one of their own. A parameter-free
    operation, not elementwise, from a state of one value to a state of one
    value (``is_state``: the samples on the leading axis alone) outside the
    layers and the statistics is a stage of its own. Sets ``starts``, ``ends``,
    ``units`` and ``kinds``.

    Raises:
      ValueError: a batch reduction inside a layer (between the first and
        the last use of a player's params).
    """
    n = len(prog.x_eqns)
    stat = lambda v: self.is_statistic(prog, v)
    eqn_at = lambda j: prog.eqns[prog.x_eqns[j]]
    firsts = [g[0] for g in groups]
    segments: list[tuple[int, int]] = []
    for r in sorted(self.reductions):
      if segments and r < segments[-1][1]:
        continue
      for first, last, us in groups:
        if first <= r <= last:
          eqn = eqn_at(r)
          raise ValueError(
              f"from_function: {eqn.primitive.name} at {eqn.where} computes a batch statistic "
              f"inside the layer of {' and '.join(map(self._name, us))} (between the first "
              "and the last use of its params), where no statistics stage can be cut; "
              "compute it before the layer uses its params, or after")
      limit = min([f for f in firsts if f > r], default=n)
      end, computed = r, set()
      while end < limit:
        eqn = eqn_at(end)
        read = [a for a in eqn.inputs if stat(a)]
        if any(a not in computed for a in read) or (read and not all(map(stat, eqn.outputs))):
          break
        computed.update(o for o in eqn.outputs if stat(o))
        end += 1
      lower = max([g[1] + 1 for g in groups if g[1] < r] +
                  [segments[-1][1] + 1 if segments else 0])
      start = r
      while start > lower:
        eqn = eqn_at(start - 1)
        if any(map(stat, eqn.inputs)) or any(
            o in prog.out_ids or any(u >= end for u in prog.uses.get(o, ()))
            for o in eqn.outputs):
          break
        start -= 1
      segments.append((start, end))
    kinds = {f: _BATCH for f in firsts}
    after_statistics = set()
    for start, end in segments:
      kinds[start] = _STATISTICS
      if end < n:
        kinds.setdefault(end, _BATCH)
        after_statistics.add(end)
    # A parameter-free operation from the whole state to the whole state (one
    # value live before it, its input; one after it, its output) outside the
    # layers and the statistics, other than an elementwise one: a stage of its
    # own (a pooling, a flattening between two layers).
    live = prog.live_counts()
    outside = lambda j: not any(f <= j <= l for f, l, _ in groups) and not any(
        a <= j < b for a, b in segments)
    states = lambda values: all(is_state(v) for v in values
                                if _is_var(v) and v in prog.batch_values)
    for j in range(n):
      if (live[j] == 1 and live[j + 1] == 1 and outside(j) and
          not _is_elementwise(eqn_at(j).primitive, eqn_at(j).params) and
          states(eqn_at(j).inputs) and states(eqn_at(j).outputs)):
        kinds.setdefault(j, _BATCH)
    starts: list[int] = []
    for b in sorted(kinds):
      if (starts and starts[-1] in after_statistics and b not in after_statistics and
          kinds[b] == _BATCH and any(map(stat, prog.live(b)))):
        continue  # the operations after the statistics join this layer
      starts.append(b)
    self.kinds = [_STATISTICS if kinds[b] == _STATISTICS else
                  _PER_SAMPLE if b and any(map(stat, prog.live(b))) else _BATCH for b in starts]
    self.starts = [0] + starts[1:]
    self.ends = self.starts[1:] + [n]
    self.units = [tuple(u for first, _, us in groups if lo <= first < hi for u in us)
                  for lo, hi in zip(self.starts, self.ends)]

  def _batch_axes_of(self, prog: _Program, other: _Program, v: int) -> tuple[frozenset, bool]:
    """``v``'s batch axes, and whether its leading axis is the samples (not merged with others)."""
    j = prog.x_index[v]
    ov = other.eqns[other.x_eqns[j]].outputs[prog.eqns[prog.x_eqns[j]].outputs.index(v)]
    leading = (prog.avals[v].shape[:1], other.avals[ov].shape[:1]) == (
        (self.batch,), (self.other_batch,))
    return _batch_axes(prog.avals[v], other.avals[ov]), leading

  def _is_state(self, prog: _Program, other: _Program, v: int) -> bool:
    """Whether ``v`` can be (part of) a state: the samples on its leading axis alone."""
    if v in prog.x_ids:
      return True
    axes, leading = self._batch_axes_of(prog, other, v)
    return axes == {0} and leading

  def _check_state(self, prog: _Program, other: _Program, v: int, what: str) -> None:
    if not self._is_state(prog, other, v):
      j = prog.x_index[v]
      axes, _ = self._batch_axes_of(prog, other, v)
      eqn = prog.eqns[prog.x_eqns[j]]
      raise ValueError(
          f"from_function: {what} holds the result of {eqn.primitive.name} at {eqn.where}, "
          f"of shape {prog.avals[v].shape}, whose batch axes are {sorted(axes)}; states "
          "need the batch as their leading axis alone")

  def _source(self, prog: _Program, v: Any) -> Any:
    """``v`` followed back through single-value layout ops to the value they re-lay out."""
    while _is_var(v) and v in prog.defining:
      eqn = prog.eqns[prog.defining[v]]
      args = [a for a in eqn.inputs if _is_var(a)]
      if eqn.primitive.name not in _STRUCTURAL or len(args) != 1:
        break
      v = args[0]
    return v

  def _converted(self, prog: _Program, v: Any) -> Any:
    """``v`` followed back through dtype conversions (a mixed-precision kernel)."""
    while _is_var(v) and v in prog.defining:
      eqn = prog.eqns[prog.defining[v]]
      if eqn.primitive.name != "convert_element_type":
        break
      v = eqn.inputs[0]
    return v

  def _continues(self, prog: _Program, first: int, group: list) -> bool:
    """Whether x-equation ``first`` is an elementwise op on the output of ``group``'s last layer op."""
    eqn = prog.eqns[prog.x_eqns[first]]
    if eqn.primitive.name not in _EPILOGUE:
      return False
    batch_args = [a for a in eqn.inputs if _is_var(a) and a in prog.batch_values]
    if len(batch_args) != 1:
      return False
    source = self._source(prog, batch_args[0])
    if source in prog.x_ids:
      return False
    j = prog.x_index[source]
    return group[0] <= j <= group[1] and bool(prog.consumed[j])

  def _kronecker(self, prog: _Program, other: _Program, n: int, u: Path,
                 consumers: dict) -> Optional[_Tap]:
    """The tap of player ``u`` (n-th of its stage) if its layer has Kronecker structure."""
    theta = games_lib.get_path(self.params_avals, u)
    if not isinstance(theta, dict) or set(theta) not in ({"kernel"}, {"kernel", "bias"}):
      return None
    index = {self.leaf_paths[i][-1]: i for i in self.unit_leaves[u]}
    kernel_uses = consumers[index["kernel"]]
    if len(kernel_uses) != 1:
      return None
    j = kernel_uses[0]
    eqn = prog.eqns[prog.x_eqns[j]]
    if (len(eqn.inputs) != 2 or
        self._converted(prog, eqn.inputs[1]) != prog.param_ids[index["kernel"]]):
      return None
    lhs = eqn.inputs[0]
    if not (_is_var(lhs) and lhs in prog.batch_values):
      return None
    other_lhs = other.avals[other.eqns[other.x_eqns[j]].inputs[0]]
    lhs_axes = _batch_axes(prog.avals[lhs], other_lhs)
    # Rows of the product are the samples themselves, not the batch merged
    # with other axes (a (B*S, K) reshape): the statistics are per sample.
    if (prog.avals[lhs].shape[0], other_lhs.shape[0]) != (self.batch, self.other_batch):
      return None
    kernel = prog.avals[eqn.inputs[1]]
    p = eqn.params
    if eqn.primitive.name == "dot_general":
      # The last n axes of a (B, ..., K1..Kn) input contracted in order with
      # the kernel's first n, no batch dimensions: (B, ..., O1..Om) out, the
      # matrix view x.reshape(B, ..., K) @ kernel.reshape(K, O). (B, K1..Kn):
      # one row per sample, else rows.
      rank = len(prog.avals[lhs].shape)
      (lhs_contract, rhs_contract), batch_dims = p["dimension_numbers"]
      n_in = len(lhs_contract)
      if (rank < 2 or lhs_axes != {0} or not 1 <= n_in < min(rank, len(kernel.shape)) or
          tuple(lhs_contract) != tuple(range(rank - n_in, rank)) or
          tuple(rhs_contract) != tuple(range(n_in)) or any(batch_dims)):
        return None
      features = tuple(int(s) for s in kernel.shape[n_in:])
      rows = rank - n_in > 1
      layer = games_lib.Dense(features, None, "bias" in theta, rows=rows, contracted_axes=n_in)
    elif eqn.primitive.name == "conv_general_dilated":
      dn = p["dimension_numbers"]
      if (len(kernel.shape) != 4 or lhs_axes != {0} or
          (tuple(dn.lhs_spec), tuple(dn.rhs_spec), tuple(dn.out_spec)) != _NHWC_HWIO or
          any(d != 1 for d in tuple(p["lhs_dilation"]) + tuple(p["rhs_dilation"])) or
          p["feature_group_count"] != 1 or p["batch_group_count"] != 1):
        return None
      padding = tuple(tuple(int(e) for e in pair) for pair in p["padding"])
      # Named where it is one (the Kronecker curvatures join "SAME" convolutions of a stage).
      spatial, window = prog.avals[lhs].shape[1:3], kernel.shape[:2]
      for name in ("SAME", "VALID"):
        if padding == tuple(jax.lax.padtype_to_pads(spatial, window, p["window_strides"], name)):
          padding = name
          break
      features = (int(kernel.shape[-1]),)
      layer = games_lib.Conv2D(features[0], tuple(int(s) for s in kernel.shape[:2]),
                               tuple(int(s) for s in p["window_strides"]), padding, None,
                               "bias" in theta)
    else:
      return None
    product = eqn.outputs[0]
    if "bias" not in theta:
      return _Tap(n, j, j, layer)
    bias_uses = consumers[index["bias"]]
    if len(bias_uses) != 1:
      return None
    add = prog.eqns[prog.x_eqns[bias_uses[0]]]
    if add.primitive.name not in ("add", "add_any") or product not in add.inputs:
      return None
    if len(prog.uses.get(product, ())) != 1 or product in prog.out_ids:
      return None
    (bias_arg,) = [a for a in add.inputs if a != product]
    if not self._broadcasts_trailing(prog, bias_arg, prog.param_ids[index["bias"]], features):
      return None
    return _Tap(n, j, bias_uses[0], layer)

  def _broadcasts_trailing(self, prog: _Program, v: Any, bias: int,
                           features: tuple[int, ...]) -> bool:
    """Whether ``v`` is the bias leaf laid out along the trailing ``features`` axes.

    Through reshapes adding leading ones, broadcasts onto the trailing axes
    and dtype conversions: the bias of an ``(O1..Om)`` output, added to every row.
    """
    m = len(features)
    while _is_var(v) and v != bias:
      if v not in prog.defining:
        return False
      eqn = prog.eqns[prog.defining[v]]
      shape = tuple(prog.avals[v].shape)
      if len(shape) < m or shape[len(shape) - m:] != features:
        return False
      name = eqn.primitive.name
      if name == "reshape" and int(np.prod(shape[:len(shape) - m])) != 1:
        return False
      if name == "broadcast_in_dim" and tuple(eqn.params["broadcast_dimensions"])[-m:] != tuple(
          range(len(shape) - m, len(shape))):
        return False
      if name not in ("reshape", "broadcast_in_dim", "convert_element_type"):
        return False
      v = eqn.inputs[0]
    return v == bias

  # -- evaluation -----------------------------------------------------------

  def _plan(self, prog: _Program, k: int) -> tuple:
    """Stage ``k`` of ``prog``: (inputs, equations, outputs, taps by equation position)."""
    key = (id(prog), k)
    if key not in self._plans:
      last = k == len(self.units) - 1
      inputs = prog.x_ids if k == 0 else prog.live(self.starts[k])
      outputs = prog.out_ids if last else prog.live(self.ends[k])
      x_positions = prog.x_eqns[self.starts[k]:self.ends[k]]
      needed, side = set(), set()
      for pos in x_positions:
        needed.update(a for a in prog.eqns[pos].inputs
                      if _is_var(a) and a not in prog.batch_values)
      in_slice = set(x_positions)
      for pos in range(max(x_positions), -1, -1):
        eqn = prog.eqns[pos]
        if pos not in in_slice and any(o in needed for o in eqn.outputs):
          side.add(pos)
          needed.update(a for a in eqn.inputs if _is_var(a))
      positions = sorted(side) + list(x_positions)
      taps = {}
      for (stage, n), tap in self.taps.items():
        if stage == k:
          product = prog.eqns[prog.x_eqns[tap.product]]
          taps[prog.x_eqns[tap.preactivation]] = (n, product.inputs[0], tap.layer)
      leaf_ids = [[prog.param_ids[i] for i in self.unit_leaves[u]] for u in self.units[k]]
      self._plans[key] = (inputs, [prog.eqns[p] for p in positions], positions, outputs, taps,
                          leaf_ids)
    return self._plans[key]

  def _alike(self, k: int, name: str) -> str:
    """``name`` (of a part of stage ``k``) and the stages sharing stage ``k``'s function, for errors."""
    others = self.representative.count(k) - 1
    return name + (f" (or its counterpart in one of {others} stages with the same program)"
                   if others else "")

  def evaluate(self, k: int, state: Any, thetas: tuple, exact: bool = False) -> Any:
    """Stage ``k``'s function: its equations on the incoming state and its players' params.

    It is also the function of every stage whose representative is ``k``
    (:meth:`_representatives`): those stages' programs are stage ``k``'s up to
    renaming, so stage ``k``'s equations on their states and params compute them.
    A statistics stage hands its statistics on as one copy per sample, under
    ``jax.lax.stop_gradient`` unless ``exact`` (its ``gradient_fn``). A stage
    whose state holds statistics is evaluated sample by sample: ``jax.vmap``
    of its equations traced on a batch of one, each sample reading its own
    copy, so that its Jacobians act on each sample alone.
    """
    if k == 0:
      leaves, tree = jax.tree.flatten(state)
      if tree != self.x_tree:
        raise ValueError(f"the game's input has the structure {tree}; apply_fn was traced on "
                         f"{self.x_tree}")
      # The solver hands the input over as floats where it differentiates
      # through the states (integer token ids included): the program reads
      # it in the example's dtypes.
      leaves = [jax.lax.convert_element_type(x, a.dtype) if jnp.result_type(x) != a.dtype
                else x for x, a in zip(leaves, self.x_avals)]
    else:
      leaves = list(state) if isinstance(state, tuple) else [state]
    batch = np.shape(leaves[0])[0]
    prog = self.program(1 if self.kinds[k] == _PER_SAMPLE else batch)
    if k == 0 and prog.mutable:
      running_averages.record(self.update_collections)
    plan = self._plan(prog, k)
    inputs, outputs = plan[0], plan[3]
    if len(leaves) != len(inputs):
      raise ValueError(f"{self._alike(k, f'stage {k}')} expects a state of {len(inputs)} "
                       f"arrays, got {len(leaves)}")
    if k > 0:
      leaves = [_decoded(a, prog.avals[v].dtype) for a, v in zip(leaves, inputs)]
    if self.kinds[k] == _PER_SAMPLE:
      copies = [self.is_statistic(prog, v) for v in inputs]

      def one(sample: list) -> list:
        values = self._run(prog, k, [a if c else a[None] for a, c in zip(sample, copies)],
                           thetas)
        return [a if self.is_statistic(prog, v) else a[0] for a, v in zip(values, outputs)]

      values = jax.vmap(one)(leaves)
    else:
      values = self._run(prog, k, leaves, thetas)
    if self.kinds[k] == _STATISTICS:
      held = (lambda a: a) if exact else jax.lax.stop_gradient
      values = [jnp.broadcast_to(held(a), (batch,) + np.shape(a))
                if self.is_statistic(prog, v) and v not in inputs else a
                for a, v in zip(values, outputs)]
    if k == len(self.units) - 1:
      return jax.tree.unflatten(prog.out_tree, values)
    floats = [jnp.result_type(a) for a in jax.tree.leaves((values, thetas))
              if jnp.issubdtype(jnp.result_type(a), jnp.floating)]
    dtype = jnp.result_type(*floats) if floats else jnp.float32
    values = [_encoded(a, dtype, self._alike(k, f"stage {k}")) for a in values]
    return values[0] if len(values) == 1 else tuple(values)

  def _run(self, prog: _Program, k: int, leaves: list, thetas: tuple) -> list:
    """The values of stage ``k``'s outputs: its equations of ``prog`` bound in order."""
    inputs, eqns, positions, outputs, taps, leaf_ids = self._plan(prog, k)
    env = dict(prog.consts)
    env.update(zip(inputs, leaves))
    for n, (ids, theta) in enumerate(zip(leaf_ids, thetas)):
      values = jax.tree.leaves(theta)
      want = [prog.avals[i] for i in ids]
      if [(np.shape(v), jnp.result_type(v)) for v in values] != [(a.shape, a.dtype)
                                                                  for a in want]:
        raise TypeError(
            f"the params of {self._alike(k, f'player {self._name(self.units[k][n])!r}')} have "
            "shapes and dtypes "
            f"{[(np.shape(v), str(jnp.result_type(v))) for v in values]}; apply_fn was traced "
            f"on {[(a.shape, str(a.dtype)) for a in want]}")
      env.update(zip(ids, values))
    read = lambda a: env[a] if _is_var(a) else a.val
    for pos, eqn in zip(positions, eqns):
      with eqn.ctx.manager:
        out = eqn.primitive.bind(*[read(a) for a in eqn.inputs],
                                 **eqn.primitive.get_bind_params(eqn.params))
      out = list(out) if eqn.primitive.multiple_results else [out]
      if pos in taps:
        n, layer_input, layer = taps[pos]
        out[0] = layer_taps.tap(layer, thetas[n], env[layer_input], out[0])
      env.update(zip(eqn.outputs, out))
    return [read(a) for a in outputs]

  def update_collections(self, variables: Params, inputs: Any) -> Params:
    """``variables`` with the collections ``apply_fn`` returns beside its output replaced.

    For ``model.apply(v, x, train=True, mutable=["batch_stats"])``: the
    running averages Flax computes on this batch (:func:`games.update_batch_stats`).
    """
    _, collections = self.apply_fn(variables, inputs)
    merged = {**variables, **collections}
    return merged if isinstance(variables, dict) else type(variables)(merged)


def from_function(apply_fn: Callable[[Params, Any], Any], params: Params, example_input: Any,
                  loss: losses_lib.LossLike = "softmax_cross_entropy", *,
                  weight_decay: float = 0.0, alignment: str = "merge") -> games_lib.Game:
  """The game a JAX function defines, traced on an example batch (module docstring).

  Args:
    apply_fn: ``apply_fn(params, x) -> outputs`` on a batch: a plain JAX
      function, or a Flax module's ``apply`` (then ``params`` are the
      variables ``{"params": ...}``), train-mode BatchNorm's
      ``model.apply(v, x, train=True, mutable=["batch_stats"])`` included
      (it returns ``(outputs, collections)``; the game's output is
      ``outputs``). Samples must propagate independently but for batch
      statistics (module docstring).
    params: the params pytree (arrays or ``jax.ShapeDtypeStruct``s), nested
      dicts and sequences; every leaf must act on the batch, but for the
      leaves of Flax variables outside their ``"params"`` collection, which
      are no player's and must not act on it.
    example_input: a batch (array or pytree of arrays, or
      ``jax.ShapeDtypeStruct``s) with the batch as every leaf's leading axis;
      its per-sample shape is the game's ``input_shape`` when it is one array.
    loss: terminal loss name, :class:`TerminalLoss` or per-sample callable.
    weight_decay: stage-cost coefficient ``weight_decay/2 |theta|^2`` of every player.
    alignment: at which level a layer on a shorter parallel path plays:
      ``"merge"`` as late as the layers reading it allow (a residual block's
      projection shortcut beside the body's last layer), ``"split"`` as
      early as its inputs allow (beside the first; DGNOpt Fig. 10a).
      Parallel layers of equal depth (inception branches, attention's
      query, key and value projections) share a stage either way.

  Returns:
    A :class:`games.Game` on ``params``: one stage per level of layers, one
    player per params subtree a layer consumes, and a statistics stage (named
    ``"statistics"``, with a ``gradient_fn``) per group of batch statistics;
    ``game.apply(params, x)`` equals ``apply_fn(params, x)`` (its outputs).
    It has no ``init`` (``params`` are given).

  Raises:
    ValueError: an operation combines the samples of a batch other than as
      a batch statistic (or computes one inside a layer), params that are
      unused or shared by two layers, variables outside Flax's ``"params"``
      that act on the batch, dropout in train mode, a state or output
      without the batch as its leading axis, or a program that changes with
      the batch size; each named by its primitive and where it is.
    TypeError: ``apply_fn`` is not callable, or a params node cannot be
      addressed by keys and indices.
  """
  if not callable(apply_fn):
    raise TypeError(f"apply_fn must be callable, got {type(apply_fn).__name__}")
  if alignment not in games_lib.RESIDUAL_ALIGNMENTS:
    raise ValueError(f"alignment must be one of {games_lib.RESIDUAL_ALIGNMENTS}, got "
                     f"{alignment!r}")
  traced = _TracedGame(apply_fn, params, example_input, alignment)
  stages, fns = [], {}
  for k, units in enumerate(traced.units):
    players = tuple(games_lib.Player(u, weight_decay,
                                     traced.taps[(k, n)].layer if (k, n) in traced.taps else None)
                    for n, u in enumerate(units))
    # Stages with the same program share one function (one scanned body).
    rep = traced.representative[k]
    statistics = traced.kinds[k] == _STATISTICS
    if rep == k:
      fns[k] = (_stage_fn(traced, k),
                _stage_fn(traced, k, exact=True) if statistics else None)
    fn, gradient_fn = fns[rep]
    if statistics:
      name = "statistics"
    elif players:
      name = "+".join(p.name for p in players)
    else:  # a parameter-free stage (a pooling, a flattening): its first operation
      prog = traced.program(traced.batch)
      name = prog.eqns[prog.x_eqns[traced.starts[k]]].primitive.name
    stages.append(games_lib.Stage(fn, players, name, gradient_fn=gradient_fn))
  input_shape = (tuple(traced.x_avals[0].shape[1:])
                 if jax.tree_util.treedef_is_leaf(traced.x_tree) else None)
  return games_lib.Game(tuple(stages), losses_lib.get_loss(loss), None, input_shape)


def per_sample_rngs(apply_fn: Callable, names: Sequence[str] = ("dropout",),
                    seed: int = 0) -> Callable:
  """``apply_fn(params, x, rngs=...)`` as a traceable ``f(params, (x, seeds))``: dropout from the batch.

  A traced game's stages are evaluated on other batch sizes and on single
  samples, so its random numbers must be a function of each sample alone.
  ``f`` evaluates sample ``i`` on its own (``jax.vmap`` over the batch, a
  batch of one inside), with the key ``fold_in(fold_in(key(seed), n),
  seeds[i])`` for the ``n``-th name of ``names`` (Flax's ``rngs=`` dict).
  ``seeds`` is an integer array of shape ``(batch,)`` in the batch; give
  every sample of every step its own (``step * batch + arange(batch)``):
  the same seeds draw the same masks, in the forward pass and the rollout
  of one step alike. The solver carries the batch in floats, so seeds are
  below ``2**24`` (exact in float32).

  Under the ``vmap`` a ``Dense`` multiplies a ``(B, 1, K)`` input: a
  token-row Kronecker player (:class:`games.Dense` with ``rows=True``).

  Args:
    apply_fn: ``apply_fn(params, x, rngs={name: key, ...})``, e.g. a Flax
      ``model.apply`` (``functools.partial`` for more arguments).
    names: the rng collections to key (Flax's ``"dropout"``).
    seed: the base key's seed.

  Returns:
    ``f(params, (x, seeds))``: ``apply_fn``'s outputs for the batch ``x``.
  """
  base = jax.random.PRNGKey(seed)

  def one(params: Params, x: Any, sample_seed: Array) -> Any:
    rngs = {name: jax.random.fold_in(jax.random.fold_in(base, n), sample_seed)
            for n, name in enumerate(names)}
    one_sample = jax.tree.map(lambda a: a[None], x)
    return jax.tree.map(lambda a: a[0], apply_fn(params, one_sample, rngs=rngs))

  def with_seeds(params: Params, inputs: tuple) -> Any:
    x, seeds = inputs
    return jax.vmap(one, in_axes=(None, 0, 0))(params, x, seeds)

  return with_seeds


def _stage_fn(traced: _TracedGame, k: int, exact: bool = False) -> Callable:
  def fn(x, thetas):
    return traced.evaluate(k, x, thetas, exact)
  return fn
