"""dgnopt_jax: train neural networks by solving the dynamic game they define.

DDPNOpt, GT-DDP and DGNOpt as optax transformations::

  import dgnopt_jax as dgnopt
  game = dgnopt.games.sequential([dgnopt.games.Dense(32, "tanh"),
                                  dgnopt.games.Dense(10)], input_shape=(64,))
  tx = dgnopt.fne(game, learning_rate=0.1)
  state = tx.init(params)
  updates, state = tx.update(None, state, params, batch=(x, y))

or by name, beside optax's own (``dgnopt.optimizer_from_name("fne-kfac/5@0.03", game)``).
"""

from dgnopt_jax import bandits
from dgnopt_jax import checkpoint
from dgnopt_jax import curvature
from dgnopt_jax import games
from dgnopt_jax import losses
from dgnopt_jax import reference
from dgnopt_jax import sharding
from dgnopt_jax._src.alignment import AlignedState
from dgnopt_jax._src.alignment import PerAlignment
from dgnopt_jax._src.alignment import aligned
from dgnopt_jax._src.lapack_threads import limit_lapack_threads
from dgnopt_jax._src.optimizer_names import DEFAULT_LEARNING_RATES
from dgnopt_jax._src.optimizer_names import NamedOptimizer
from dgnopt_jax._src.optimizer_names import OptimizerName
from dgnopt_jax._src.optimizer_names import optimizer_from_name
from dgnopt_jax._src.optimizer_names import parse_optimizer_name
from dgnopt_jax._src.train_state import apply_game_step
from dgnopt_jax._src.transform import DGNOptState
from dgnopt_jax._src.transform import fne
from dgnopt_jax._src.transform import gr
from dgnopt_jax._src.transform import olne

__version__ = "0.1.0"

__all__ = [
    "AlignedState",
    "DEFAULT_LEARNING_RATES",
    "DGNOptState",
    "NamedOptimizer",
    "OptimizerName",
    "PerAlignment",
    "aligned",
    "apply_game_step",
    "bandits",
    "checkpoint",
    "curvature",
    "fne",
    "games",
    "gr",
    "limit_lapack_threads",
    "losses",
    "olne",
    "optimizer_from_name",
    "parse_optimizer_name",
    "reference",
    "sharding",
]
