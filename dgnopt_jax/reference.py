"""Dense reference of a DGNOpt step with explicit Jacobians (for tiny problems and tests)."""

from dgnopt_jax._src.reference import dense_step

__all__ = ["dense_step"]
