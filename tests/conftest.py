"""Test configuration: float64 so that fast paths can be compared at 1e-8."""

import jax

jax.config.update("jax_enable_x64", True)
