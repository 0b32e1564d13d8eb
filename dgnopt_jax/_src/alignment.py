"""Choosing the game's alignment every step with a bandit (DGNOpt §5.3, Alg. 2).

One network admits several games: a residual block's projection shortcut can
play beside the first or the second convolution (DGNOpt Fig. 10a), and each
placement gives different feedback policies. :func:`aligned` holds one
transformation per alignment and, every step, draws an alignment from a
bandit, applies that alignment's update (``lax.switch``, so the whole step
stays one compiled program), evaluates the updated network on a validation
batch and feeds the reward back to the bandit.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Sequence, Union

import jax
import jax.numpy as jnp
import optax

from dgnopt_jax._src import bandit as bandit_lib
from dgnopt_jax._src import games as games_lib
from dgnopt_jax._src import transform

STRATEGIES = ("fixed", "random", "adaptive")

RewardFn = Callable[[jax.Array, jax.Array], jax.Array]


class PerAlignment(NamedTuple):
  """One optimizer state per alignment (when their structures differ)."""

  states: tuple


class AlignedState(NamedTuple):
  """State of :func:`aligned`.

  Attributes:
    inner: the alignments' optimizer state: one state shared by all of them
      when their states have the same structure (per-player statistics, as
      for fne/olne: every alignment reads and updates the same moments or
      Kronecker factors), else a :class:`PerAlignment` with one state per
      alignment, of which only the drawn one advances (GR's per-stage
      statistics, whose stages differ between alignments).
    bandit: the bandit's state (pulls per alignment, cumulative losses).
    key: PRNG key the next alignment is drawn with.
    alignment: the alignment drawn at the last step (-1 before the first).
    reward: the validation reward of the last step (NaN before the first or
      without a validation batch).
    loss: the batch-mean terminal loss the drawn alignment's solver reported
      at the last step (NaN before the first).
  """

  inner: Any
  bandit: bandit_lib.BanditState
  key: jax.Array
  alignment: jax.Array
  reward: jax.Array
  loss: jax.Array


def accuracy(outputs: jax.Array, targets: jax.Array) -> jax.Array:
  """Share of the batch whose highest output is the integer label (the default reward)."""
  return jnp.mean((jnp.argmax(outputs, axis=-1) == targets).astype(jnp.float32))


def _same_structure(states: Sequence[Any]) -> bool:
  def signature(state):
    leaves, treedef = jax.tree.flatten(state)
    return treedef, [(jnp.shape(x), jnp.result_type(x)) for x in leaves]
  first = signature(states[0])
  return all(signature(s) == first for s in states[1:])


def _check_games(games: Sequence[games_lib.Game]) -> None:
  if not games:
    raise ValueError("aligned needs at least one game (one per alignment)")
  for g in games:
    if not isinstance(g, games_lib.Game):
      raise TypeError(f"every alignment must be a dgnopt_jax.games.Game, got {type(g).__name__}")
  paths = sorted(p.path for p in games[0].players)
  for i, g in enumerate(games[1:], 1):
    other = sorted(p.path for p in g.players)
    if other != paths:
      raise ValueError(
          f"alignment {i} has players {other}, alignment 0 has {paths}: the alignments must "
          "be games of the same network (the same params played by the same players)")


def aligned(games: Sequence[games_lib.Game],
            make_transform: Callable[[games_lib.Game], optax.GradientTransformationExtraArgs],
            strategy: Union[str, bandit_lib.Bandit] = "adaptive", *, seed: int = 0,
            reward: RewardFn = accuracy) -> optax.GradientTransformationExtraArgs:
  r"""DGNOpt with the alignment chosen by a multi-armed bandit each step (DGNOpt Alg. 2).

  Each step: draw alignment ``m ~ p_k`` from the bandit, solve the game
  ``games[m]`` and apply its feedback policies (``make_transform(games[m])``),
  compute the reward ``r = reward(f(theta', x_val), y_val)`` of the updated
  params on the validation batch, and update the bandit with ``(m, r)``. The
  alignment is a traced index: the M solvers are branches of one
  ``lax.switch`` inside the jit-compiled step.

  Args:
    games: the alignments, games of one network (same players and params;
      e.g. ``sequential`` with ``ResidualBlock(..., alignment="merge")`` and
      with ``alignment="split"``, or ``from_flax(..., alignment=...)``).
    make_transform: builds one alignment's solver, e.g.
      ``lambda g: dgnopt.fne(g, 0.03, "ekfac")``.
    strategy: ``"fixed"`` (always ``games[0]``), ``"random"`` (uniform each
      step), ``"adaptive"`` (EXP3++, :func:`dgnopt_jax.bandits.exp3pp`), or a
      :class:`dgnopt_jax.bandits.Bandit`.
    seed: seed of the draws.
    reward: ``(outputs, targets) -> scalar in [0, 1]`` on the validation
      batch (default: accuracy against integer labels). It is a mean over
      the global batch, so the draws agree across devices.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose
    ``update(updates, state, params, *, batch, validation_batch=None)`` needs
    ``validation_batch=(inputs, targets)`` when the strategy learns from
    rewards (``"adaptive"`` or a bandit); state :class:`AlignedState`.
  """
  games = list(games)
  _check_games(games)
  transforms = [make_transform(g) for g in games]
  num = len(games)
  if isinstance(strategy, bandit_lib.Bandit):
    chooser, learns = strategy, True
    if chooser.num_arms != num:
      raise ValueError(f"the bandit has {chooser.num_arms} arms for {num} alignments")
  elif strategy == "fixed":
    chooser, learns = bandit_lib.fixed(num), False
  elif strategy == "random":
    chooser, learns = bandit_lib.uniform(num), False
  elif strategy == "adaptive":
    chooser, learns = bandit_lib.exp3pp(num), True
  else:
    raise ValueError(f"strategy must be one of {STRATEGIES} or a Bandit, got {strategy!r}")
  apply = games[0].apply

  def init_fn(params):
    states = [tx.init(params) for tx in transforms]
    shared = _same_structure(states)
    dtype = jnp.result_type(*jax.tree.leaves(params)) if jax.tree.leaves(params) else jnp.float32
    return AlignedState(states[0] if shared else PerAlignment(tuple(states)), chooser.init(),
                        jax.random.PRNGKey(seed), jnp.full([], -1, jnp.int32),
                        jnp.full([], jnp.nan, dtype), jnp.full([], jnp.nan, dtype))

  def update_fn(updates, state, params=None, *, batch=None, validation_batch=None, **extra):
    del updates
    if learns and validation_batch is None:
      raise TypeError(
          "the adaptive alignment learns from a validation batch: call tx.update(updates, "
          "state, params, batch=(x, y), validation_batch=(x_val, y_val))")
    shared = not isinstance(state.inner, PerAlignment)
    key, draw_key = jax.random.split(state.key)
    arm = bandit_lib.draw(chooser, state.bandit, draw_key)

    def branch(m):
      def solve(inner):
        own = inner if shared else inner.states[m]
        step, new = transforms[m].update(None, own, params, batch=batch, **extra)
        loss = jnp.asarray(getattr(new, "loss", jnp.nan), state.loss.dtype)
        if not shared:
          new = PerAlignment(inner.states[:m] + (new,) + inner.states[m + 1:])
        return step, new, loss
      return solve

    step, inner, loss = jax.lax.switch(arm, [branch(m) for m in range(num)], state.inner)
    if validation_batch is not None:
      inputs, targets = transform._unpack_batch(validation_batch)
      outputs = apply(optax.apply_updates(params, step), inputs)
      score = jnp.asarray(reward(outputs, targets), state.reward.dtype)
    else:
      score = jnp.full([], jnp.nan, state.reward.dtype)
    # The fixed and uniform choosers only count the draw; they ignore the score.
    bandit = chooser.update(state.bandit, arm, score)
    return step, AlignedState(inner, bandit, key, arm, score, loss)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
