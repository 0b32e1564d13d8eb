"""The stages of a step grouped into segments, scanned where a block of stages repeats.

Repeated blocks of identical stages (same stage functions, players and
shapes; a run of equal layers, or the stages of equal residual blocks) are
solved with ``lax.scan`` over stacked parameters, so the compiled program
does not grow with the number of repeats. Per-stage values (params, states,
curvature statistics, gains) travel through a step as one pytree per
segment, stacked over its repeats, each a tuple over the block's positions.
Also here: the non-finite guard, which selects on those stacked arrays.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator, NamedTuple

import jax
import jax.numpy as jnp

from dgnopt_jax._src import games as games_lib

Params = Any
State = Any

# The longest block of stages looked for: a bottleneck residual block with
# train-mode BatchNorm is 9 stages (a convolution, the statistics and the
# normalisation, three times).
MAX_PERIOD = 9
# A repeated stage or block of stages is scanned only from this many repeats
# on: XLA on CPU runs a scanned body slower than the unrolled one (its params
# are stacked and sliced, and a while loop is entered per step), while
# unrolling many repeats costs compile time (docs/PERFORMANCE.md, "Scanned
# blocks").
MIN_STAGE_REPEATS = 4
MIN_BLOCK_REPEATS = 4


class Segment(NamedTuple):
  """Stages ``start .. start + period * repeats - 1``: a block of ``period`` stages repeated."""

  start: int
  period: int
  repeats: int

  @property
  def length(self) -> int:
    return self.period * self.repeats

  def stage(self, repeat: int, position: int) -> int:
    return self.start + repeat * self.period + position

  def stages(self, game: games_lib.Game) -> tuple:
    """The block's stages (those of its first repeat)."""
    return game.stages[self.start:self.start + self.period]

  def stack(self, of_stage: Callable[[int], Any]) -> Any:
    """``of_stage(t)`` for every stage, stacked over the repeats: a tuple over positions."""
    return jax.tree.map(lambda *xs: jnp.stack(xs),
                        *[tuple(of_stage(self.stage(k, i)) for i in range(self.period))
                          for k in range(self.repeats)])

  def per_stage(self, stacked: Any) -> Iterator[tuple[int, Any]]:
    """``(stage index, value)`` from a result stacked over the repeats."""
    for k in range(self.repeats):
      block = jax.tree.map(lambda a: a[k], stacked)
      for i in range(self.period):
        yield self.stage(k, i), block[i]

  def scan(self, body: Callable, carry: Any, xs: Any, reverse: bool = False):
    """``lax.scan`` of ``body`` over the repeats; a direct call for one repeat."""
    if self.repeats == 1:
      carry, y = body(carry, jax.tree.map(lambda a: a[0], xs))
      return carry, jax.tree.map(lambda a: a[None], y)
    return jax.lax.scan(body, carry, xs, reverse=reverse)


def _shapes(tree: Any) -> Any:
  return jax.tree.map(lambda a: jax.ShapeDtypeStruct(jnp.shape(a), jnp.result_type(a)), tree)


def _same_shapes(a: Any, b: Any) -> bool:
  la, ta = jax.tree.flatten(a)
  lb, tb = jax.tree.flatten(b)
  return ta == tb and all(x.shape == y.shape and x.dtype == y.dtype for x, y in zip(la, lb))


def stage_thetas(stage: games_lib.Stage, params: Params) -> tuple:
  """The stage's players' params, in player order."""
  return tuple(games_lib.get_path(params, p.path) for p in stage.players)


