"""Small games and comparison helpers shared by the tests."""

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

import dgnopt_jax as dgnopt
from dgnopt_jax._src import trust_region

G = dgnopt.games


def perturbed_params(game, seed=0, scale=0.1, dtype=jnp.float64):
  """Random params with the game's structure, drawn with numpy.

  Each leaf is ``N(0, 1/fan_in)`` for kernels (fan-in from all but the last
  axis) plus ``scale``-sized noise, so that biases are not all zero.
  """
  shapes = jax.eval_shape(game.init, jax.random.PRNGKey(0))
  rng = np.random.default_rng(seed)

  def draw(s):
    fan_in = int(np.prod(s.shape[:-1])) if len(s.shape) > 1 else 0
    base = rng.normal(size=s.shape) / np.sqrt(fan_in) if fan_in else 0.0
    return jnp.asarray(base + scale * rng.normal(size=s.shape), dtype)

  return jax.tree.map(draw, shapes)


def tanh_mlp(widths=(5, 5, 5), in_dim=4, classes=3, loss="softmax_cross_entropy", wd=0.0):
  layers = [G.Dense(w, "tanh") for w in widths] + [G.Dense(classes)]
  return G.sequential(layers, (in_dim,), loss, weight_decay=wd)


def relu_cnn():
  return G.sequential([G.Conv2D(2, (3, 3)), G.Conv2D(2, (3, 3)), G.AvgPool((2, 2)),
                       G.Dense(4, "relu"), G.Dense(3)], (4, 4, 1))


def two_player_game():
  """A stage with two parallel players sharing input and output (DGNOpt Fig. 3a)."""
  first = G.stage(lambda x, th: jnp.tanh(x @ th[0]["w"]), ["a"])
  coop = G.stage(lambda x, th: jnp.tanh(x @ th[0]["w"]) + jnp.tanh(x @ th[1]["w"]),
                 ["u", "v"], weight_decay=0.05)
  last = G.stage(lambda x, th: x @ th[0]["w"], ["out"])
  return G.Game((first, coop, last), "softmax_cross_entropy")


def two_player_params(seed=5):
  k = jax.random.split(jax.random.PRNGKey(seed), 4)
  return {"a": {"w": jax.random.normal(k[0], (3, 4))},
          "u": {"w": 0.5 * jax.random.normal(k[1], (4, 4))},
          "v": {"w": 0.5 * jax.random.normal(k[2], (4, 4))},
          "out": {"w": jax.random.normal(k[3], (4, 3))}}


def classification_batch(shape, batch, classes=3, seed=1):
  x = jax.random.normal(jax.random.PRNGKey(seed), (batch,) + tuple(shape), jnp.float64)
  y = jnp.arange(batch) % classes
  return x, y


