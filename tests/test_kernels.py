"""Segment-id attention kernels (Pallas flash attention for GPU, splash attention for TPU, both in
Pallas interpret mode on CPU) against the XLA path with its dense document mask: values and gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import random_memory, small_config

from memlm.config import ConfigError, validate
from memlm.model.functional import AnchorFunctional
from memlm.model.kernels import kernel_attention
from memlm.model.layers import attention_xla, document_mask, window_mask

B, T, H, DH = 2, 128, 4, 16


def _segments() -> jnp.ndarray:
    """Packed rows: three documents then padding (segment 0), and two documents."""
    seg = np.ones((B, T), np.int32)
    seg[0, 20:] = 2
    seg[0, 61:] = 3
    seg[0, 90:] = 0
    seg[1, 33:] = 5
    return jnp.asarray(seg)


def _qkv(kv_heads: int, seed: int = 0):
    r = np.random.default_rng(seed)
    q = jnp.asarray(r.normal(size=(B, T, H, DH)), jnp.float32)
    k = jnp.asarray(r.normal(size=(B, T, kv_heads, DH)), jnp.float32)
    v = jnp.asarray(r.normal(size=(B, T, kv_heads, DH)), jnp.float32)
    return q, k, v


def _reference(q, k, v, seg, scale, softcap, window):
    idx = jnp.broadcast_to(jnp.arange(T), (B, T))
    mask = document_mask(seg, seg, idx, idx)
    if window:
        mask = window_mask(mask, idx, idx, window)
    return attention_xla(q, k, v, mask, scale, softcap)


CASES = [
    ("pallas_gpu", 4, None, 0.0, 0),
    ("pallas_gpu", 2, 0.3, 0.0, 0),  # grouped queries, explicit scale
    ("splash", 4, None, 0.0, 0),
    ("splash", 2, None, 0.0, 0),
    ("splash", 1, 0.3, 0.0, 0),  # multi-query
    ("splash", 2, None, 5.0, 16),  # soft-capped scores, sliding window
]


@pytest.mark.parametrize("impl,kv_heads,scale,softcap,window", CASES)
def test_kernel_equals_the_xla_path_in_values_and_gradients(impl, kv_heads, scale, softcap, window):
    q, k, v = _qkv(kv_heads)
    seg = _segments()
    weights = jnp.asarray(np.random.default_rng(1).normal(size=(B, T, H, DH)), jnp.float32)

    def loss(fn):
        return lambda q, k, v: jnp.sum(fn(q, k, v) * weights)

    kern = lambda q, k, v: kernel_attention(impl, q, k, v, seg, scale, softcap, window)
    ref = lambda q, k, v: _reference(q, k, v, seg, scale, softcap, window)
    np.testing.assert_allclose(kern(q, k, v), ref(q, k, v), atol=2e-5, rtol=1e-5)
    got = jax.grad(loss(kern), argnums=(0, 1, 2))(q, k, v)
    want = jax.grad(loss(ref), argnums=(0, 1, 2))(q, k, v)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g, w, atol=1e-4, rtol=1e-4)


def test_documents_do_not_see_each_other_through_a_kernel():
    """Changing one document's keys and values leaves every other document's outputs unchanged."""
    q, k, v = _qkv(2)
    seg = _segments()
    in_doc2 = (seg == 2)[:, :, None, None]
    k2 = jnp.where(in_doc2, k + 3.0, k)
    v2 = jnp.where(in_doc2, -v, v)
    for impl in ("pallas_gpu", "splash"):
        a = kernel_attention(impl, q, k, v, seg)
        b = kernel_attention(impl, q, k2, v2, seg)
        others = ~in_doc2[..., 0, 0]
        np.testing.assert_allclose(np.asarray(a)[others], np.asarray(b)[others], atol=1e-6)
        assert not np.allclose(np.asarray(a)[~others], np.asarray(b)[~others])


def _anchor(attention: str, **model):
    cfg = small_config("ffn", sizes=(4, 4), max_seq_len=T, **model)
    cfg.model.attention = attention
    cfg.data.seq_len = T
    return validate(cfg)


@pytest.mark.parametrize("impl", ["pallas_gpu", "splash"])
def test_anchor_with_a_kernel_equals_the_xla_anchor(impl):
    """The whole anchor (fetched FFN memory, a sliding-window layer scanned with the global ones)
    gives the XLA anchor's logits and parameter / memory gradients."""
    arch = dict(local_layers=(1,), sliding_window=24)
    f_ref, f_kern = AnchorFunctional(_anchor("xla", **arch)), AnchorFunctional(_anchor(impl, **arch))
    params = f_ref.init(jax.random.key(0))
    mem = random_memory(_anchor("xla", **arch), B, jax.random.key(1))
    tokens = jax.random.randint(jax.random.key(2), (B, T), 0, 128)
    seg = _segments()
    positions = jnp.asarray(np.concatenate([np.arange(T)[None]] * B), jnp.int32)

    def loss(f):
        return lambda p, m: jnp.mean(f.apply(p, tokens, seg, positions, memory=m) ** 2)

    np.testing.assert_allclose(f_kern.apply(params, tokens, seg, positions, memory=mem),
                               f_ref.apply(params, tokens, seg, positions, memory=mem), atol=1e-4, rtol=1e-4)
    got = jax.grad(loss(f_kern), argnums=(0, 1))(params, mem)
    want = jax.grad(loss(f_ref), argnums=(0, 1))(params, mem)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(g, w, atol=2e-5, rtol=2e-3)


def test_splash_anchor_builds_no_dense_mask():
    """With a segment-id kernel no [B, 1, T, T] boolean exists in the forward; the XLA path has one."""
    def dense_masks(attention):
        f = AnchorFunctional(_anchor(attention))
        params = f.init(jax.random.key(0))
        tokens = jnp.zeros((B, T), jnp.int32)
        jaxpr = jax.make_jaxpr(lambda p: f.apply(p, tokens, _segments()))(params)
        text = str(jaxpr)
        return text.count(f"bool[{B},1,{T},{T}]")

    assert dense_masks("xla") > 0
    assert dense_masks("splash") == 0


def test_splash_needs_a_sequence_length_multiple_of_128():
    with pytest.raises(ConfigError, match="multiple of 128"):
        small_config("ffn", attention="splash")