def plan_segments(game: games_lib.Game, params: Params, inputs: State) -> list[Segment]:
  """Groups repeated blocks of identical stages, to be solved with ``lax.scan``.

  A block of ``period`` consecutive stages (e.g. the two stages of a residual
  block) repeats when the next ``period`` stages have the same stage
  functions, players, params shapes and input shapes, and every repetition
  maps the block's input state to a state of the same shape. Runs of one
  stage are scanned from ``MIN_STAGE_REPEATS`` repeats on, blocks of several
  stages from ``MIN_BLOCK_REPEATS``. At each stage the longest run (most
  stages covered, shortest period on ties) is taken.

  Raises:
    ValueError: a stage's ``gradient_fn`` does not return the shapes of its ``fn``.
  """
  xs = [_shapes(inputs)]  # the state shapes x_0 .. x_T
  thetas = [_shapes(stage_thetas(stage, params)) for stage in game.stages]
  for t, (stage, th) in enumerate(zip(game.stages, thetas)):
    xs.append(jax.eval_shape(stage.fn, xs[-1], th))
    if stage.gradient_fn is not None:
      exact = jax.eval_shape(stage.gradient_fn, xs[-2], th)
      if not _same_shapes(exact, xs[-1]):
        raise ValueError(
            f"stage {t} ({stage.name or 'unnamed'}): gradient_fn returns "
            f"{jax.tree.map(lambda s: s.shape, exact)} where fn returns "
            f"{jax.tree.map(lambda s: s.shape, xs[-1])}; it must compute the same next state")

  def same(t, u):
    return (game.stages[t].signature() == game.stages[u].signature() and
            _same_shapes(thetas[t], thetas[u]) and _same_shapes(xs[t], xs[u]))

  def repeats(t, period):
    """How many times stages t .. t+period-1 repeat back to back."""
    count = 0
    while (t + (count + 1) * period <= len(game.stages) and
           all(same(t + j, t + count * period + j) for j in range(period)) and
           _same_shapes(xs[t], xs[t + (count + 1) * period])):
      count += 1
    return count

  segments: list[Segment] = []
  t = 0
  while t < len(game.stages):
    best = Segment(t, 1, 1)
    for period in range(1, MAX_PERIOD + 1):
      r = repeats(t, period)
      least = MIN_STAGE_REPEATS if period == 1 else MIN_BLOCK_REPEATS
      if r >= least and period * r > best.length:
        best = Segment(t, period, r)
    segments.append(best)
    t += best.length
  return segments


def all_finite(tree: Any) -> jax.Array:
  """Whether every element of every leaf is finite, as one scalar.

  One reduction over the concatenated leaves: per-leaf reductions combined
  afterwards make XLA build a fusion whose size grows with the square of the
  number of leaves, and compile time with it.
  """
  leaves = [jnp.ravel(u) for u in jax.tree.leaves(tree)]  # concatenated in their common dtype
  if not leaves:
    return jnp.asarray(True)
  return jnp.all(jnp.isfinite(jnp.concatenate(leaves)))


# Statistics leaves up to this many elements are checked in one concatenated reduction.
_CONCATENATED_STATISTICS = 1 << 16


def statistics_finite(tree: Any) -> jax.Array:
  """Whether every floating leaf of the curvature statistics is finite, as one scalar.

  The small leaves go through :func:`all_finite` (a reduction per leaf costs
  a kernel launch each, and compile time); each large leaf (Kronecker
  factors and bases of wide layers) is reduced on its own, ``max |x|`` (NaN
  propagates through it), so that the statistics are not copied every step.
  """
  leaves = [l for l in jax.tree.leaves(tree) if jnp.issubdtype(l.dtype, jnp.inexact) and l.size]
  small = [l for l in leaves if l.size <= _CONCATENATED_STATISTICS]
  finite = all_finite(small)
  for leaf in leaves:
    if leaf.size > _CONCATENATED_STATISTICS:
      finite = finite & jnp.isfinite(jnp.max(jnp.abs(leaf)))
  return finite


def updates_finite(seg_thetas: list, seg_deltas: list) -> jax.Array:
  """Whether the (stacked) changes and the params they lead to are finite.

  Checked on the segments' stacked arrays, not per leaf of the params
  pytree, whose count would set the compile time.
  """
  new = jax.tree.map(lambda t, d: t + d.astype(t.dtype), seg_thetas, seg_deltas)
  return all_finite((seg_deltas, new))


def keep_if_applied(applied: jax.Array, finite: jax.Array, segments: list[Segment],
                    seg_deltas: list, seg_new_cstates: list, seg_cstates: list):
  """The step's updates, or zeros where not ``applied``; its curvature states, or the old ones where not ``finite``.

  Per segment, values stacked over its repeats. A step the trust region
  rejects keeps its statistics: they describe the batch, not the step, and a
  momentum that points uphill must see the new gradients to turn.

  The updates, and the states of a segment that is not repeated, are
  selected leaf by leaf; those of the repeated segments go through one
  branch on their stacked arrays: a branch over everything copies every
  buffer it passes through (peak memory), a select per leaf of the repeated
  segments' states costs compile time.
  """
  seg_deltas = jax.tree.map(lambda d: jnp.where(applied, d, jnp.zeros_like(d)), seg_deltas)
  kept = list(seg_new_cstates)
  repeated = [j for j, s in enumerate(segments) if s.repeats > 1]
  for j, s in enumerate(segments):
    if s.repeats == 1:
      kept[j] = jax.tree.map(lambda new, old: jnp.where(finite, new, old),
                             seg_new_cstates[j], seg_cstates[j])
  if repeated:
    chosen = jax.lax.cond(finite, lambda: [seg_new_cstates[j] for j in repeated],
                          lambda: [seg_cstates[j] for j in repeated])
    for j, c in zip(repeated, chosen):
      kept[j] = c
  return seg_deltas, kept
