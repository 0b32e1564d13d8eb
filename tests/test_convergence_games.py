"""Convergence on small objectives written as games, against their closed-form minimisers.

In the spirit of optax's own optimizer tests (parabola and Rosenbrock), but
with the objective split over stages and players, so that the feedback and the
cooperative solve are exercised:

* a three-stage "parabola": ``x_T = x_0 + theta_0 + theta_1 + theta_2`` with a
  squared-error terminal loss and weight decay; its unique minimiser has every
  player at ``(c - mean(x_0)) / (3 + lambda)``;
* Rosenbrock as a two-stage game: stage 0's player sets ``x``, stage 1's player
  appends ``y``, and the terminal cost is ``(1 - x)^2 + 100 (y - x^2)^2``;
  the minimiser is ``(1, 1)``. Player ``y``'s best reply depends on ``x``, so
  the feedback gain ``K = M^-1 Q_theta_x`` is not zero.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import dgnopt_jax as dgnopt

G = dgnopt.games


def run(tx, params, batch, steps):
  """``steps`` updates inside one compiled ``lax.scan``."""

  def body(carry, _):
    p, s = carry
    u, s = tx.update(None, s, p, batch=batch)
    return (optax.apply_updates(p, u), s), None

  run_all = jax.jit(lambda p: jax.lax.scan(body, (p, tx.init(p)), None, length=steps)[0])
  return run_all(params)


# A parabola over three stages.

DIM, WD = 3, 0.5
TARGET = jnp.array([1.0, -2.0, 0.5])


def parabola_game():
  add = lambda x, th: x + th[0]
  stages = [G.stage(add, [f"p{t}"], weight_decay=WD) for t in range(3)]
  return G.Game(tuple(stages), "squared_error")


def parabola_problem():
  x = jax.random.normal(jax.random.PRNGKey(0), (8, DIM), jnp.float64)
  y = jnp.broadcast_to(TARGET, x.shape)
  params = {f"p{t}": jnp.full((DIM,), 0.3 * (t - 1), jnp.float64) for t in range(3)}
  minimiser = (np.asarray(TARGET) - np.mean(np.asarray(x), axis=0)) / (3 + WD)
  return params, (x, y), minimiser


# Adaptive curvatures circle the minimiser at a distance ~ lr with a constant
# step, so they run with a cosine schedule decaying to zero (as one would).
cosine = lambda lr, steps: optax.cosine_decay_schedule(lr, steps)


@pytest.mark.parametrize("make,curvature,lr,steps", [
    (dgnopt.olne, "identity", 0.1, 400),
    (dgnopt.fne, "identity", 0.1, 400),
    (dgnopt.gr, "identity", 0.1, 400),
    (dgnopt.fne, "rmsprop", cosine(0.05, 1000), 1000),
    (dgnopt.fne, "adam", cosine(0.1, 1000), 1000),
    (dgnopt.gr, "adam", cosine(0.1, 1000), 1000),
    (dgnopt.fne, "dense", 1.0, 60),
    (dgnopt.gr, "dense", 1.0, 60),
])
def test_parabola_game_reaches_its_minimiser(make, curvature, lr, steps):
  game = parabola_game()
  params, batch, minimiser = parabola_problem()
  # The dense curvature with the loss's exact Hessian factor: a Gauss-Newton
  # method on a quadratic. (With the rank-1 "outer" factor, the empirical
  # Fisher of the residuals, downstream players over-estimate what they can
  # absorb and upstream players converge slowly.)
  kwargs = {"damping": 1e-6, "vxx_rank": "exact"} if curvature == "dense" else {}
  tx = make(game, lr, curvature, **kwargs)
  tol = 1e-8
  final, state = run(tx, params, batch, steps)
  assert int(state.skipped) == 0
  for t in range(3):
    np.testing.assert_allclose(np.asarray(final[f"p{t}"]), minimiser, atol=tol)


@pytest.mark.parametrize("make", [dgnopt.fne, dgnopt.gr])
def test_parabola_game_newton_step_is_exact(make):
  # One sample, the dense curvature, the exact value Hessian and no damping:
  # the step solves the Bellman recursion of a linear-quadratic game exactly,
  # i.e. it is the Newton step of the quadratic objective and lands on the
  # minimiser. (With B > 1 and T > 1 exactness would also need the
  # cross-sample blocks of V_xx, which the per-sample recursion leaves out.)
  game = parabola_game()
  params, (x, y), _ = parabola_problem()
  minimiser = (np.asarray(TARGET) - np.asarray(x[0])) / (3 + WD)
  final, _ = run(make(game, 1.0, "dense", damping=0.0, vxx_rank="exact"),
                 params, (x[:1], y[:1]), 1)
  for t in range(3):
    np.testing.assert_allclose(np.asarray(final[f"p{t}"]), minimiser, atol=1e-12)


# Rosenbrock over two stages.


def rosenbrock(output, target):
  del target
  return (1.0 - output[0]) ** 2 + 100.0 * (output[1] - output[0] ** 2) ** 2


def rosenbrock_game():
  set_x = G.stage(lambda x, th: x + th[0], ["x"])
  append_y = G.stage(lambda h, th: jnp.concatenate([h, jnp.zeros_like(h) + th[0]], -1), ["y"])
  return G.Game((set_x, append_y), rosenbrock)


ROSENBROCK_START = {"x": jnp.array([0.0]), "y": jnp.array([0.0])}
ROSENBROCK_BATCH = (jnp.zeros((1, 1)), jnp.zeros((1,)))


@pytest.mark.parametrize("make,curvature,lr,steps,tol", [
    (dgnopt.fne, "identity", 1e-3, 20_000, 1e-2),
    (dgnopt.gr, "identity", 1e-3, 20_000, 1e-2),
    (dgnopt.fne, "adam", 1e-2, 3_000, 1e-2),
    (dgnopt.fne, "dense", 1.0, 200, 1e-6),
    (dgnopt.gr, "dense", 1.0, 200, 1e-6),
])
def test_rosenbrock_game_reaches_one_one(make, curvature, lr, steps, tol):
  kwargs = {"damping": 1e-3, "vxx_rank": "exact"} if curvature == "dense" else {}
  tx = make(rosenbrock_game(), lr, curvature, **kwargs)
  final, state = run(tx, ROSENBROCK_START, ROSENBROCK_BATCH, steps)
  assert int(state.skipped) == 0
  np.testing.assert_allclose([float(final["x"][0]), float(final["y"][0])], [1.0, 1.0],
                             atol=tol)


def test_rosenbrock_first_step_matches_the_hand_solved_recursion():
  # One sample, identity curvature (M = I / lr), rank-1 value Hessian
  # V_xx = z z^T with z = grad phi (DDPNOpt eq. 12-13, GT-DDP Prop. 5). At
  # (x, y) = (0.5, 0): z = (phi_x, phi_y) = (49, -50).
  #   stage 1 (player y): Q_y = phi_y, Q_yx = phi_y phi_x, k = lr Q_y, K = lr Q_yx,
  #       V_x = Q_x - Q_xy M^-1 Q_y = phi_x (1 - s),  s = lr phi_y^2 (< 1: no guard);
  #   stage 0 (player x): update -lr V_x;
  #   rollout: y's update is -(k + K dx) with dx = x's update.
  lr = 1e-4
  x0, y0 = 0.5, 0.0
  phi_x = -2 * (1 - x0) - 400 * x0 * (y0 - x0 ** 2)
  phi_y = 200 * (y0 - x0 ** 2)
  s = lr * phi_y ** 2
  assert s < 1.0
  dx = -lr * phi_x * (1 - s)
  dy = -(lr * phi_y + lr * phi_y * phi_x * dx)
  start = {"x": jnp.array([x0]), "y": jnp.array([y0])}
  for make in (dgnopt.fne, dgnopt.gr):
    tx = make(rosenbrock_game(), lr, vxx_rank="outer")
    updates, _ = tx.update(None, tx.init(start), start, batch=ROSENBROCK_BATCH)
    np.testing.assert_allclose([float(updates["x"][0]), float(updates["y"][0])], [dx, dy],
                               rtol=1e-12)
  # The open-loop step is the plain gradient step: the feedback is what differs.
  tx = dgnopt.olne(rosenbrock_game(), lr)
  updates, _ = tx.update(None, tx.init(start), start, batch=ROSENBROCK_BATCH)
  np.testing.assert_allclose([float(updates["x"][0]), float(updates["y"][0])],
                             [-lr * phi_x, -lr * phi_y], rtol=1e-12)
