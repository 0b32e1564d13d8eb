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


# The slowest checks of the default run on a 2-core CPU (10-100 s each), run
# with ``-m slow``. Each one has a faster sibling that stays in the default
# run: another parametrisation of the same test, or a smaller test of the
# same path (the 8-device run: tests/multidevice through ``-m slow``).
_SLOW_CHECKS = frozenset({
    "tests/test_multidevice.py::test_eight_cpu_devices",
    "tests/test_blocks.py::test_blocks_equal_dense_reference[merge-fne-identity-0.3]",
    "tests/test_blocks.py::test_alignments_share_params_but_not_updates",
    "tests/test_kronecker.py::test_fast_path_equals_dense_reference[mlp-gr-ekfac-3]",
    "tests/test_kronecker.py::test_fast_path_equals_dense_reference[parallel-gr-kfac-3]",
    "tests/test_kronecker.py::test_fast_path_equals_dense_reference[mlp-fne-kfac-1]",
    "tests/test_kronecker.py::test_shared_statistics_fast_path_equals_dense_reference[kfac]",
    "tests/test_readme_and_examples.py::test_games_alignment_snippet",
    "tests/test_readme_and_examples.py::test_games_traced_function_snippet",
    "tests/test_readme_and_examples.py::test_games_fictitious_players_snippet",
    "tests/test_readme_and_examples.py::test_lr_ablation_experiment_writes_table",
    "tests/test_large_steps.py::test_projected_factor_matches_the_dense_reference",
    "tests/test_large_steps.py::test_fne_does_not_diverge_where_sgd_does_not[8]",
    "tests/test_large_steps.py::test_no_loss_spikes_at_large_kfac_steps",
    "tests/test_main_job.py::test_sigterm_then_the_same_command_gives_the_uninterrupted_record",
    "tests/test_coupling_forms.py::test_feedback_from_gradients_matches_reference[fne-identity-0.5]",
    "tests/test_coupling_forms.py::test_the_gradient_route_is_taken_where_it_pays",
    "tests/test_coupling_forms.py::test_matvec_from_gradients_equals_the_stage_products[gr-ekfac-1.0]",
    "tests/test_coupling_forms.py::test_dense_kronecker_players_without_tikhonov_match_reference[fne-kfac]",
    "tests/test_group_rational.py::test_gr_equals_dense_reference[identity-0.3-True]",
    "tests/test_group_rational.py::test_single_player_stages_gr_is_fne_step_for_step[identity-0.3]",
    "tests/test_group_rational.py::test_single_player_stages_gr_is_fne_step_for_step[rmsprop-0.001]",
    "tests/test_alignment.py::test_per_alignment_states_when_the_stages_differ",
    "tests/test_from_flax.py::test_updates_equal_hand_written_game[residual-gr-identity]",
    "tests/test_benchmark_scripts.py::test_resnet18_throughput_writes_its_record",
    "tests/test_model_zoo.py::test_steps_equal_dense_reference[plain_mlp-gr-kfac]",
    "tests/test_model_zoo.py::test_steps_equal_dense_reference[compact_mlp-gr-rmsprop]",
    "tests/test_model_zoo.py::test_steps_equal_dense_reference[compact_cnn-fne-identity]",
    "tests/test_model_zoo.py::test_steps_equal_dense_reference[setup_mlp-gr-identity]",
    "tests/test_model_zoo.py::test_steps_equal_dense_reference[setup_projection-gr-identity]",
    "tests/test_model_zoo.py::test_steps_equal_dense_reference[attention-gr-identity]",
    "tests/test_traced_games.py::test_token_rows_are_kronecker_players_equal_to_the_reference[fne-ekfac]",
    "tests/test_dropout.py::test_steps_equal_dense_reference[fne-identity]",
    "tests/test_model_zoo.py::test_steps_equal_dense_reference[setup_mlp-fne-kfac]",
    "tests/test_model_zoo.py::test_steps_equal_dense_reference[compact_mlp-fne-adam]",
    "tests/test_model_zoo.py::test_steps_equal_dense_reference[batch_norm_mlp-gr-identity]",
    "tests/test_group_rational.py::test_single_player_stages_gr_is_fne_step_for_step[adam-0.001]",
    "tests/test_benchmark_scripts.py::test_batch_scaling_takes_a_device_and_writes_its_record",
    "tests/test_experiment_runs.py::test_table4_script",
    "tests/test_reference_equivalence.py::test_relu_cnn[dense-0.5-5]",
})


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
  """Marks the checks in ``_SLOW_CHECKS`` slow, before ``-m`` selects."""
  for item in items:
    if item.nodeid in _SLOW_CHECKS:
      item.add_marker(pytest.mark.slow)
