"""Data-parallel (and optionally model-parallel) training on a ``jax.sharding`` mesh."""

from dgnopt_jax._src.sharding import DATA_AXIS
from dgnopt_jax._src.sharding import MODEL_AXIS
from dgnopt_jax._src.sharding import batch_sharding
from dgnopt_jax._src.sharding import make_mesh
from dgnopt_jax._src.sharding import params_sharding
from dgnopt_jax._src.sharding import replicated
from dgnopt_jax._src.sharding import shard_batch
from dgnopt_jax._src.sharding import state_sharding

__all__ = [
    "DATA_AXIS",
    "MODEL_AXIS",
    "batch_sharding",
    "make_mesh",
    "params_sharding",
    "replicated",
    "shard_batch",
    "state_sharding",
]
