"""Linear-quadratic games and their least-squares minimiser (the LQ oracle)."""

import jax
import jax.numpy as jnp
import numpy as np

import dgnopt_jax as dgnopt

G = dgnopt.games
N_STATE, N_CTRL, WD = 4, 2, 0.1
EXACT = dict(learning_rate=1.0, curvature="dense", damping=0.0, vxx_reg=0.0, vxx_rank="exact")


def lq_game(stages, players, seed=0):
  """x_{t+1} = A_t x_t + sum_n B_tn theta_tn + c_t, loss 1/2|x_T - y|^2, cost WD/2|theta|^2."""
  rng = np.random.default_rng(seed)
  mats = [(rng.normal(size=(N_STATE, N_STATE)) / np.sqrt(N_STATE),
           [rng.normal(size=(N_STATE, N_CTRL)) for _ in range(players)],
           rng.normal(size=(N_STATE,))) for _ in range(stages)]

  def make_stage(t, a, bs, c):
    a, c = jnp.asarray(a), jnp.asarray(c)
    bs = [jnp.asarray(b) for b in bs]
    fn = lambda x, th: x @ a.T + sum(tn @ b.T for tn, b in zip(th, bs)) + c
    return G.stage(fn, [f"theta_{t}_{n}" for n in range(players)], weight_decay=WD)

  return G.Game(tuple(make_stage(t, *m) for t, m in enumerate(mats)), "squared_error"), mats


def minimiser(mats, x0, y):
  """Independent least squares over all players' parameters jointly."""
  stages = len(mats)
  blocks, h = [], x0.T.copy()
  for t, (a, bs, c) in enumerate(mats):
    phi = np.eye(N_STATE)
    for s in range(t + 1, stages):
      phi = mats[s][0] @ phi
    blocks += [phi @ b for b in bs]
    h = a @ h + c[:, None]
  gmat = np.concatenate(blocks, axis=1)
  return np.linalg.solve(gmat.T @ gmat + WD * np.eye(gmat.shape[1]),
                         gmat.T @ np.mean(y.T - h, axis=1))


def problem(stages, players, batch, seed=0):
  """(game, mats, params, x0, y) of a random LQ game."""
  game, mats = lq_game(stages, players, seed)
  rng = np.random.default_rng(seed + 1)
  x0 = jnp.asarray(rng.normal(size=(batch, N_STATE)))
  y = jnp.asarray(rng.normal(size=(batch, N_STATE)))
  params = {f"theta_{t}_{n}": jnp.asarray(rng.normal(size=(N_CTRL,)))
            for t in range(stages) for n in range(players)}
  return game, mats, params, x0, y


def landing_error(game, mats, params, updates, x0, y):
  """Relative distance of params + updates from the least-squares minimiser."""
  new = jax.tree.map(jnp.add, params, updates)
  got = np.concatenate([np.asarray(new[p.name]) for p in game.players])
  want = minimiser(mats, np.asarray(x0), np.asarray(y))
  return np.linalg.norm(got - want) / np.linalg.norm(want)
