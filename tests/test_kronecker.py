"""Kronecker curvatures: statistics, solves, cooperative factors, and the dense reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dgnopt_jax as dgnopt
import helpers as h
from dgnopt_jax._src import kronecker
from dgnopt_jax._src import layer_taps

G = dgnopt.games


def as_matrix(theta):
  """The (Ka, O) matrix view of params with a 2-D kernel (or a conv's, O its last axis)."""
  return layer_taps.to_matrix(theta, theta["kernel"].shape[-1])


def _per_sample_gradients(stage, x, thetas, v_next, n):
  """Independent per-sample gradients of V_x'^(i) . F(x^(i), theta) by jax.grad per sample."""

  def one(xi, vi):
    def value(th):
      out = stage.fn(jax.tree.map(lambda l: l[None], xi), thetas[:n] + (th,) + thetas[n + 1:])
      return sum(jnp.vdot(o[0], v) for o, v in zip(jax.tree.leaves(out), jax.tree.leaves(vi)))
    return jax.grad(value)(thetas[n])

  return jax.vmap(one)(x, v_next)


@pytest.mark.parametrize("which", ["dense", "dense_rows_multi_axis", "dense_multi_axis", "conv",
                                   "conv_strided", "residual", "inception"])
def test_statistics_rebuild_per_sample_gradients(which):
  """sum_p a_ip g_ip^T is each player's per-sample gradient (GT-DDP eq. 43), their sum Q_theta."""
  rng = np.random.default_rng(0)
  shape = (5, 5, 2)
  game = {
      "dense": lambda: G.sequential([G.Flatten(), G.Dense(4, "tanh")], shape),
      # A (5, 2, 2, 3) kernel on the rows of (B, 5, 5, 2); a (5, 5, 2, 2, 3) kernel on the samples.
      "dense_rows_multi_axis": lambda: G.sequential(
          [G.Dense((2, 3), "tanh", rows=True, contracted_axes=2)], shape),
      "dense_multi_axis": lambda: G.sequential([G.Dense((2, 3), "tanh", contracted_axes=3)],
                                               shape),
      "conv": lambda: G.sequential([G.Conv2D(3, (3, 3), activation="tanh")], shape),
      "conv_strided": lambda: G.sequential(
          [G.Conv2D(3, (2, 2), (2, 2), "VALID", "tanh")], shape),
      "residual": lambda: G.sequential(
          [G.ResidualBlock(3, shortcut="projection", alignment="split"),
           G.ResidualBlock(3, shortcut="projection")], shape),
      "inception": lambda: G.sequential([G.InceptionBlock(2)], shape),
  }[which]()
  params = h.perturbed_params(game)
  x = jnp.asarray(rng.normal(size=(3,) + shape))
  checked = 0
  for stage in game.stages:
    thetas = tuple(G.get_path(params, p.path) for p in stage.players)
    y = stage.fn(x, thetas)
    if stage.num_players:
      v_next = jax.tree.map(lambda l: jnp.asarray(rng.normal(size=l.shape)), y)
      indices = tuple(range(stage.num_players))
      stats = layer_taps.statistics(stage.fn, x, thetas, v_next, indices)
      for n in indices:
        want = _per_sample_gradients(stage, x, thetas, v_next, n)
        mats = jnp.einsum("bpi,bpo->bio", stats[n].inputs, stats[n].output_grads)
        got = jax.vmap(lambda m: layer_taps.from_matrix(m, thetas[n]))(mats)
        h.assert_trees_close(got, want, 1e-12)
        # Their sum over the batch, Q_theta = F_theta^T V_x', in one product.
        h.assert_trees_close(kronecker.statistics_gradient(stats[n], thetas[n]),
                             jax.tree.map(lambda w: w.sum(axis=0), want), 1e-12)
        # The kernel part tap by tap, without the patches (one factor column).
        layer, layer_x = layer_taps.tapped_layers(stage.fn, x, thetas, (n,))[n]
        q = layer_taps.per_sample_kernel_gradients(layer, layer_x,
                                                   stats[n].output_grads[:, None])
        h.assert_trees_close(q[:, 0].reshape(want["kernel"].shape), want["kernel"], 1e-12)
        checked += 1
    x = y
  assert checked == {"dense": 1, "dense_rows_multi_axis": 1, "dense_multi_axis": 1, "conv": 1,
                     "conv_strided": 1, "residual": 6,
                     "inception": 4}[which]


def _random_statistics(rng, batch, positions, sizes):
  return tuple(layer_taps.KroneckerStatistics(
      jnp.asarray(rng.normal(size=(batch, positions, ka))),
      jnp.asarray(rng.normal(size=(batch, positions, o)) / batch)) for ka, o in sizes)


def _like(rows, cols, rng):
  return {"kernel": jnp.asarray(rng.normal(size=(rows - 1, cols))),
          "bias": jnp.asarray(rng.normal(size=(cols,)))}


def test_multi_axis_kernel_is_solved_in_its_matrix_view():
  """A (2, 2, 2, 3) kernel with a (2, 3) bias: factors of (5, 6), the solve of [kernel; bias]."""
  rng = np.random.default_rng(2)
  damping = 0.3
  curv = kronecker.Kronecker(decay=0.5, inverse_every=1, statistics_every=1)
  layer = G.Dense((2, 3), rows=True, contracted_axes=2)
  theta = {"kernel": jnp.asarray(rng.normal(size=(2, 2, 2, 3))),
           "bias": jnp.asarray(rng.normal(size=(2, 3)))}
  player = G.Player(("p",), layer=layer)
  assert layer_taps.has_kronecker_structure(player, theta)
  state = curv.init(theta, player)
  assert state.input_cov.shape == (5, 5) and state.output_cov.shape == (6, 6)
  (stats,) = _random_statistics(rng, 6, 2, [(5, 6)])
  state, solve_step = curv.update(state, theta, None, stats)
  a, g = np.asarray(stats.inputs), np.asarray(stats.output_grads)
  factors = [np.einsum("bpi,bpj->ij", a, a) / 12, 6 * np.einsum("bpo,bpq->oq", g, g)]
  v = {"kernel": jnp.asarray(rng.normal(size=(2, 2, 2, 3))),
       "bias": jnp.asarray(rng.normal(size=(2, 3)))}
  flat = lambda t: np.concatenate([np.asarray(t["kernel"]).reshape(4, 6),
                                   np.asarray(t["bias"]).reshape(1, 6)]).reshape(-1)
  want = np.linalg.solve(np.kron(*factors) + damping * np.eye(30), flat(v))
  got = curv.solve(solve_step, v, damping)
  assert jax.tree.map(jnp.shape, got) == jax.tree.map(jnp.shape, v)
  np.testing.assert_allclose(flat(got), want, rtol=1e-9, atol=1e-12)
  # A kernel whose trailing axes are not the layer's outputs is no Kronecker player.
  assert not layer_taps.has_kronecker_structure(
      player, {"kernel": theta["kernel"].reshape(4, 6), "bias": theta["bias"]})


@pytest.mark.parametrize("rescaling", [False, True])
@pytest.mark.parametrize("inverse_every,statistics_every", [(2, 1), (4, 3)])
def test_solve_equals_dense_kronecker_solve(rescaling, inverse_every, statistics_every):
  """Each step's solve is the dense one, the statistics and the basis on their periods.

  KFAC: ``(A (x) G + damping I)^-1 v`` with ``A``, ``G`` the debiased running
  averages at the last refresh. EKFAC: ``(U diag(s) U^T + damping I)^-1 v``
  with ``U = U_A (x) U_G`` from the last refresh and ``s`` the debiased running
  second moments of the per-sample gradients in that basis since then. The
  running averages take in the batches of the steps ``0, statistics_every,
  ...`` and of the refresh steps ``0, inverse_every, ...`` (with (4, 3):
  steps 0, 3, 4 of 0..5; the other steps leave them as they were).
  """
  rng = np.random.default_rng(1)
  decay, damping = 0.7, 0.3
  curv = kronecker.Kronecker(decay=decay, inverse_every=inverse_every,
                             eigenbasis_rescaling=rescaling, statistics_every=statistics_every)
  theta = _like(4, 3, rng)
  state = curv.init(theta, G.Player(("p",), layer=G.Dense(3)))
  covs = [np.zeros((4, 4)), np.zeros((3, 3))]
  moments = np.zeros((4, 3))
  updates = 0
  for step in range(6):
    (stats,) = _random_statistics(rng, 6, 2, [(4, 3)])
    state, solve_step = curv.update(state, theta, None, stats)
    a, g = np.asarray(stats.inputs), np.asarray(stats.output_grads)
    refresh = step % inverse_every == 0
    collect = refresh or step % statistics_every == 0
    if collect:
      batch_covs = [np.einsum("bpi,bpj->ij", a, a) / 12, 6 * np.einsum("bpo,bpq->oq", g, g)]
      covs = [decay * c + (1 - decay) * n for c, n in zip(covs, batch_covs)]
      updates += 1
    if refresh:
      factors = [c / (1 - decay ** updates) for c in covs]
      ua, ug = (np.linalg.eigh(m)[1] for m in factors)
      moments, since = np.zeros((4, 3)), 0
    if collect:
      per_sample = np.einsum("bpi,bpo->bio", a, g)
      rotated = np.einsum("ij,bjk,kl->bil", ua.T, per_sample, ug)
      moments = decay * moments + (1 - decay) * 6 * np.sum(rotated ** 2, axis=0)
      since += 1
    if rescaling:
      u = np.kron(ua, ug)
      matrix = u @ np.diag((moments / (1 - decay ** since)).reshape(-1)) @ u.T
    else:
      matrix = np.kron(*factors)
    v = _like(4, 3, rng)
    got = as_matrix(curv.solve(solve_step, v, damping))
    vec = np.asarray(as_matrix(v)).reshape(-1)
    want = np.linalg.solve(matrix + damping * np.eye(12), vec).reshape(4, 3)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(np.asarray(state.input_cov), covs[0], rtol=1e-12, atol=1e-14)
    assert int(state.count) == step + 1 and int(state.updates) == updates


@pytest.mark.parametrize("field", ["inverse_every", "statistics_every"])
@pytest.mark.parametrize("value", [0, -2, 2.5, True])
def test_periods_must_be_positive_step_counts(field, value):
  with pytest.raises(ValueError, match=f"{field} must be a positive integer"):
    kronecker.Kronecker(**{field: value})


def _joint_numpy(stats):
  a = np.concatenate([np.asarray(s.inputs) for s in stats], axis=-1)
  g = np.concatenate([np.asarray(s.output_grads) for s in stats], axis=-1)
  b, p = a.shape[:2]
  return np.einsum("bpi,bpj->ij", a, a) / (b * p), b * np.einsum("bpo,bpq->oq", g, g)


@pytest.mark.parametrize("sizes", [[(4, 3), (3, 2)], [(3, 2), (2, 2), (4, 3)]])
def test_cooperative_gains_solve_the_joint_kronecker_system(sizes):
  """Blocks of (A_ww (x) G_ww + damping I)^-1 vec(blockdiag(v_1..v_N)) (GT-DDP eq. 49-52)."""
  rng = np.random.default_rng(2)
  curv = kronecker.kfac()
  thetas = tuple(_like(ka, o, rng) for ka, o in sizes)
  players = tuple(G.Player((f"p{i}",), layer=G.Dense(o)) for i, (_, o) in enumerate(sizes))
  stage = G.Stage(None, players)
  assert curv.joint(stage, thetas)
  stats = _random_statistics(rng, 7, 2, sizes)
  _, step = curv.update(curv.init_joint(stage, thetas), thetas, None, stats)
  vs = tuple(_like(ka, o, rng) for ka, o in sizes)
  damping = 0.05
  got = curv.solve(step, vs, damping)
  a_ww, g_ww = _joint_numpy(stats)
  rows, cols = a_ww.shape[0], g_ww.shape[0]
  embedded = np.zeros((rows, cols))
  r = c = 0
  for v, (ka, o) in zip(vs, sizes):
    embedded[r:r + ka, c:c + o] = np.asarray(as_matrix(v))
    r, c = r + ka, c + o
  solved = np.linalg.solve(np.kron(a_ww, g_ww) + damping * np.eye(rows * cols),
                           embedded.reshape(-1)).reshape(rows, cols)
  r = c = 0
  for out, (ka, o) in zip(got, sizes):
    np.testing.assert_allclose(np.asarray(as_matrix(out)), solved[r:r + ka, c:c + o],
                               rtol=1e-9, atol=1e-12)
    r, c = r + ka, c + o


def test_cooperative_gains_are_gt_ddp_theorem_3():
  """Undamped, two players: k_u = A~_uu^-1 (v_u + A_uv A_vv^-1 v_v G_vv^-1 G_vu) G~_uu^-1.

  GT-DDP eq. 16-18 (DGNOpt Prop. 5) in the (inputs x outputs) orientation, with
  the Schur complements A~_uu = A_uu - A_uv A_vv^-1 A_vu and G~_uu likewise.
  """
  rng = np.random.default_rng(3)
  sizes = [(4, 3), (3, 2)]
  curv = kronecker.kfac()
  thetas = tuple(_like(ka, o, rng) for ka, o in sizes)
  players = tuple(G.Player((f"p{i}",), layer=G.Dense(o)) for i, (_, o) in enumerate(sizes))
  stage = G.Stage(None, players)
  stats = _random_statistics(rng, 20, 1, sizes)
  _, step = curv.update(curv.init_joint(stage, thetas), thetas, None, stats)
  vs = tuple(_like(ka, o, rng) for ka, o in sizes)
  got = curv.solve(step, vs, 0.0)
  a_ww, g_ww = _joint_numpy(stats)
  inv = np.linalg.inv
  for u, w in [(0, 1), (1, 0)]:
    ra = [slice(0, 4), slice(4, 7)]
    rg = [slice(0, 3), slice(3, 5)]
    a_uu, a_uv, a_vv = a_ww[ra[u], ra[u]], a_ww[ra[u], ra[w]], a_ww[ra[w], ra[w]]
    g_uu, g_uv, g_vv = g_ww[rg[u], rg[u]], g_ww[rg[u], rg[w]], g_ww[rg[w], rg[w]]
    a_tilde = a_uu - a_uv @ inv(a_vv) @ a_uv.T
    g_tilde = g_uu - g_uv @ inv(g_vv) @ g_uv.T
    v_u, v_v = (np.asarray(as_matrix(vs[i])) for i in (u, w))
    want = inv(a_tilde) @ (v_u + a_uv @ inv(a_vv) @ v_v @ inv(g_vv) @ g_uv.T) @ inv(g_tilde)
    np.testing.assert_allclose(np.asarray(as_matrix(got[u])), want, rtol=1e-7)


def _inception_game():
  return G.sequential([G.InceptionBlock(1), G.AvgPool((2, 2)), G.Flatten(), G.Dense(3)],
                      (4, 4, 1))


def _parallel_game():
  return G.sequential([G.Dense(4, "tanh"), G.Parallel(G.Dense(3, "tanh"), G.Dense(3, "tanh")),
                       G.Dense(3)], (4,))


def _residual_game():
  return G.sequential([G.Conv2D(3, (3, 3)), G.ResidualBlock(2, shortcut="projection"),
                       G.Flatten(), G.Dense(3)], (3, 3, 1))


GAMES = {
    "mlp": (lambda: h.tanh_mlp(wd=0.01), (4,)),
    "cnn": (h.relu_cnn, (4, 4, 1)),
    "inception": (_inception_game, (4, 4, 1)),
    "parallel": (_parallel_game, (4,)),
    "residual": (_residual_game, (3, 3, 1)),
    "custom_players": (h.two_player_game, (3,)),  # no layer: the diagonal fallback
}


@pytest.mark.parametrize("name,principle,curvature,statistics_every", [
    pytest.param(n, p, c, e, marks=m) for n, p, c, e, m in [
        ("mlp", "fne", "kfac", 1, ()), ("mlp", "gr", "ekfac", 3, ()),
        ("cnn", "fne", "ekfac", 1, pytest.mark.slow), ("parallel", "gr", "kfac", 3, ()),
        ("inception", "gr", "ekfac", 1, pytest.mark.slow),
        ("custom_players", "fne", "kfac", 1, ()),
        ("residual", "gr", "kfac", 3, pytest.mark.slow),
        ("cnn", "gr", "kfac", 3, pytest.mark.slow),
        ("parallel", "fne", "ekfac", 1, pytest.mark.slow),
        ("inception", "fne", "kfac", 3, pytest.mark.slow),
        ("residual", "fne", "ekfac", 3, pytest.mark.slow),
        ("custom_players", "gr", "ekfac", 3, pytest.mark.slow)]])
def test_fast_path_equals_dense_reference(name, principle, curvature, statistics_every):
  """Three steps (statistics carried, basis refreshed every 2) equal the reference to 1e-8.

  With ``statistics_every = 3`` the middle step leaves the running averages
  (and EKFAC's moments) as they were; the refresh on the third takes its batch in.
  """
  make, shape = GAMES[name]
  game = make()
  params = (h.two_player_params() if name == "custom_players" else h.perturbed_params(game))
  params = jax.tree.map(lambda p: jnp.asarray(p, jnp.float64), params)
  # EKFAC's second moments in a stale basis depend on the basis chosen inside a
  # degenerate eigenspace; a batch larger than the factors keeps them distinct.
  batch = h.classification_batch(shape, 20 if curvature == "ekfac" else 4)
  curv = kronecker.Kronecker(inverse_every=2, eigenbasis_rescaling=curvature == "ekfac",
                             statistics_every=statistics_every)
  lr, damping = 0.05, 0.5
  make_tx = dgnopt.gr if principle == "gr" else dgnopt.fne
  tx = make_tx(game, lr, curv, damping=damping, vxx_reg=1e-2)
  state = h.assert_steps_match_reference(tx, game, params, batch, 3, learning_rate=lr,
                                         curvature=curv, damping=damping, vxx_reg=1e-2,
                                         principle=principle)
  if principle == "gr" and name in ("parallel", "inception", "residual"):
    assert any("+" in key for key in state.curvature)  # the cooperative factors were used


def test_player_whose_layer_is_not_called_gets_a_clear_error():
  layer = G.Dense(3)
  fn = lambda x, th: jnp.tanh(x @ th[0]["kernel"] + th[0]["bias"])  # bypasses the layer
  game = G.Game((G.Stage(fn, (G.Player(("p",), layer=layer),)),), "softmax_cross_entropy")
  params = {"p": {"kernel": jnp.ones((4, 3)), "bias": jnp.zeros(3)}}
  tx = dgnopt.fne(game, 0.1, "kfac")
  with pytest.raises(ValueError, match="do not call their ready-made layer"):
    tx.update(None, tx.init(params), params, batch=h.classification_batch((4,), 2))


def test_factor_size_limit_names_the_player():
  game = G.sequential([G.Dense(8)], (30,))
  params = game.init(jax.random.PRNGKey(0))
  tx = dgnopt.fne(game, 0.1, kronecker.kfac(max_factor_size=16))
  with pytest.raises(ValueError, match="dense_0.*31x31"):
    tx.init(params)


@pytest.mark.parametrize("rescaling", [False, True])
def test_shared_statistics_give_gt_ddp_corollary_7(rescaling):
  """Two identical linear layers added (GT-DDP Fig. 7a): the cooperative gain is
  Q~_uu^-1 (d_u - Q_uv Q_vv^-1 d_v) with Q~_uu = U diag(g e/(g + e) + g) U^T (eq. 24)."""
  rng = np.random.default_rng(4)
  curv = kronecker.Kronecker(eigenbasis_rescaling=rescaling)
  game = G.sequential([G.Parallel(G.Dense(3), G.Dense(3))], (4,))
  (stage,) = game.stages
  assert stage.shared_statistics
  thetas = tuple(_like(5, 3, rng) for _ in range(2))
  (stats,) = _random_statistics(rng, 9, 1, [(5, 3)])
  state = curv.init_joint(stage, thetas)
  _, step = curv.update(state, thetas, None, (stats, stats))
  vs = tuple(_like(5, 3, rng) for _ in range(2))
  gamma = 0.2
  got = curv.solve(step, vs, gamma)
  a, g = np.asarray(stats.inputs), np.asarray(stats.output_grads)
  if rescaling:
    ua, ug = np.linalg.eigh(np.einsum("bpi,bpj->ij", a, a) / 9)[1], \
        np.linalg.eigh(9 * np.einsum("bpo,bpq->oq", g, g))[1]
    rotated = np.einsum("ij,bjk,kl->bil", ua.T, np.einsum("bpi,bpo->bio", a, g), ug)
    u = np.kron(ua, ug)
    e = (9 * np.sum(rotated ** 2, axis=0)).reshape(-1)
  else:
    k = np.kron(np.einsum("bpi,bpj->ij", a, a) / 9, 9 * np.einsum("bpo,bpq->oq", g, g))
    e, u = np.linalg.eigh(k)
  k_uu = u @ np.diag(e) @ u.T
  coop = u @ np.diag(gamma * e / (gamma + e) + gamma) @ u.T  # eq. 24
  d = [np.asarray(as_matrix(v)).reshape(-1) for v in vs]
  for n, m in [(0, 1), (1, 0)]:
    rhs = d[n] - k_uu @ np.linalg.solve(k_uu + gamma * np.eye(15), d[m])
    want = np.linalg.solve(coop, rhs).reshape(5, 3)
    np.testing.assert_allclose(np.asarray(as_matrix(got[n])), want, rtol=1e-8,
                               atol=1e-10)


def _shared_parallel_game():
  return G.sequential([G.Dense(4, "tanh"), G.Parallel(G.Dense(3), G.Dense(3)),
                       G.Dense(3, "tanh"), G.Dense(3)], (4,))


GAMES["shared_parallel"] = (_shared_parallel_game, (4,))


@pytest.mark.parametrize("curvature", ["kfac", pytest.param("ekfac", marks=pytest.mark.slow)])
def test_shared_statistics_fast_path_equals_dense_reference(curvature):
  make, shape = GAMES["shared_parallel"]
  game = make()
  params = jax.tree.map(lambda p: jnp.asarray(p, jnp.float64), h.perturbed_params(game))
  batch = h.classification_batch(shape, 20 if curvature == "ekfac" else 4)
  curv = kronecker.Kronecker(inverse_every=2, eigenbasis_rescaling=curvature == "ekfac",
                             statistics_every=3)  # the middle step keeps the statistics
  tx = dgnopt.gr(game, 0.05, curv, damping=0.5, vxx_reg=1e-2)
  state = h.assert_steps_match_reference(tx, game, params, batch, 3, learning_rate=0.05,
                                         curvature=curv, damping=0.5, vxx_reg=1e-2,
                                         principle="gr")
  assert any(isinstance(s, kronecker.SharedKroneckerState) for s in state.curvature.values())


def test_statistics_period_from_optimizer_names():
  # ``gr-kfac/3``: four steps fold in the statistics of steps 0 and 3 only.
  game = G.sequential([G.Dense(5, "tanh"), G.Dense(3)], (4,))
  optimizer = dgnopt.optimizer_from_name("gr-kfac/3@0.05", game)
  assert optimizer.learning_rate == 0.05
  params = game.init(jax.random.PRNGKey(0))
  state = optimizer.tx.init(params)
  x, y = h.classification_batch((4,), 6)
  step = jax.jit(optimizer.step)
  for _ in range(4):
    params, state, _ = step(params, state, x, y)
  kron = [s for s in jax.tree.leaves(state, is_leaf=lambda s: isinstance(
      s, kronecker.KroneckerState)) if isinstance(s, kronecker.KroneckerState)]
  assert len(kron) == 2
  assert all(int(s.count) == 4 and int(s.updates) == 2 for s in kron)
  with pytest.raises(ValueError, match="needs the kfac or ekfac curvature"):
    dgnopt.optimizer_from_name("gr-adam/3", game)
