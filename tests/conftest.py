"""Test configuration: float64 so that fast paths can be compared at 1e-8.

The test programs are small and mostly compiled once: XLA's CPU backend
optimisation is switched off (``DGNOPT_TEST_XLA_OPT=1`` keeps it), which cuts
the suite's time by about a third. Subprocesses (examples, the 8-device run)
inherit the setting. The setting is meant for the CPU: on a GPU, set
``DGNOPT_TEST_XLA_OPT=1`` to keep the GPU backend at XLA's default
(``benchmarks/gpu_check.sh`` does). The header of a run names the backend
the tests run on.
"""

import os

if os.environ.get("DGNOPT_TEST_XLA_OPT") != "1" and \
    "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             " --xla_backend_optimization_level=0").strip()

import jax  # noqa: E402  (after XLA_FLAGS)

jax.config.update("jax_enable_x64", True)


import pytest  # noqa: E402


def pytest_report_header(config):
  """Names the backend and devices, so that a run's log shows where the tests ran."""
  return f"jax {jax.__version__}, default backend {jax.default_backend()}: {jax.devices()}"


# Linux's default ``vm.max_map_count`` is 65530; clearing well below it keeps
# compiled programs shared between tests for as long as that is safe.
_MAX_MAPPINGS = 30000


def _mapping_count() -> int:
  try:
    with open("/proc/self/maps", "rb") as maps:
      return sum(1 for _ in maps)
  except OSError:  # not Linux: no such limit to guard
    return 0


@pytest.fixture(autouse=True)
def _release_compiled_programs():
  """Drops JAX's compiled programs once the process holds many mappings.

  Each program XLA compiles for the CPU keeps its code in memory mappings of
  its own; one process running the slow tests of a module accumulated over
  65530 of them (Linux's default ``vm.max_map_count``), and the next compile
  crashed. Clearing after every test would also avoid that, but tests that
  share programs would then compile them again.
  """
  yield
  if _mapping_count() > _MAX_MAPPINGS:
    jax.clear_caches()
