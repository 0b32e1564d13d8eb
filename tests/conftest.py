"""Test configuration: float64 so that fast paths can be compared at 1e-8.

The test programs are small and mostly compiled once: XLA's CPU backend
optimisation is switched off (``DGNOPT_TEST_XLA_OPT=1`` keeps it), which cuts
the suite's time by about a third. Subprocesses (examples, the 8-device run)
inherit the setting.
"""

import os

if os.environ.get("DGNOPT_TEST_XLA_OPT") != "1" and \
    "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             " --xla_backend_optimization_level=0").strip()

import jax  # noqa: E402  (after XLA_FLAGS)

jax.config.update("jax_enable_x64", True)


import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _release_compiled_programs():
  """Drops JAX's compiled programs after every test.

  Each program XLA compiles for the CPU keeps its code in memory mappings of
  its own; one process running the slow tests of a module accumulated over
  65530 of them (Linux's default ``vm.max_map_count``), and the next compile
  crashed.
  """
  yield
  jax.clear_caches()
