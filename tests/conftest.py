"""Test setup: 8 fake CPU devices for sharding tests, set before anything imports jax."""

import os

# Tests compile many small programs, each once: XLA's cheapest backend optimisation compiles them about
# 1.7x faster and runs these shapes no slower (tests/test_step.py from an empty cache: 242 s -> 144 s).
# Subprocesses that set their own device count pass the rest on through MEMLM_TEST_XLA_FLAGS.
os.environ.setdefault("MEMLM_TEST_XLA_FLAGS", "--xla_backend_optimization_level=0")
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8 " + os.environ["MEMLM_TEST_XLA_FLAGS"])
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault(
    "JAX_COMPILATION_CACHE_DIR", os.path.join(os.path.dirname(os.path.dirname(__file__)), ".cache", "jax")
)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def facts_data(tmp_path_factory):
    """A small prepared facts corpus (hash embedder, k=8, depth 2), shared by the training and eval tests."""
    from memlm.config import load_config
    from memlm.data.prepare import prepare

    cfg = load_config(os.path.join(os.path.dirname(os.path.dirname(__file__)), "experiments", "tiny.py"))
    cfg.tree.embedder = "hash"
    cfg.data.update(facts_documents=1500, tokenizer_vocab=1024)
    cfg.model.vocab_size = 1024
    out = tmp_path_factory.mktemp("facts_data")
    prepare(cfg, "facts", str(out))
    return out


# ---- the fast tier: `make test-fast` runs `-m "not slow"` ------------------------------------------
# Modules that train end to end mark themselves (``pytestmark`` or per-test ``@pytest.mark.slow``). The
# slowest cases of modules whose quick tests stay in the fast tier are named here: a test function's
# name marks all its cases, ``name[id]`` one case. A module mapped to None is slow as a whole. Any test
# that uses a fixture of SLOW_FIXTURES (directly or through another fixture) is slow too.
SLOW_TESTS: dict[str, set[str] | None] = {
    "test_eval_run.py": None,  # a module-scoped trained run behind every test
    "test_model.py": {
        "test_slot_memory_equals_the_per_sequence_fetched_memory",
        "test_document_masked_forward_equals_each_document_alone", "test_kv_cache_decoding_equals_the_full_forward",
        "test_fast_attention_path_equals_the_xla_fallback", "test_memory_placement_late_changes_only_late_layers",
        "test_grouped_query_attention_and_rmsnorm_options_run", "test_sharded_forward_on_8_devices_matches_one_device",
        *(f"test_every_memory_type_is_zero_at_init_and_gets_gradients[{k}]"
          for k in ("ffn", "lora_ffn", "kv", "lora_ov")),  # lora_qk stays fast
    },
    "test_kernels.py": {  # interpret-mode kernels; one pallas and one splash case stay fast
        "test_anchor_with_a_kernel_equals_the_xla_anchor",
        "test_kernel_equals_the_xla_path_in_values_and_gradients[pallas_gpu-4-None-0.0-0]",
        "test_kernel_equals_the_xla_path_in_values_and_gradients[splash-4-None-0.0-0]",
        "test_kernel_equals_the_xla_path_in_values_and_gradients[splash-1-0.3-0.0-0]",
        "test_kernel_equals_the_xla_path_in_values_and_gradients[splash-2-None-5.0-16]",
    },
    "test_retrieval_embed.py": {"test_minilm_matches_sentence_transformers", "test_same_text_same_vector_in_any_batch",
                                "test_minilm_sharded_over_the_data_axis_matches_one_device"},
    "test_retrieval_tree.py": {"test_tree_recovers_a_known_hierarchical_mixture",
                               "test_balancing_lowers_the_largest_leaf_share_on_skewed_data",
                               "test_duplicate_points_share_a_path_and_keep_routing_defined"},
    "test_tokenizer_template.py": {"test_saved_tokenizer_keeps_the_template_and_the_chat_template",
                                   "test_add_bos_flag_rebuilds_the_template"},
    "test_compile.py": {"test_compile_reports_memory_and_collectives_per_device",
                        "test_a_config_that_does_not_fit_exits_with_one_line"},  # 40 s on a cold compile cache
    "test_convert.py": {"test_every_family_option_at_once_scan_equals_a_layer_loop_and_the_cache"},
    "test_bank_device.py": {"test_sharded_bank_gathers_and_updates_like_a_single_device_bank"},
}


SLOW_FIXTURES = {"facts_data"}  # the prepared facts corpus: a test that needs it trains on it


def pytest_collection_modifyitems(config, items):
    for item in items:
        names = SLOW_TESTS.get(item.path.name, ())
        if (names is None or item.name in names or getattr(item, "originalname", item.name) in names
                or SLOW_FIXTURES & set(getattr(item, "fixturenames", ()))):
            item.add_marker(pytest.mark.slow)
    # Longest modules first: `-n 2` hands out tests in collection order, so a long module collected last
    # (the default order is alphabetical) runs alone on one worker while the other sits idle. A stable
    # sort keeps each module's tests together and in order, so module-scoped fixtures are built as before.
    items.sort(key=lambda item: LONGEST_FIRST.get(item.path.name, len(LONGEST_FIRST)))


# modules by their share of the suite's time on 2 cores from an empty compile cache (--durations), longest first
LONGEST_FIRST = {name: rank for rank, name in enumerate((
    "test_step.py", "test_multihost.py", "test_harness.py", "test_rundir.py", "test_eval_run.py", "test_tiers.py",
    "test_model.py", "test_prepare_engine.py", "test_prepare_interrupt.py", "test_kernels.py", "test_train.py",
    "test_edit.py", "test_convert_posthoc.py", "test_compile.py"))}
