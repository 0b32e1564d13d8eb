"""LQ oracle: one exact FNE step lands on the least-squares minimiser (DESIGN §5)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dgnopt_jax as dgnopt
from helpers import step

G = dgnopt.games
N_STATE, N_CTRL, WD = 3, 2, 0.1


def lq_game(stages, seed=0):
  """x_{t+1} = A_t x_t + B_t theta_t + c_t; loss 1/2|x_T - y|^2; cost WD/2 |theta|^2."""
  rng = np.random.default_rng(seed)
  mats = [(rng.normal(size=(N_STATE, N_STATE)) / np.sqrt(N_STATE),
           rng.normal(size=(N_STATE, N_CTRL)), rng.normal(size=(N_STATE,)))
          for _ in range(stages)]

  def make_stage(t, a, b, c):
    a, b, c = (jnp.asarray(m) for m in (a, b, c))
    return G.stage(lambda x, th: x @ a.T + th[0] @ b.T + c, [f"theta_{t}"], weight_decay=WD)

  stages_ = [make_stage(t, *m) for t, m in enumerate(mats)]
  return G.Game(tuple(stages_), "squared_error"), mats


def least_squares_minimiser(mats, x0, y):
  """Independent solve: x_T^(i) = G theta + h^(i); minimise mean 1/2|.|^2 + WD/2|theta|^2."""
  stages = len(mats)
  blocks, h = [], x0.T.copy()
  for t, (a, b, c) in enumerate(mats):
    phi = np.eye(N_STATE)
    for s in range(t + 1, stages):
      phi = mats[s][0] @ phi
    blocks.append(phi @ b)
    h = a @ h + c[:, None]
  gmat = np.concatenate(blocks, axis=1)
  lhs = gmat.T @ gmat + WD * np.eye(gmat.shape[1])
  rhs = gmat.T @ np.mean(y.T - h, axis=1)
  theta = np.linalg.solve(lhs, rhs)
  return [theta[t * N_CTRL:(t + 1) * N_CTRL] for t in range(stages)]


def random_problem(stages, batch, seed=0):
  game, mats = lq_game(stages, seed)
  rng = np.random.default_rng(seed + 1)
  x0 = rng.normal(size=(batch, N_STATE))
  y = rng.normal(size=(batch, N_STATE))
  params = {f"theta_{t}": jnp.asarray(rng.normal(size=(N_CTRL,))) for t in range(stages)}
  return game, mats, params, jnp.asarray(x0), jnp.asarray(y)


def landing_error(params, updates, mats, x0, y):
  """Relative distance of params + updates from the least-squares minimiser."""
  new = jax.tree.map(jnp.add, params, updates)
  expected = least_squares_minimiser(mats, np.asarray(x0), np.asarray(y))
  got = np.concatenate([np.asarray(new[f"theta_{t}"]) for t in range(len(expected))])
  want = np.concatenate(expected)
  return np.linalg.norm(got - want) / np.linalg.norm(want)


EXACT = dict(learning_rate=1.0, curvature="dense", damping=0.0, vxx_reg=0.0, vxx_rank="exact")


@pytest.mark.parametrize("stages,batch", [(4, 1), (1, 6)])
def test_fne_step_lands_on_minimiser(stages, batch):
  # One player per stage; block-diagonal V_xx is exact for B = 1 or T = 1.
  game, mats, params, x0, y = random_problem(stages, batch)
  updates, _ = step(dgnopt.fne(game, **EXACT), params, (x0, y))
  assert landing_error(params, updates, mats, x0, y) < 1e-6


def test_batch_coupled_reference_lands_on_minimiser():
  # Several samples sharing parameters over several stages: exact batch DDP
  # needs the cross-sample blocks of V_XX (DDPNOpt eq. 37).
  game, mats, params, x0, y = random_problem(stages=4, batch=5)
  updates, _ = dgnopt.reference.dense_step(game, params, x0, y, coupling="full", **EXACT)
  assert landing_error(params, updates, mats, x0, y) < 1e-6


def test_block_diagonal_is_an_approximation_for_batches():
  # The same problem with the block-diagonal approximation of the fast path
  # does not land on the minimiser: the oracle above is not vacuous.
  game, mats, params, x0, y = random_problem(stages=4, batch=5)
  updates, _ = step(dgnopt.fne(game, **EXACT), params, (x0, y))
  assert landing_error(params, updates, mats, x0, y) > 1e-4
  ref, _ = dgnopt.reference.dense_step(game, params, x0, y, coupling="block", **EXACT)
  np.testing.assert_allclose(np.concatenate([np.asarray(updates[k]) for k in sorted(updates)]),
                             np.concatenate([np.asarray(ref[k]) for k in sorted(ref)]),
                             rtol=1e-8, atol=1e-12)


def test_open_loop_step_is_not_the_minimiser():
  # Without feedback (OLNE) a layer-wise Newton step misses the joint minimiser.
  game, mats, params, x0, y = random_problem(stages=4, batch=1)
  updates, _ = step(dgnopt.olne(game, **EXACT), params, (x0, y))
  assert landing_error(params, updates, mats, x0, y) > 1e-3
