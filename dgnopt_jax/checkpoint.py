"""Checkpoints of params and optimizer state, restored bit for bit."""

from dgnopt_jax._src.checkpoint import restore
from dgnopt_jax._src.checkpoint import save

__all__ = ["restore", "save"]
