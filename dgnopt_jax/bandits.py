"""Multi-armed bandits for choosing a game's alignment (DGNOpt Alg. 2-3); see :func:`dgnopt_jax.aligned`."""

from dgnopt_jax._src.alignment import STRATEGIES
from dgnopt_jax._src.alignment import accuracy
from dgnopt_jax._src.bandit import Bandit
from dgnopt_jax._src.bandit import BanditState
from dgnopt_jax._src.bandit import draw
from dgnopt_jax._src.bandit import exp3pp
from dgnopt_jax._src.bandit import fixed
from dgnopt_jax._src.bandit import uniform

__all__ = ["STRATEGIES", "Bandit", "BanditState", "accuracy", "draw", "exp3pp", "fixed",
           "uniform"]
