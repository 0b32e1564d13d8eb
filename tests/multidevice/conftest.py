"""The problem the multi-device tests share: the DIGITS MLP and its first batches."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dgnopt_jax as dgnopt
from dgnopt_jax import datasets

G = dgnopt.games
STEPS = 5
BATCH = 64


@pytest.fixture(scope="module")
def problem():
  data = datasets.load("digits")
  game = G.sequential([G.Dense(32, "tanh"), G.Dense(32, "tanh"), G.Dense(10)], (64,),
                      dtype=jnp.float32)
  params = game.init(jax.random.PRNGKey(0))
  batches = [(data.x_train[i * BATCH:(i + 1) * BATCH].astype(np.float32),
              data.y_train[i * BATCH:(i + 1) * BATCH].astype(np.int32))
             for i in range(STEPS)]
  return game, params, batches
