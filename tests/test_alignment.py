"""Alignment bandits (DGNOpt Alg. 2-3): EXP3++ against a plain transcription, and `aligned`."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import dgnopt_jax as dgnopt
from dgnopt_jax import bandits

from helpers import perturbed_params

G = dgnopt.games


class Exp3ppReference:
  """EXP3++ written out from Seldin & Slivkins (2014) / DGNOpt Alg. 3, in float64 numpy."""

  def __init__(self, num_arms, c):
    self.M, self.c, self.k, self.L = num_arms, c, 1, np.zeros(num_arms)

  def probabilities(self):
    M, k, L = self.M, self.k, self.L
    beta = 0.5 * math.sqrt(math.log(M) / (k * M))
    eps = np.empty(M)
    for m in range(M):
      gap = min(1.0, (L[m] - L.min()) / k)
      xi = math.inf if gap == 0 else self.c * math.log(k) ** 2 / (k * gap ** 2)
      eps[m] = min(1 / (2 * M), beta, xi)
    rho = np.exp(-beta * (L - L.min()))
    rho /= rho.sum()
    return (1 - eps.sum()) * rho + eps

  def update(self, arm, reward):
    self.L[arm] += (1 - reward) / self.probabilities()[arm]
    self.k += 1


@pytest.mark.parametrize("num_arms,c", [(2, 18.0), (3, 18.0), (4, 0.5)])
def test_exp3pp_matches_the_algorithm(num_arms, c):
  bandit = bandits.exp3pp(num_arms, gap_constant=c)
  reference = Exp3ppReference(num_arms, c)
  state = bandit.init()
  rng = np.random.default_rng(num_arms)
  update = jax.jit(bandit.update)
  for _ in range(60):
    np.testing.assert_allclose(bandit.probabilities(state), reference.probabilities(),
                               rtol=2e-5, atol=1e-7)
    # A skewed reward per arm opens gaps, so the xi_k term becomes active.
    arm = int(rng.integers(num_arms))
    reward = float(np.clip(0.2 + 0.6 * arm / max(num_arms - 1, 1) + 0.1 * rng.normal(), 0, 1))
    state = update(state, jnp.asarray(arm), jnp.asarray(reward))
    reference.update(arm, reward)
  np.testing.assert_allclose(state.cumulative_loss, reference.L, rtol=1e-5)
  assert int(state.round) == reference.k
  assert int(state.pulls.sum()) == 60


def test_exp3pp_finds_the_best_arm_of_a_stationary_bandit():
  bandit = bandits.exp3pp(3)
  means = jnp.array([0.3, 0.5, 0.8])

  def round_(state, key):
    k_arm, k_reward = jax.random.split(key)
    arm = bandits.draw(bandit, state, k_arm)
    reward = jax.random.bernoulli(k_reward, means[arm]).astype(jnp.float32)
    return bandit.update(state, arm, reward), arm

  _, arms = jax.lax.scan(round_, bandit.init(), jax.random.split(jax.random.PRNGKey(0), 3000))
  late = np.asarray(arms[-1000:])
  assert np.mean(late == 2) > 0.8, np.bincount(late, minlength=3)


def test_draws_follow_the_probabilities():
  bandit = bandits.exp3pp(3)
  state = bandits.BanditState(jnp.asarray(40, jnp.int32), jnp.array([10.0, 25.0, 60.0]),
                              jnp.zeros([3], jnp.int32))
  p = np.asarray(bandit.probabilities(state))
  assert np.all(p > 0.02) and abs(p.sum() - 1) < 1e-6 and p[0] > p[1] > p[2]
  n = 20000
  arms = jax.vmap(lambda k: bandits.draw(bandit, state, k))(jax.random.split(jax.random.PRNGKey(1), n))
  freq = np.bincount(np.asarray(arms), minlength=3) / n
  np.testing.assert_allclose(freq, p, atol=4 * np.sqrt(p * (1 - p) / n).max())


def test_uniform_and_fixed():
  u, f = bandits.uniform(4), bandits.fixed(4, arm=2)
  np.testing.assert_allclose(u.probabilities(u.init()), np.full(4, 0.25))
  np.testing.assert_array_equal(f.probabilities(f.init()), [0, 0, 1, 0])
  assert int(bandits.draw(f, f.init(), jax.random.PRNGKey(3))) == 2
  with pytest.raises(ValueError, match="arm must be in"):
    bandits.fixed(2, arm=2)
  with pytest.raises(ValueError, match="num_arms"):
    bandits.exp3pp(0)


def test_exp3pp_ignores_a_non_finite_reward():
  bandit = bandits.exp3pp(2)
  state = bandit.update(bandit.init(), jnp.asarray(0), jnp.asarray(jnp.nan))
  assert np.all(np.isfinite(state.cumulative_loss)) and float(state.cumulative_loss[0]) == 2.0


def _residual_game(alignment):
  """A conv stem and a residual block with a projection shortcut (4 -> 6 channels)."""
  return G.sequential([G.Conv2D(4, (3, 3), activation="relu"),
                       G.ResidualBlock(6, shortcut="projection", alignment=alignment),
                       G.AvgPool((2, 2)), G.Dense(3)], (4, 4, 1))


@pytest.fixture(scope="module")
def problem():
  games = [_residual_game("merge"), _residual_game("split")]
  params = perturbed_params(games[0], seed=2)
  rng = np.random.default_rng(0)
  batches = [(jnp.asarray(rng.normal(size=(8, 4, 4, 1))), jnp.asarray(rng.integers(3, size=8)))
             for _ in range(8)]
  return games, params, batches


def _jitted(tx):
  return jax.jit(lambda state, params, batch: tx.update(None, state, params, batch=batch))


def _run(tx, params, batches, steps):
  step = jax.jit(lambda p, s, b, v: tx.update(None, s, p, batch=b, validation_batch=v))
  state = tx.init(params)
  history = []
  for i in range(steps):
    updates, new_state = step(params, state, batches[2 * i], batches[2 * i + 1])
    history.append((params, state, updates, new_state))
    params, state = optax.apply_updates(params, updates), new_state
  return history


@pytest.mark.parametrize("strategy", [pytest.param("fixed", marks=pytest.mark.slow),
                                      pytest.param("random", marks=pytest.mark.slow), "adaptive"])
def test_each_step_is_the_drawn_alignments_update(problem, strategy):
  """Shared state (fne-adam: per-player moments): the step equals the drawn game's own solver."""
  games, params, batches = problem
  make = lambda g: dgnopt.fne(g, 0.05, "adam")
  tx = dgnopt.aligned(games, make, strategy, seed=4)
  solo = [_jitted(make(g)) for g in games]
  history = _run(tx, params, batches, 4)
  drawn = []
  for i, (p, state, updates, new_state) in enumerate(history):
    arm = int(new_state.alignment)
    drawn.append(arm)
    want, want_inner = solo[arm](state.inner, p, batches[2 * i])
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12),
                 updates, want)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12),
                 new_state.inner, want_inner)
    np.testing.assert_allclose(new_state.loss, want_inner.loss, rtol=1e-12)
    # The reward: accuracy of the updated params on the validation batch.
    xv, yv = batches[2 * i + 1]
    logits = games[0].apply(optax.apply_updates(p, updates), xv)
    assert float(new_state.reward) == pytest.approx(float(jnp.mean(jnp.argmax(logits, -1) == yv)))
  assert history[-1][3].bandit.pulls.sum() == 4
  # The two alignments' solvers give different updates from the same state.
  p, state = history[0][0], history[0][1]
  steps = [solo[m](state.inner, p, batches[0])[0] for m in range(2)]
  assert max(float(jnp.max(jnp.abs(a - b))) for a, b in
             zip(jax.tree.leaves(steps[0]), jax.tree.leaves(steps[1]))) > 1e-4
  if strategy == "fixed":
    assert drawn == [0, 0, 0, 0]


