import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from tiny import build_model  # noqa: E402

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return {arch: build_model(arch, root / arch) for arch in ("llama", "qwen2", "llama3", "gemma3")}


@pytest.fixture(scope="session")
def tiny_bundles(tiny_models, tmp_path_factory):
    """Exact LoRA bundles (--lars-basis none) of the tiny models."""
    from lars_export import ExportConfig, export

    root = tmp_path_factory.mktemp("bundles")
    return {arch: export(ExportConfig(model=str(path), out=str(root / arch), lora_rank=4, lora_alpha=8,
                                      lars_basis="none"))
            for arch, path in tiny_models.items() if arch in ("llama", "qwen2")}


# The fast tier (`make test-fast`, `pytest -m "not slow"`): every test but these, which each took more than ~2 s
# on this 2-core machine (`pytest --durations=0`: exports of the real SmolLM2, PyTorch + PEFT references, ORT
# training-build children, subprocess runs of the tools). `make test` (CI) runs them all. A file, or file::test
# (all its parametrizations). Kept in the fast tier although near 3 s: the basis' subspace tests (the method's core)
# and test_runtime_without_torch (the runtime's promise).
SLOW = (
    # each lowering rule's comparison with the ORT training kernel runs onnxruntime-training in a child (~4 s)
    "export/lowering/concat_training_test.py::test_concat_training_matches_kernel",
    "export/lowering/fused_matmul_test.py::test_strict_matches_kernel",
    "export/lowering/in_place_accumulator_test.py::test_gradients_become_outputs",
    "export/lowering/quick_gelu_grad_test.py::test_quick_gelu_grad_matches_training_kernel",
    "export/lowering/quick_gelu_test.py::test_quick_gelu_strict_matches_kernel",
    "export/lowering/sigmoid_grad_test.py::test_sigmoid_grad_matches_training_kernel",
    "export/lowering/simplified_layer_norm_grad_test.py::test_simplified_layer_norm_grad_matches_kernel",
    "export/lowering/simplified_layer_norm_test.py::test_strict_matches_kernel",
    "export/lowering/slice_grad_test.py::test_slice_grad_matches_kernel",
    "export/lowering/softmax_cross_entropy_loss_grad_test.py::test_softmax_cross_entropy_loss_grad_matches_kernel",
    "export/lowering/softmax_cross_entropy_loss_test.py::test_softmax_cross_entropy_loss_matches_kernel",
    "export/lowering/softmax_grad_test.py::test_softmax_grad_matches_training_kernel",
    "export/lowering/split_training_test.py::test_split_training_matches_kernel",
    "export/lowering/tanh_grad_test.py::test_tanh_grad_matches_training_kernel",
    "export/lowering/lower_test.py",
    "export/passes/attention_chunks_test.py",
    "export/passes/attention_recompute_test.py",
    "export/passes/cheap_recompute_test.py::test_recomputed_activation_and_repeated_kv_give_autograd_gradients",
    "export/passes/chunked_loss_test.py::test_chunked_loss_and_gradients_equal_autograd",
    "export/passes/chunked_loss_test.py::test_no_vocabulary_sized_tensor_is_saved_for_the_backward",
    "export/passes/dequantize_at_use_test.py",
    "export/passes/dequantize_in_slices_test.py::test_output_projection_is_dequantized_one_slice_at_a_time",
    "export/passes/dequantize_in_slices_test.py::test_small_matrices_stay_whole",
    "export/passes/lars_projection_test.py",
    "export/passes/layer_recompute_test.py",
    "export/passes/quantize_frozen_test.py",
    "tests/test_allocator.py::test_the_arena_is_handed_back_after_every_step",
    "tests/test_allocator.py::test_exact_arena_regions_leave_no_untouched_tail",
    "tests/test_backends.py",
    "tests/test_cli_and_bad_input.py::test_export_budget_errors_name_the_problem",
    "tests/test_cli_and_bad_input.py::test_export_errors_name_the_problem",
    "tests/test_cli_and_bad_input.py::test_train_eval_export_adapter_through_the_cli",
    "tests/test_export_weights.py",
    "tests/test_federated.py::test_a_simulated_federation_averages_by_tokens_and_leaves_a_poisoned_update_out",
    "tests/test_federated.py::test_the_demo_runs_a_tls_federation_on_loopback",
    "tests/test_federated.py::test_a_federation_where_every_device_fails_is_an_error_that_names_the_cause",
    "tests/test_federated.py::test_secure_aggregation_gives_the_token_weighted_mean",
    "tests/test_federated.py::test_differential_privacy_clips_each_update_and_adds_noise_of_the_stated_scale",
    "tests/test_federated.py::test_a_killed_client_is_left_out_and_rejoins_where_its_data_stopped",
    "tests/test_fuzz_run_state.py",
    "tests/test_lars.py::test_full_rank_lars_reproduces_exact_lora_gradients",
    "tests/test_memory_model.py",
    "tests/test_numerics.py::test_every_adapter_tensor_is_its_own_trainable_parameter",
    "tests/test_numerics.py::test_other_families_with_the_default_passes_match_peft",
    "tests/test_numerics.py::test_the_lowest_memory_exact_stack_matches_peft",
    "tests/test_ort_checkpoint.py",
    "tests/test_platforms.py",
    "tests/test_preflight.py",
    "tests/test_quantized_weights.py",
    "tests/test_run_directory.py::test_a_signal_finishes_the_step_saves_and_resumes_bit_identical",
    "tests/test_run_directory.py::test_sigkill_at_any_moment_resumes_bit_identical_without_duplicate_metrics",
    "tests/test_smollm2_e2e.py",
    "tests/test_tools.py::test_alloc_trace_finds_the_peak_and_what_is_alive_there",
    "tests/test_tools.py::test_bench_allocator_runs_each_setting_in_its_own_process",
    "tests/test_tools.py::test_bench_basis_times_both_solvers_on_the_same_activations",
    "tests/test_tools.py::test_bench_data_memory_on_small_files",
    "tests/test_tools.py::test_bench_export_on_a_tiny_model",
    "tests/test_tools.py::test_bench_memory_on_a_tiny_model",
    "tests/test_tools.py::test_bench_memory_measures_one_cold_step_and_the_validator_reads_exact_regions",
    "tests/test_tools.py::test_bench_memory_runs_a_baseline_bundle_beside_this_exporters",
    "tests/test_tools.py::test_bench_quality_on_a_tiny_model",
    "tests/test_tools.py::test_chaos_kills_damages_resumes_and_compares_bit_for_bit",
    "tests/test_tools.py::test_memory_breakdown_counts_what_each_pass_frees",
    "tests/test_tools.py::test_write_gguf_round_trips_through_the_exporters_gguf_loader",
    "tests/test_zo.py",
)


def pytest_collection_modifyitems(config, items):
    for item in items:
        test = item.nodeid.split("[")[0]
        if any(test == s or test.startswith(s + "::") for s in SLOW):
            item.add_marker(pytest.mark.slow)
