"""memlm's anchor forward against the independent numpy reference (tests/reference.py).

Each case is a small float32 config with random (not initial) parameters: norm gains, biases and the
zero-initialised memory arrays are perturbed so every term of the block contributes, rows pack several
documents (positions restart per document, padding at the end). The logits must match the float64
reference to ~1e-4 of their scale. Each case also lists the options it must be sensitive to: the
reference with that option ignored must differ by far more than the tolerance, so a product that
silently ignored (or mis-implemented in the same way) the option could not pass.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest
from helpers import random_memory, small_config
from reference import forward, hyperparameters, reference_logits

from memlm.model.functional import AnchorFunctional

B, T = 2, 16
RTOL = 1e-4  # of the largest |logit|
SENSITIVE = 10 * RTOL  # an ignored option must move the logits by at least this (relative)


@dataclasses.dataclass(frozen=True)
class Case:
    id: str
    memory: str = "none"
    model: dict = dataclasses.field(default_factory=dict)
    placement: tuple[str, int] = ("all", 0)
    mem_scale: float = 0.2
    generic: bool = False  # row 0 reads a generic block, row 1 its own fetched one
    # label -> hyperparameter changes that ignore one option (applied to the reference only)
    sensitive: dict = dataclasses.field(default_factory=dict)


def _tiled_qk_gains(hp, params):
    """Per-head QK-norm gains tiled over all heads, for the reference run with scope 'full'."""
    p = dict(params)
    p["q_norm"] = np.tile(p["q_norm"], (1, hp["n_heads"]))
    p["k_norm"] = np.tile(p["k_norm"], (1, hp["n_kv_heads"]))
    return p


CASES = [
    Case("openlm", model=dict(norm="layernorm"),
         sensitive={"layernorm mean": dict(norm="rmsnorm"), "qk_norm": dict(qk_norm=False)}),
    Case("openlm-ffn-tied", "ffn", model=dict(tied_embeddings=True),
         sensitive={"memory": dict(memory_type="none"), "layernorm mean": dict(norm="rmsnorm")}),
    Case("ffn-late-gelu", "ffn", model=dict(ffn_activation="gelu", n_layers=4), placement=("late", 2),
         sensitive={"memory": dict(memory_type="none"), "placement": dict(memory_layers=(0, 2)),
                    "activation": dict(ffn_activation="gelu_tanh")}),
    Case("gemma-lora_ffn", "lora_ffn",
         model=dict(norm="rmsnorm", norm_offset=True, qk_norm_scope="head", embed_scale=True,
                    ffn_activation="gelu_tanh", post_norms=True, sliding_window=3, local_layers=(0, 2),
                    rope_local_base=10_000.0, query_pre_attn_scalar=16.0, attn_softcap=2.0, final_softcap=0.5,
                    tied_embeddings=True, n_kv_heads=2),
         sensitive={"rmsnorm": dict(norm="layernorm"), "norm_offset": dict(norm_offset=False),
                    "qk head scope": dict(qk_norm_scope="full"), "embed_scale": dict(embed_scale=False),
                    "gelu_tanh": dict(ffn_activation="silu"), "post_norms": dict(post_norms=False),
                    "window": dict(sliding_window=1000), "local rope": dict(rope_local_base=0.0),
                    "local layers": dict(local_layers=()), "query_pre_attn_scalar": dict(query_pre_attn_scalar=0.0),
                    "attn_softcap": dict(attn_softcap=0.0), "final_softcap": dict(final_softcap=0.0),
                    "memory": dict(memory_type="none"), "lora alpha": dict(lora_alpha=1.0)}),
    Case("qwen2-lora_qk", "lora_qk",
         model=dict(norm="rmsnorm", qkv_bias=True, qk_norm=False, n_kv_heads=2, rope_scaling="linear",
                    rope_scaling_factor=4.0),
         sensitive={"qkv_bias": dict(qkv_bias=False), "linear rope": dict(rope_scaling="none"),
                    "memory": dict(memory_type="none"), "lora alpha": dict(lora_alpha=1.0)}),
    Case("llama3-kv", "kv",
         model=dict(norm="rmsnorm", qk_norm_scope="head", n_kv_heads=1, rope_scaling="llama3",
                    rope_scaling_factor=8.0, rope_original_max_len=256),
         mem_scale=0.5,
         sensitive={"llama3 rope": dict(rope_scaling="none"), "llama3 band": dict(rope_scaling="linear"),
                    "qk head scope": dict(qk_norm_scope="full"), "rmsnorm": dict(norm="layernorm"),
                    "memory": dict(memory_type="none")}),
    Case("openlm-kv", "kv", model=dict(query_pre_attn_scalar=32.0), mem_scale=0.5,
         sensitive={"memory": dict(memory_type="none"), "layernorm mean": dict(norm="rmsnorm")}),
    Case("lora_ov-middle", "lora_ov", model=dict(n_kv_heads=2), placement=("middle", 1),
         sensitive={"memory": dict(memory_type="none"), "lora alpha": dict(lora_alpha=1.0),
                    "layernorm mean": dict(norm="rmsnorm")}),
    Case("generic-ffn", "ffn", generic=True,
         sensitive={"memory": dict(memory_type="none"), "layernorm mean": dict(norm="rmsnorm")}),
]


def _config(case: Case):
    cfg = small_config(case.memory, sizes=(4, 4), init_std=0.1, **case.model)
    placement, layers = case.placement
    cfg.memory.placement = placement
    if layers:
        cfg.memory.placement_layers = layers
    return cfg


def _perturbed(params: dict, key: jax.Array) -> dict:
    """Initial parameters with norm gains and biases moved off their initial ones and zeros."""
    out = {}
    for i, (name, value) in enumerate(sorted(params.items())):
        value = np.asarray(value, np.float32)
        noise = np.asarray(jax.random.normal(jax.random.fold_in(key, i), value.shape), np.float32)
        if name.endswith("norm"):
            value = value + 0.3 * noise  # ones (or zero offsets) -> around them
        elif name in ("bq", "bk", "bv"):
            value = 0.3 * noise
        out[name] = value
    return out


def _packed_batch(rng: np.random.Generator):
    """Row 0: documents of 6 and 7 tokens then 3 padding tokens; row 1: documents of 10 and 6 tokens."""
    tokens = rng.integers(1, 128, size=(B, T)).astype(np.int32)
    lengths = [(6, 7), (10, 6)]
    seg = np.zeros((B, T), np.int32)
    pos = np.zeros((B, T), np.int32)
    for r, docs in enumerate(lengths):
        i = 0
        for d, n in enumerate(docs, start=1):
            seg[r, i:i + n] = d
            pos[r, i:i + n] = np.arange(n)
            i += n
    return tokens, seg, pos


def _memory(case: Case, cfg, key: jax.Array):
    if case.memory == "none":
        return None
    fetched = random_memory(cfg, B, key, at_init=False, scale=case.mem_scale)
    fetched = {n: np.asarray(v) for n, v in fetched.items()}
    if case.generic:  # one generic block for the sequences that read it, the fetched blocks for the others
        generic = random_memory(cfg, 1, jax.random.fold_in(key, 99), at_init=False, scale=case.mem_scale)
        use_generic = np.array([True, False])
        fetched = {n: np.where(use_generic.reshape((B,) + (1,) * (v.ndim - 1)), np.asarray(generic[n]), v)
                   for n, v in fetched.items()}
    return fetched


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_logits_match_reference(case: Case):
    cfg = _config(case)
    f = AnchorFunctional(cfg)
    key = jax.random.key(0)
    params = _perturbed(f.init(key), jax.random.fold_in(key, 1))
    tokens, seg, pos = _packed_batch(np.random.default_rng(0))
    memory = _memory(case, cfg, jax.random.fold_in(key, 2))

    got = np.asarray(jax.jit(lambda p, m: f.apply(p, tokens, seg, pos, memory=m))(params, memory))
    want = reference_logits(cfg, params, tokens, seg, pos, memory)
    assert got.shape == want.shape == (B, T, cfg.model.vocab_size)
    scale = np.abs(want).max()
    err = np.abs(got - want).max() / scale
    assert err < RTOL, f"memlm differs from the numpy reference by {err:.2e} of the logit scale"

    if case.generic:  # the generic row is the same forward as a batch of that block alone
        one = {n: v[:1] for n, v in memory.items()}
        alone = reference_logits(cfg, params, tokens[:1], seg[:1], pos[:1], one)
        np.testing.assert_allclose(want[:1], alone, rtol=0, atol=1e-12 * scale)

    hp = hyperparameters(cfg)
    alternatives = {"packed documents": (hp, params, None, pos), "per-document positions": (hp, params, seg, None)}
    for label, change in case.sensitive.items():
        alt_params = params
        if change.get("qk_norm_scope") == "full" and hp["qk_norm_scope"] == "head":
            alt_params = _tiled_qk_gains(hp, params)
        alternatives[label] = (dict(hp, **change), alt_params, seg, pos)
    for label, (alt_hp, alt_params, alt_seg, alt_pos) in alternatives.items():
        alt = forward(alt_hp, alt_params, tokens, alt_seg, alt_pos, memory)
        moved = np.abs(alt - want).max() / scale
        assert moved > SENSITIVE, f"ignoring {label!r} moves the reference only by {moved:.2e}: not exercised"