def test_per_alignment_states_when_the_stages_differ(problem):
  """GR-KFAC keeps statistics per cooperative stage: one state per alignment, the drawn one advances."""
  games, params, batches = problem
  make = lambda g: dgnopt.gr(g, 0.05, "kfac")
  tx = dgnopt.aligned(games, make, "random", seed=1)
  solo = [_jitted(make(g)) for g in games]
  history = _run(tx, params, batches, 3)
  assert isinstance(history[0][1].inner, dgnopt.PerAlignment)
  for i, (p, state, updates, new_state) in enumerate(history):
    arm = int(new_state.alignment)
    want, want_inner = solo[arm](state.inner.states[arm], p, batches[2 * i])
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-12),
                 updates, want)
    _assert_statistics_close(new_state.inner.states[arm], want_inner)
    np.testing.assert_allclose(new_state.loss, want_inner.loss, rtol=1e-12)
    jax.tree.map(np.testing.assert_array_equal, new_state.inner.states[1 - arm],
                 state.inner.states[1 - arm])


def _assert_statistics_close(got, want):
  """Equal statistics; eigenbases are compared through the matrices they diagonalise
  (an eigenvector's sign is arbitrary and may differ between compilations)."""
  def check(path, a, b):
    if "basis" not in jax.tree_util.keystr(path):
      np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-14)
  jax.tree_util.tree_map_with_path(check, got, want)
  for g, w in zip(jax.tree.leaves(got, is_leaf=lambda x: hasattr(x, "input_basis")),
                  jax.tree.leaves(want, is_leaf=lambda x: hasattr(x, "input_basis"))):
    if hasattr(g, "input_basis"):
      for basis, values in (("input_basis", "input_eigenvalues"),
                            ("output_basis", "output_eigenvalues")):
        rebuild = lambda s: (getattr(s, basis) * getattr(s, values)[..., None, :]
                             ) @ jnp.swapaxes(getattr(s, basis), -1, -2)
        np.testing.assert_allclose(rebuild(g), rebuild(w), rtol=1e-8, atol=1e-12)


def test_aligned_errors(problem):
  games, params, batches = problem
  make = lambda g: dgnopt.fne(g, 0.1)
  tx = dgnopt.aligned(games, make, "adaptive")
  with pytest.raises(TypeError, match="validation batch"):
    tx.update(None, tx.init(params), params, batch=batches[0])
  other = G.sequential([G.Dense(3)], (4, 4, 1))
  with pytest.raises(ValueError, match="same network"):
    dgnopt.aligned([games[0], other], make)
  with pytest.raises(ValueError, match="strategy"):
    dgnopt.aligned(games, make, "greedy")
  with pytest.raises(ValueError, match="arms"):
    dgnopt.aligned(games, make, bandits.exp3pp(3))
  # fixed and random need no validation batch
  tx = dgnopt.aligned(games, make, "random")
  updates, state = tx.update(None, tx.init(params), params, batch=batches[0])
  assert np.isnan(float(state.reward)) and int(state.bandit.pulls.sum()) == 1
