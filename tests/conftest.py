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