def max_relative_error(a, b):
  num = max(float(jnp.max(jnp.abs(x - y))) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
  den = max(float(jnp.max(jnp.abs(y))) for y in jax.tree.leaves(b))
  return num / den if den else (0.0 if num == 0 else float("inf"))


def assert_trees_close(a, b, rtol):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  err = max_relative_error(a, b)
  assert err < rtol, f"relative error {err:.3e} >= {rtol:.0e}"


_JITTED = {}


def step(tx, params, batch, state=None):
  """One jit-compiled update (compiled once per transformation)."""
  state = tx.init(params) if state is None else state
  if id(tx) not in _JITTED:
    _JITTED[id(tx)] = (tx, jax.jit(lambda p, s, b: tx.update(None, s, p, batch=b)))
  return _JITTED[id(tx)][1](params, state, batch)


class ReferenceState(NamedTuple):
  """What the reference carries between steps: curvature statistics and the step scale."""

  curvature: Any
  step_scale: float


def reference_trust_region(game, params, batch, updates, step_scale):
  """``(accept, next step scale)`` of a step, from a dense forward pass and the loss's Hessian.

  The rule of ``dgnopt_jax._src.trust_region``, computed independently: the
  objective's change (batch-mean loss plus the players' weight decay) from
  ``params`` to ``params + updates``, accepted where it is at most ``ACCEPT``
  times the model's change (no rise where the model predicts none); the
  reduction ratio against
  ``m = grad f . D + D^T (hess f) D / 2`` of the batch-mean loss ``f`` of the
  outputs, with ``D`` the change of the outputs, from ``jax.hessian`` of ``f``
  over the whole flattened batch, plus the weight decay's change.
  """
  x, y = batch
  new_params = jax.tree.map(jnp.add, params, updates)
  outputs, trial = game.apply(params, x), game.apply(new_params, x)

  def f(flat):
    return jnp.mean(jax.vmap(game.loss.per_sample)(flat.reshape(outputs.shape), y))

  def decay(p):
    return sum(0.5 * player.weight_decay * float(jnp.sum(leaf ** 2))
               for player in game.players
               for leaf in jax.tree.leaves(dgnopt.games.get_path(p, player.path)))

  flat, delta = outputs.reshape(-1), (trial - outputs).reshape(-1)
  loss = float(f(flat))
  actual = float(f(trial.reshape(-1))) - loss + decay(new_params) - decay(params)
  model = (float(jax.grad(f)(flat) @ delta + 0.5 * delta @ jax.hessian(f)(flat) @ delta) +
           decay(new_params) - decay(params))
  noise = trust_region.ROUNDOFF_UNITS * float(jnp.finfo(outputs.dtype).eps) * abs(loss)
  # Sufficient decrease: at least ACCEPT of the model's decrease, no rise where it predicts none.
  accept = actual <= noise and (model >= 0 or actual <= trust_region.ACCEPT * model + noise)
  if not accept:
    return accept, max(trust_region.MIN_SCALE, step_scale * trust_region.SHRINK)
  if abs(actual) <= noise and abs(model) <= noise:
    return accept, step_scale
  if (actual / model if model < 0 else (1.0 if actual <= 0 else -1.0)) > trust_region.HIGH:
    return accept, min(1.0, step_scale * trust_region.GROW)
  return accept, step_scale


def reference_step(game, params, batch, state=None, *, trust_region=True, **kwargs):
  """The dense reference step, with the feedback solvers' trust region.

  The step is solved at ``step_scale * learning_rate``; with feedback and
  ``trust_region`` it is applied only where :func:`reference_trust_region`
  accepts it (zero updates otherwise; the statistics move either way). ``state`` is
  the :class:`ReferenceState` a previous call returned (None: fresh).
  """
  state = ReferenceState(None, 1.0) if state is None else state
  kwargs = dict(kwargs)
  lr = kwargs.pop("learning_rate")
  updates, curvature = dgnopt.reference.dense_step(
      game, params, batch[0], batch[1], curvature_state=state.curvature,
      learning_rate=state.step_scale * lr, **kwargs)
  if not (trust_region and kwargs.get("feedback", True)):
    return updates, ReferenceState(curvature, state.step_scale)
  accept, scale = reference_trust_region(game, params, batch, updates, state.step_scale)
  if not accept:  # no params change; the statistics take in the batch
    return jax.tree.map(jnp.zeros_like, updates), ReferenceState(curvature, scale)
  return updates, ReferenceState(curvature, scale)


def assert_steps_match_reference(tx, game, params, batch, steps, **reference_kwargs):
  """``steps`` updates of ``tx`` equal the dense reference's to 1e-8.

  Both carry their curvature statistics and the params move by each update.
  Returns ``tx``'s final state.
  """
  state, ref_state = tx.init(params), None
  for _ in range(steps):
    updates, state = step(tx, params, batch, state)
    ref, ref_state = reference_step(game, params, batch, ref_state, **reference_kwargs)
    assert_trees_close(updates, ref, 1e-8)
    params = jax.tree.map(jnp.add, params, updates)
  return state


def record_reference_scales(monkeypatch):
  """Records, in a list it returns, the reference's coupling scales w (its dense eigensolve)."""
  from dgnopt_jax._src import reference
  scales = []
  original = reference._coupling_scale
  monkeypatch.setattr(reference, "_coupling_scale",
                      lambda *a: scales.append(original(*a)) or scales[-1])
  return scales


def np_tree(t):
  return jax.tree.map(np.asarray, t)


def assert_safeguard_converges_to_reference(game, params, batch, principle, rough_iterations,
                                            exact_iterations):
  """At lr 3 and 30 (lambda_max(G) > 1) the safeguard's power iteration reaches the
  reference's dense eigensolve: ``rough_iterations`` differ from it, ``exact_iterations``
  agree to 1e-8."""
  make = dgnopt.fne if principle == "fne" else dgnopt.gr
  for lr in (3.0, 30.0):
    # Unchecked steps (at these step sizes the trust region rejects them) on
    # the outer-product factor, whose curvature makes the safeguard act.
    options = dict(vxx_reg=1e-2, vxx_rank="outer", trust_region=False)
    ref, _ = reference_step(game, params, batch, learning_rate=lr, principle=principle,
                            **options)
    rough = step(make(game, lr, coupling_iterations=rough_iterations, **options), params,
                 batch)[0]
    exact = step(make(game, lr, coupling_iterations=exact_iterations, **options), params,
                 batch)[0]
    assert max_relative_error(rough, ref) > 1e-10  # the safeguard is active
    assert_trees_close(exact, ref, 1e-8)


def assert_open_loop_equals_optax(game: Any, params: Any, loss: Any, data: list,
                                  one_trajectory: bool = False) -> None:
  """OLNE with the identity, RMSprop and Adam curvatures against optax.sgd, rmsprop, adam
  on ``jax.grad(loss)`` (DGNOpt Theorem 6), step for step over ``data`` (1e-10).

  ``one_trajectory``: optax's step is taken at OLNE's params (each optimizer
  keeps its own state), for networks whose training amplifies a roundoff-sized
  difference between two trajectories beyond 1e-10 within the steps.
  """
  import optax
  cases = [("identity", {}, optax.sgd(0.1), 0.1),
           ("rmsprop", {}, optax.rmsprop(1e-2), 1e-2),
           ("adam", {"b1": 0.8, "eps_root": 1e-9}, optax.adam(3e-3, b1=0.8, eps_root=1e-9), 3e-3)]
  for curvature, options, opt, lr in cases:
    tx = dgnopt.olne(game, lr, getattr(dgnopt.curvature, curvature)(**options))
    ours, theirs = params, params
    state, opt_state = tx.init(params), opt.init(params)
    for batch in data:
      updates, state = step(tx, ours, batch, state)
      expected, opt_state = opt.update(jax.grad(loss)(theirs, *batch), opt_state, theirs)
      assert_trees_close(updates, expected, 1e-10)
      ours = optax.apply_updates(ours, updates)
      theirs = ours if one_trajectory else optax.apply_updates(theirs, expected)
