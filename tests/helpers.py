"""Small games and comparison helpers shared by the tests."""

import jax
import jax.numpy as jnp
import numpy as np

import dgnopt_jax as dgnopt

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
  return num / den


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


def reference_step(game, params, batch, curvature_state=None, **kwargs):
  """The dense reference step."""
  return dgnopt.reference.dense_step(game, params, batch[0], batch[1],
                                     curvature_state=curvature_state, **kwargs)


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
    ref, _ = reference_step(game, params, batch, learning_rate=lr, vxx_reg=1e-2,
                            principle=principle)
    rough = step(make(game, lr, vxx_reg=1e-2, coupling_iterations=rough_iterations), params,
                 batch)[0]
    exact = step(make(game, lr, vxx_reg=1e-2, coupling_iterations=exact_iterations), params,
                 batch)[0]
    assert max_relative_error(rough, ref) > 1e-10  # the safeguard is active
    assert_trees_close(exact, ref, 1e-8)
