"""LQ oracle: one exact FNE step lands on the least-squares minimiser."""

import numpy as np
import pytest

import dgnopt_jax as dgnopt
from helpers import step
from lq import EXACT, landing_error, problem


@pytest.mark.parametrize("stages,batch", [(4, 1), (1, 6)])
def test_fne_step_lands_on_minimiser(stages, batch):
  # One player per stage; block-diagonal V_xx is exact for B = 1 or T = 1.
  game, mats, params, x0, y = problem(stages, 1, batch)
  updates, _ = step(dgnopt.fne(game, **EXACT), params, (x0, y))
  assert landing_error(game, mats, params, updates, x0, y) < 1e-6


def test_batch_coupled_reference_lands_on_minimiser():
  # Several samples sharing parameters over several stages: exact batch DDP
  # needs the cross-sample blocks of V_XX (DDPNOpt eq. 37).
  game, mats, params, x0, y = problem(4, 1, 5)
  updates, _ = dgnopt.reference.dense_step(game, params, x0, y, coupling="full", **EXACT)
  assert landing_error(game, mats, params, updates, x0, y) < 1e-6


def test_block_diagonal_is_an_approximation_for_batches():
  # The same problem with the block-diagonal approximation of the fast path
  # does not land on the minimiser: the oracle above is not vacuous.
  game, mats, params, x0, y = problem(4, 1, 5)
  updates, _ = step(dgnopt.fne(game, **EXACT), params, (x0, y))
  assert landing_error(game, mats, params, updates, x0, y) > 1e-4
  ref, _ = dgnopt.reference.dense_step(game, params, x0, y, coupling="block", **EXACT)
  np.testing.assert_allclose(np.concatenate([np.asarray(updates[k]) for k in sorted(updates)]),
                             np.concatenate([np.asarray(ref[k]) for k in sorted(ref)]),
                             rtol=1e-8, atol=1e-12)


def test_open_loop_step_is_not_the_minimiser():
  # Without feedback (OLNE) a layer-wise Newton step misses the joint minimiser.
  game, mats, params, x0, y = problem(4, 1, 1)
  updates, _ = step(dgnopt.olne(game, **EXACT), params, (x0, y))
  assert landing_error(game, mats, params, updates, x0, y) > 1e-3
