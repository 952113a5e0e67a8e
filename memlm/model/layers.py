"""Building blocks of the anchor, as pure functions of arrays: norms, RoPE, attention with
document masks, SwiGLU. The anchor module owns the parameters; these functions own the math,
so the scanned layer, the KV-cache decoder and the tests all run the same code.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def layer_norm(x: jax.Array, gain: jax.Array, eps: float, kind: str) -> jax.Array:
    """Gain-only LayerNorm (OpenLM ``gain_only_lp_layer_norm``: no bias) or RMSNorm, in float32."""
    x32 = x.astype(jnp.float32)
    if kind == "layernorm":
        x32 = x32 - jnp.mean(x32, axis=-1, keepdims=True)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return (y * gain.astype(jnp.float32)).astype(x.dtype)


def rope_tables(positions: jax.Array, head_dim: int, base: float) -> tuple[jax.Array, jax.Array]:
    """cos and sin ``[B, T, 1, head_dim/2]`` for integer ``positions [B, T]``; computed once per call."""
    inv = 1.0 / (base ** (jnp.arange(0, head_dim // 2, dtype=jnp.float32) * 2.0 / head_dim))
    angles = positions.astype(jnp.float32)[..., None] * inv
    return jnp.cos(angles)[:, :, None, :], jnp.sin(angles)[:, :, None, :]


def rope(x: jax.Array, tables: tuple[jax.Array, jax.Array]) -> jax.Array:
    """Rotary embedding of ``x [B, T, H, dh]`` (half-split layout) with :func:`rope_tables`."""
    cos, sin = tables
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    cos, sin = cos.astype(x.dtype), sin.astype(x.dtype)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def document_mask(q_segments: jax.Array, kv_segments: jax.Array, q_positions: jax.Array,
                  kv_positions: jax.Array) -> jax.Array:
    """``[B, 1, Tq, Tk]`` boolean: causal within the same segment (packed documents never see each other).

    Causality is by sequence index: ``q_positions``/``kv_positions`` are absolute indices in the packed
    sequence (or in the KV cache), not the per-document RoPE positions.
    """
    same = q_segments[:, :, None] == kv_segments[:, None, :]
    causal = kv_positions[:, None, :] <= q_positions[:, :, None]
    return (same & causal)[:, None]


def attention_xla(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
    """Explicit masked attention: ``q [B,T,H,dh]``, ``k, v [B,S,K,dh]`` (K divides H: grouped queries)."""
    b, t, h, dh = q.shape
    kv = k.shape[2]
    qg = q.reshape(b, t, kv, h // kv, dh)
    scores = jnp.einsum("btkgd,bskd->bkgts", qg, k, preferred_element_type=jnp.float32) / jnp.sqrt(dh)
    scores = jnp.where(mask[:, :, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v)
    return out.reshape(b, t, h, dh)


def attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, impl: str) -> jax.Array:
    """Document-masked causal attention.

    ``impl``: "cudnn" routes through ``jax.nn.dot_product_attention`` (cuDNN flash attention on
    GPU, mask as an explicit boolean argument); "xla" is the explicit fallback above; "auto"
    takes cuDNN on GPU and XLA elsewhere. Both compute the same function (tested).
    """
    if impl == "auto":
        impl = "cudnn" if jax.default_backend() == "gpu" and q.dtype in (jnp.bfloat16, jnp.float16) else "xla"
    if impl == "cudnn":
        return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation="cudnn")
    return attention_xla(q, k, v, mask)


def swiglu(h: jax.Array, w1: jax.Array, w2: jax.Array, w3: jax.Array) -> jax.Array:
    """``w3 (silu(w1 h) * (w2 h))``: w1 is the gate, w2 the up projection, w3 the down projection."""
    return (jax.nn.silu(h @ w1) * (h @ w2)) @ w3
