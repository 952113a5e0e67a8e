"""The anchor transformer: exact parameter counts, memory adapters, masks, sharding, KV cache."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import random_memory, small_config

from memlm.config import load_config
from memlm.model import init_cache
from memlm.model.accounting import accounting
from memlm.model.functional import AnchorFunctional
from memlm.model.layers import attention_explicit, attention_xla, document_mask
from memlm.sharding import make_mesh

PAPER_COUNTS = {
    "paper_160m": 163_510_016,
    "paper_410m": 411_665_408,
    "paper_1b4": 1_439_893_504,
    "ratio_260m": 257_475_584,
    "ratio_320m": 321_721_344,
    "ratio_350m": 347_419_648,
    "ratio_370m": 373_117_952,
    "ratio_385m": 385_967_104,
    "ratio_410m": 411_665_408,
    "paper_a1": 163_510_016,
    "paper_a4": 163_510_016,
    "paper_b1": 411_665_408,
    "paper_b3": 411_665_408,
    "paper_c1": 1_439_893_504,
}


@pytest.mark.parametrize("preset,count", PAPER_COUNTS.items())
def test_anchor_parameter_counts_equal_the_papers(preset, count):
    acc = accounting(load_config(f"experiments/{preset}.py"))
    assert acc["anchor_params"] == count


@pytest.mark.parametrize("preset,blocks,fetched,bank", [
    ("paper_160m", (13_762_560, 3_440_640, 860_160), 18_063_360, 4_624_220_160),
    ("paper_410m", (37_748_736, 9_437_184, 2_359_296), 49_545_216, 12_683_575_296),
    ("paper_1b4", (113_246_208, 37_748_736, 2_359_296), 153_354_240, 21_139_292_160),
])
def test_fetched_and_bank_sizes_equal_the_papers(preset, blocks, fetched, bank):
    acc = accounting(load_config(f"experiments/{preset}.py"))
    assert tuple(lv["block_params"] for lv in acc["levels"]) == blocks
    assert acc["fetched_params"] == fetched
    assert acc["bank_params"] == bank
    # docs/paper.md 2.5: 18.06M / 4.624B, 49.5M / 12.68B, 153.4M / 21.14B
    assert round(fetched / 1e6, 1) in (18.1, 49.5, 153.4)


def _tokens(b, t, vocab, seed=0):
    return jax.random.randint(jax.random.key(seed), (b, t), 0, vocab)


def test_ffn_memory_equals_an_explicitly_widened_ffn():
    cfg = small_config("ffn", sizes=(4, 6))
    f = AnchorFunctional(cfg)
    params = f.init(jax.random.key(0))
    mem = random_memory(cfg, 1, jax.random.key(1))
    tok = _tokens(1, 16, 128)
    with_memory = f.apply(params, tok, memory=mem)

    wide_cfg = small_config("none", d_ff=64 + 10)
    wide = AnchorFunctional(wide_cfg)
    wp = dict(params)
    wp["w1"] = jnp.concatenate([params["w1"], mem["w1"][0]], axis=-1)  # [L, d, f + R]
    wp["w2"] = jnp.concatenate([params["w2"], mem["w2"][0]], axis=-1)
    wp["w3"] = jnp.concatenate([params["w3"], mem["w3"][0]], axis=-2)  # [L, f + R, d]
    widened = wide.apply(wp, tok)
    np.testing.assert_allclose(with_memory, widened, rtol=2e-5, atol=2e-5)
    assert not np.allclose(with_memory, f.apply(params, tok), atol=1e-3)  # the memory did something


@pytest.mark.parametrize("kind", ["ffn", "lora_qk", "lora_ov", "lora_ffn", "kv"])
def test_every_memory_type_is_zero_at_init_and_gets_gradients(kind):
    cfg = small_config(kind, sizes=(4, 4))
    f = AnchorFunctional(cfg)
    params = f.init(jax.random.key(0))
    tok = _tokens(2, 12, 128)
    mem0 = random_memory(cfg, 2, jax.random.key(2), at_init=True)
    np.testing.assert_allclose(f.apply(params, tok, memory=mem0), f.apply(params, tok), atol=1e-6)

    def loss(m):
        return jnp.mean(f.apply(params, tok, memory=m) ** 2)

    grads = jax.grad(loss)(mem0)
    # The zero-initialised arrays (FFN w3, LoRA B, KV values) receive gradients at step 0.
    zero_init = [n for n, v in mem0.items() if not np.any(v)]
    assert zero_init
    for n in zero_init:
        assert np.abs(np.asarray(grads[n])).max() > 0, n
    # Once trained away from zero, every memory array changes the logits.
    mem = random_memory(cfg, 2, jax.random.key(3))
    assert not np.allclose(f.apply(params, tok, memory=mem), f.apply(params, tok), atol=1e-4)


def test_memory_placement_late_changes_only_late_layers():
    cfg = small_config("ffn", sizes=(4, 4))
    cfg.memory.update(placement="late", placement_layers=1)
    f = AnchorFunctional(cfg)
    assert f.spec.memory_layers == (2, 3)
    mem = random_memory(cfg, 1, jax.random.key(1))
    assert mem["w1"].shape[1] == 1  # one memory layer
    params = f.init(jax.random.key(0))
    tok = _tokens(1, 8, 128)
    # Equivalent: the same memory on all layers, zero on the first two.
    full_cfg = small_config("ffn", sizes=(4, 4))
    full = AnchorFunctional(full_cfg)
    pad = {n: jnp.concatenate([jnp.zeros_like(v).repeat(2, axis=1), v], axis=1) for n, v in mem.items()}
    np.testing.assert_allclose(f.apply(params, tok, memory=mem), full.apply(params, tok, memory=pad), atol=1e-5)


def test_document_masked_forward_equals_each_document_alone():
    cfg = small_config("ffn")
    f = AnchorFunctional(cfg)
    params = f.init(jax.random.key(0))
    lengths = [5, 9, 7]
    docs = [_tokens(1, n, 128, seed=i) for i, n in enumerate(lengths)]
    tok = jnp.concatenate(docs, axis=1)
    seg = jnp.concatenate([jnp.full((1, n), i + 1) for i, n in enumerate(lengths)], axis=1)
    pos = jnp.concatenate([jnp.arange(n)[None] for n in lengths], axis=1)
    mem = random_memory(cfg, 1, jax.random.key(5))
    packed = f.apply(params, tok, seg, pos, memory=mem)
    start = 0
    for d, n in zip(docs, lengths, strict=True):
        alone = f.apply(params, d, memory=mem)
        np.testing.assert_allclose(packed[:, start:start + n], alone, rtol=1e-5, atol=1e-5)
        start += n


@pytest.mark.parametrize("kv_heads", [4, 2])
def test_fast_attention_path_equals_the_xla_fallback(kv_heads):
    b, t, h, dh = 2, 10, 4, 8
    ks = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(ks[0], (b, t, h, dh))
    k = jax.random.normal(ks[1], (b, t, kv_heads, dh))
    v = jax.random.normal(ks[2], (b, t, kv_heads, dh))
    seg = jnp.array([[1] * 4 + [2] * 6, [1] * 10])
    idx = jnp.broadcast_to(jnp.arange(t), (b, t))
    mask = document_mask(seg, seg, idx, idx)
    fast = attention_xla(q, k, v, mask)
    np.testing.assert_allclose(attention_explicit(q, k, v, mask), fast, rtol=1e-5, atol=1e-5)
    # And against plain numpy for one head.
    qn, kn, vn = (np.asarray(a, np.float64) for a in (q, k, v))
    s = qn[0, :, 0] @ kn[0, :, 0].T / np.sqrt(dh)
    s = np.where(np.asarray(mask[0, 0]), s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    np.testing.assert_allclose(np.asarray(fast)[0, :, 0], p @ vn[0, :, 0], rtol=1e-4, atol=1e-5)


def test_grouped_query_attention_and_rmsnorm_options_run():
    cfg = small_config("ffn", n_kv_heads=2, norm="rmsnorm", qk_norm=False, tied_embeddings=True)
    f = AnchorFunctional(cfg)
    assert f.shapes["wk"].shape == (3, 32, 2, 8) and "q_norm" not in f.shapes and "head" not in f.shapes
    out = f.apply(f.init(jax.random.key(0)), _tokens(2, 8, 128))
    assert out.shape == (2, 8, 128) and np.isfinite(out).all()


def test_sharded_forward_on_8_devices_matches_one_device():
    cfg = small_config("ffn", sizes=(4, 4))
    f = AnchorFunctional(cfg)
    params = f.init(jax.random.key(0))
    tok = _tokens(8, 16, 128)
    mem = random_memory(cfg, 8, jax.random.key(1))
    ref = jax.jit(lambda p, t, m: f.apply(p, t, memory=m))(params, tok, mem)
    mesh = make_mesh((4, 1, 2))
    shard = f.shardings(mesh)
    assert shard["w1"].spec == jax.P(None, None, "tensor")
    p_sh = jax.device_put(params, shard)
    data = jax.NamedSharding(mesh, jax.P(("data", "fsdp")))
    with jax.set_mesh(mesh):
        out = jax.jit(lambda p, t, m: f.apply(p, t, memory=m))(p_sh, jax.device_put(tok, data),
                                                               jax.device_put(mem, data))
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)


def test_kv_cache_decoding_equals_the_full_forward():
    cfg = small_config("kv", sizes=(4, 4))
    f = AnchorFunctional(cfg)
    params = f.init(jax.random.key(0))
    mem = random_memory(cfg, 2, jax.random.key(1))
    tok = _tokens(2, 12, 128)
    full = f.apply(params, tok, memory=mem)
    cache = init_cache(f.spec, 2, 16, dtype="float32")
    logits, cache = f.apply(params, tok[:, :7], memory=mem, cache=cache)
    steps = [logits]
    for i in range(7, 12):
        pos = jnp.full((2, 1), i, jnp.int32)
        logits, cache = f.apply(params, tok[:, i:i + 1], positions=pos, memory=mem, cache=cache)
        steps.append(logits)
    np.testing.assert_allclose(jnp.concatenate(steps, axis=1), full, rtol=1e-4, atol=1e-4)
    assert list(cache["lengths"]) == [12, 12]


@pytest.mark.parametrize("kind", ["ffn", "lora_ov", "kv"])
def test_slot_memory_equals_the_per_sequence_fetched_memory(kind):
    """Slots gathered per layer inside the scan give the same logits and the same (slot-summed)
    gradients as the per-sequence FetchedMemory; generic rows included."""
    from memlm.memspec import SlotMemory, block_arrays

    cfg = small_config(kind, sizes=(4, 2))
    f = AnchorFunctional(cfg)
    params = f.init(jax.random.key(0))
    b, t, groups = 6, 16, 2
    tokens = jax.random.randint(jax.random.key(1), (b, t), 0, cfg.model.vocab_size)
    arrays = block_arrays(cfg)
    key = jax.random.key(2)
    n_slots = (2, 3)
    levels, index = [], []
    for lv, (r, s) in enumerate(zip((4, 2), n_slots, strict=True)):
        levels.append({a.name: 0.3 * jax.random.normal(jax.random.fold_in(key, 10 * lv + i), (groups, s, *a.shape(r)))
                       for i, a in enumerate(arrays)})
        index.append(jax.random.randint(jax.random.fold_in(key, 99 + lv), (groups, b // groups), 0, s))
    generic = {a.name: 0.3 * jax.random.normal(jax.random.fold_in(key, 50 + i), (groups, *a.shape(6)))
               for i, a in enumerate(arrays)}
    group = np.arange(b) // (b // groups)
    use_generic = jnp.array([False, True, False, False, False, True])

    def per_sequence(levels, generic):
        out = {}
        for a in arrays:
            parts = [np.asarray(lv[a.name])[np.arange(groups)[:, None], np.asarray(ix)].reshape(b, *a.shape(r))
                     for lv, ix, r in zip(levels, index, (4, 2), strict=True)]
            x = jnp.concatenate(parts, axis=a.rank_axis + 1)
            out[a.name] = jnp.where(use_generic.reshape((-1,) + (1,) * (x.ndim - 1)), generic[a.name][group], x)
        return out

    def loss_slots(levels, generic):
        return jnp.sum(f.apply(params, tokens, memory=SlotMemory(tuple(levels), tuple(index), generic, use_generic))
                       ** 2) * 1e-3

    def loss_dense(levels, generic):
        mem = {}
        for a in arrays:
            parts = [jax.vmap(lambda s_, i_: s_[i_])(lv[a.name], ix).reshape(b, *a.shape(r))
                     for lv, ix, r in zip(levels, index, (4, 2), strict=True)]
            x = jnp.concatenate(parts, axis=a.rank_axis + 1)
            mem[a.name] = jnp.where(use_generic.reshape((-1,) + (1,) * (x.ndim - 1)), generic[a.name][group], x)
        return jnp.sum(f.apply(params, tokens, memory=mem) ** 2) * 1e-3

    want = f.apply(params, tokens, memory=per_sequence(levels, generic))
    got = f.apply(params, tokens, memory=SlotMemory(tuple(levels), tuple(index), generic, use_generic))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    g_slots = jax.grad(loss_slots, argnums=(0, 1))(levels, generic)
    g_dense = jax.grad(loss_dense, argnums=(0, 1))(levels, generic)
    for x, y in zip(jax.tree.leaves(g_slots), jax.tree.leaves(g_dense), strict=True):
        np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-6)
    assert any(float(jnp.abs(x).max()) > 0 for x in jax.tree.leaves(g_slots[0]))


def test_hidden_states_projected_equal_the_logits():
    cfg = small_config("ffn", sizes=(4, 4))
    f = AnchorFunctional(cfg)
    params = f.init(jax.random.key(0))
    tokens = jax.random.randint(jax.random.key(1), (2, 8), 0, cfg.model.vocab_size)
    hidden = f.apply(params, tokens, return_hidden=True)
    assert hidden.shape == (2, 8, cfg.model.d_model)
    np.testing.assert_allclose(f.project(params, hidden), f.apply(params, tokens), rtol=1e-6, atol=1e-6)


def test_bfloat16_rope_and_gate_round_once_from_float32():
    """RoPE and the FFN gate compute in float32 and round to bfloat16 once (not after every op)."""
    from memlm.model.layers import gate, rope, rope_tables

    x = jax.random.normal(jax.random.key(0), (2, 6, 3, 8), jnp.bfloat16)
    tables = rope_tables(jnp.broadcast_to(jnp.arange(6), (2, 6)), 8, 10_000.0)
    cos, sin = (np.asarray(a, np.float64) for a in tables)
    xn = np.asarray(x, np.float64)
    want = np.concatenate([xn[..., :4] * cos - xn[..., 4:] * sin, xn[..., 4:] * cos + xn[..., :4] * sin], -1)
    got = rope(x, tables)
    assert got.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(got), np.asarray(jnp.asarray(want, jnp.float32).astype(jnp.bfloat16)))
    g, u = (jax.random.normal(k, (64,), jnp.bfloat16) for k in jax.random.split(jax.random.key(1)))
    gn, un = np.asarray(g, np.float64), np.asarray(u, np.float64)
    want = gn / (1 + np.exp(-gn)) * un
    np.testing.assert_array_equal(np.asarray(gate(g, u)),
                                  np.asarray(jnp.asarray(want, jnp.float32).astype(jnp.bfloat16)))


def test_bfloat16_score_gradients_stay_bfloat16_matmuls():
    """Float32 scores from bfloat16 operands: the backward contractions take bfloat16 inputs, not
    a float32 cotangent promoting the other operand, and no dot carries an algorithm (XLA:CPU runs
    those outside its fast kernels)."""
    import re

    from memlm.model.layers import mixed_einsum

    a, b = (jax.random.normal(k, (2, 16, 8), jnp.bfloat16) for k in jax.random.split(jax.random.key(2)))
    loss = lambda a, b: jnp.sum(jnp.sin(mixed_einsum("xtd,xsd->xts", a, b)))
    hlo = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(a, b).as_text()
    dots = re.findall(r"stablehlo.dot_general.*?: \((tensor<[^>]*>), (tensor<[^>]*>)\) -> (tensor<[^>]*>)", hlo)
    assert len(dots) == 3, dots  # forward and two backward contractions
    assert all(x.endswith("bf16>") and y.endswith("bf16>") for x, y, _ in dots), dots
    assert dots[0][2].endswith("f32>")  # float32 scores
    assert "algorithm" not in hlo
    ga, gb = jax.grad(loss, argnums=(0, 1))(a, b)
    ra, rb = jax.grad(loss, argnums=(0, 1))(a.astype(jnp.float32), b.astype(jnp.float32))
    np.testing.assert_allclose(np.asarray(ga, np.float32), ra, rtol=0.05, atol=0.15)
    np.testing.assert_allclose(np.asarray(gb, np.float32), rb, rtol=0.05, atol=0.15)
