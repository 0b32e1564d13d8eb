"""Networks as multi-player dynamic games: stages, players, ready-made layers and
networks, Flax models (linen and NNX), games traced from JAX functions."""

from dgnopt_jax._src.games import AvgPool
from dgnopt_jax._src.games import Conv2D
from dgnopt_jax._src.games import Dense
from dgnopt_jax._src.games import Flatten
from dgnopt_jax._src.games import Game
from dgnopt_jax._src.games import InceptionBlock
from dgnopt_jax._src.games import Parallel
from dgnopt_jax._src.games import Player
from dgnopt_jax._src.games import RESIDUAL_ALIGNMENTS
from dgnopt_jax._src.games import ResidualBlock
from dgnopt_jax._src.games import Stage
from dgnopt_jax._src.games import get_activation
from dgnopt_jax._src.games import get_path
from dgnopt_jax._src.games import sequential
from dgnopt_jax._src.games import stage
from dgnopt_jax._src.fictitious import collapse_params
from dgnopt_jax._src.fictitious import fictitious
from dgnopt_jax._src.fictitious import split_params
from dgnopt_jax._src.flax_games import UnsupportedModuleError
from dgnopt_jax._src.flax_games import from_flax
from dgnopt_jax._src.running_averages import update_batch_stats
from dgnopt_jax._src.nnx_games import from_nnx
from dgnopt_jax._src.networks import IMAGE_NETWORKS
from dgnopt_jax._src.networks import NETWORKS
from dgnopt_jax._src.networks import network_from_name
from dgnopt_jax._src.traced_games import from_function
from dgnopt_jax._src.traced_games import per_sample_rngs

__all__ = ["AvgPool", "Conv2D", "Dense", "Flatten", "Game", "InceptionBlock", "Parallel",
           "Player", "RESIDUAL_ALIGNMENTS", "ResidualBlock", "Stage", "get_activation",
           "get_path", "sequential", "stage", "collapse_params", "fictitious", "split_params",
           "from_flax", "from_function", "from_nnx", "per_sample_rngs", "update_batch_stats", "UnsupportedModuleError", "IMAGE_NETWORKS",
           "NETWORKS", "network_from_name"]

