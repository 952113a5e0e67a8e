"""Building blocks of the anchor, as pure functions of arrays: norms, RoPE, attention with
document masks and sliding windows, gated FFNs. The anchor module owns the parameters; these
functions own the math, so the scanned layer, the KV-cache decoder and the tests all run the same code.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

ACTIVATIONS = ("silu", "gelu_tanh", "gelu")


def layer_norm(x: jax.Array, gain: jax.Array, eps: float, kind: str, offset: bool = False,
               dtype: jnp.dtype | None = None) -> jax.Array:
    """Gain-only LayerNorm (OpenLM ``gain_only_lp_layer_norm``: no bias) or RMSNorm, in float32.

    ``offset``: the gain is stored as an offset from one and applied as ``(1 + gain)`` (Gemma).
    The result has ``x``'s dtype, or ``dtype`` (QK-norm hands float32 straight to RoPE).
    """
    x32 = x.astype(jnp.float32)
    if kind == "layernorm":
        x32 = x32 - jnp.mean(x32, axis=-1, keepdims=True)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    g = gain.astype(jnp.float32)
    return (y * (1.0 + g if offset else g)).astype(dtype or x.dtype)


def rope_frequencies(head_dim: int, base: float, scaling: str = "none", factor: float = 1.0,
                     low_freq_factor: float = 1.0, high_freq_factor: float = 4.0,
                     original_max_len: int = 8192) -> jax.Array:
    """Inverse frequencies ``[head_dim/2]`` (float32) of RoPE with ``base`` and an optional scaling.

    ``linear`` divides every frequency by ``factor`` (position interpolation); ``llama3`` divides
    the low frequencies (wavelength above ``original_max_len / low_freq_factor``) by ``factor``,
    keeps the high ones (wavelength below ``original_max_len / high_freq_factor``) and
    interpolates smoothly in between (Llama 3.1).
    """
    inv = 1.0 / (base ** (jnp.arange(0, head_dim // 2, dtype=jnp.float32) * 2.0 / head_dim))
    if scaling == "none":
        return inv
    if scaling == "linear":
        return inv / factor
    if scaling != "llama3":
        raise ValueError(f"unknown RoPE scaling {scaling!r}")
    low_wavelen = original_max_len / low_freq_factor
    high_wavelen = original_max_len / high_freq_factor
    wavelen = 2 * math.pi / inv
    scaled = jnp.where(wavelen > low_wavelen, inv / factor, inv)
    smooth = (original_max_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return jnp.where(medium, smoothed, scaled)


def rope_tables_from(positions: jax.Array, inv_freq: jax.Array) -> tuple[jax.Array, jax.Array]:
    """cos and sin ``[B, T, 1, head_dim/2]`` for integer ``positions [B, T]`` and inverse frequencies."""
    angles = positions.astype(jnp.float32)[..., None] * inv_freq
    return jnp.cos(angles)[:, :, None, :], jnp.sin(angles)[:, :, None, :]


def rope_tables(positions: jax.Array, head_dim: int, base: float) -> tuple[jax.Array, jax.Array]:
    """cos and sin ``[B, T, 1, head_dim/2]`` for integer ``positions [B, T]``; computed once per call."""
    return rope_tables_from(positions, rope_frequencies(head_dim, base))


def rope(x: jax.Array, tables: tuple[jax.Array, jax.Array]) -> jax.Array:
    """Rotary embedding of ``x [B, T, H, dh]`` (half-split layout) with :func:`rope_tables`.

    The rotation is computed in float32 and rounded to ``x``'s dtype once (see :func:`gate`)."""
    cos, sin = tables
    half = x.shape[-1] // 2
    x32 = x.astype(jnp.float32)
    x1, x2 = x32[..., :half], x32[..., half:]
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


def document_mask(q_segments: jax.Array, kv_segments: jax.Array, q_positions: jax.Array,
                  kv_positions: jax.Array) -> jax.Array:
    """``[B, 1, Tq, Tk]`` boolean: causal within the same segment (packed documents never see each other).

    Causality is by sequence index: ``q_positions``/``kv_positions`` are absolute indices in the packed
    sequence (or in the KV cache), not the per-document RoPE positions.
    """
    same = q_segments[:, :, None] == kv_segments[:, None, :]
    causal = kv_positions[:, None, :] <= q_positions[:, :, None]
    return (same & causal)[:, None]


def window_mask(mask: jax.Array, q_positions: jax.Array, kv_positions: jax.Array, window: int) -> jax.Array:
    """``mask`` restricted to a sliding window: a query sees the ``window`` most recent indices (itself included)."""
    near = q_positions[:, :, None] - kv_positions[:, None, :] < window
    return mask & near[:, None]


def mixed_einsum(spec: str, a: jax.Array, b: jax.Array) -> jax.Array:
    """``einsum`` with float32 output whose backward contractions stay in the operands' dtype.

    With bfloat16 (or float16) operands and only ``preferred_element_type=float32``, the transposed
    contractions of the backward pass take the float32 cotangent and promote the other operand to
    float32 (a float32 matmul, and on XLA:CPU one that misses the fast bfloat16 kernels). Here the
    cotangent is rounded to the operands' dtype once and the backward contractions are plain
    low-precision einsums (float32 accumulation inside the kernel), as a bfloat16 model computes
    them. A custom VJP rather than ``DotAlgorithmPreset.BF16_BF16_F32``: XLA:CPU runs a dot that
    carries an algorithm outside its fast kernels when an operand is transposed (the output head's
    weight gradient took 3x the time of the plain form on the 2-core AMD host, bench/RESULTS.md).
    """
    if jnp.dtype(a.dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)) or a.dtype != b.dtype:
        return jnp.einsum(spec, a, b, preferred_element_type=jnp.float32)
    return _mixed_einsum(spec, a, b)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _mixed_einsum(spec: str, a: jax.Array, b: jax.Array) -> jax.Array:
    return jnp.einsum(spec, a, b, preferred_element_type=jnp.float32)


def _mixed_einsum_fwd(spec: str, a: jax.Array, b: jax.Array):
    return _mixed_einsum(spec, a, b), (a, b)


def _mixed_einsum_bwd(spec: str, res, g: jax.Array):
    a, b = res
    _, vjp = jax.vjp(lambda x, y: jnp.einsum(spec, x, y), a, b)
    return vjp(g.astype(a.dtype))


_mixed_einsum.defvjp(_mixed_einsum_fwd, _mixed_einsum_bwd)


def attention_xla(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, scale: float | None = None,
                  softcap: float = 0.0) -> jax.Array:
    """Masked attention in plain XLA: ``q [B,T,H,dh]``, ``k, v [B,S,K,dh]`` (K divides H: grouped queries).

    ``jax.nn.dot_product_attention``'s XLA implementation (contractions on the [B, T, H, dh]
    layout, float32 scores from bfloat16 operands in both directions), or :func:`attention_explicit`
    where scores are soft-capped. On the 2-core AMD EPYC host of bench/RESULTS.md the jax form
    is ~5% faster per step than the explicit heads-major one, whose backward score contractions
    XLA:CPU runs outside its fast matmul kernels; the AMX Xeon host of 2026-12-02 favoured the
    heads-major form (1.4x), so both stay, and the faster one is a measurement, not a constant.
    """
    if softcap:
        return attention_explicit(q, k, v, mask, scale, softcap)
    return jax.nn.dot_product_attention(q, k, v, mask=mask, scale=scale, implementation="xla")


def attention_explicit(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, scale: float | None = None,
                       softcap: float = 0.0) -> jax.Array:
    """Explicit masked attention, shapes as :func:`attention_xla`.

    Scores are ``q.k / sqrt(dh)`` (or ``q.k * scale``), soft-capped to ``softcap * tanh(s / softcap)``
    when ``softcap`` is set (Gemma 2), then masked and softmaxed in float32.
    """
    b, t, h, dh = q.shape
    kv = k.shape[2]
    g = h // kv
    # Heads-major operands, so every contraction is a batched matmul whose batch axes (b, kv head)
    # lead. Grouped queries fold their group into the query axis.
    qh = q.reshape(b, t, kv, g, dh).transpose(0, 2, 3, 1, 4).reshape(b, kv, g * t, dh)
    kh, vh = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
    scores = mixed_einsum("bkud,bksd->bkus", qh, kh)
    scores = scores / jnp.sqrt(dh) if scale is None else scores * scale
    if softcap:
        scores = jnp.tanh(scores / softcap) * softcap
    scores = scores.reshape(b, kv, g, t, -1)
    scores = jnp.where(mask[:, :, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype).reshape(b, kv, g * t, -1)
    out = jnp.einsum("bkus,bksd->bkud", probs, vh)
    return out.reshape(b, kv, g, t, dh).transpose(0, 3, 1, 2, 4).reshape(b, t, h, dh)


def attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, impl: str, scale: float | None = None,
              softcap: float = 0.0) -> jax.Array:
    """Document-masked causal attention.

    ``impl``: "cudnn" routes through ``jax.nn.dot_product_attention`` (cuDNN flash attention on
    GPU, mask as an explicit boolean argument); "xla" is the explicit fallback above; "auto"
    takes cuDNN on GPU and XLA elsewhere. Both compute the same function (tested). Soft-capped
    scores always take the XLA path (cuDNN has no soft-capping).
    """
    if impl == "auto":
        impl = "cudnn" if jax.default_backend() == "gpu" and q.dtype in (jnp.bfloat16, jnp.float16) else "xla"
    if impl == "cudnn" and not softcap:
        return jax.nn.dot_product_attention(q, k, v, mask=mask, scale=scale, implementation="cudnn")
    return attention_xla(q, k, v, mask, scale, softcap)


def activation(name: str):
    """The FFN gate activation: ``silu`` (SwiGLU), ``gelu_tanh`` (GeGLU, Gemma) or exact ``gelu``."""
    if name == "silu":
        return jax.nn.silu
    if name == "gelu_tanh":
        return lambda x: jax.nn.gelu(x, approximate=True)
    if name == "gelu":
        return lambda x: jax.nn.gelu(x, approximate=False)
    raise ValueError(f"unknown FFN activation {name!r}; choose one of {', '.join(ACTIVATIONS)}")


def token_matmul(x: jax.Array, w: jax.Array, n_in: int) -> jax.Array:
    """Contract the last ``n_in`` axes of ``x`` with the first ``n_in`` axes of ``w`` as one 2-D matmul
    ``[tokens, in] @ [in, out]``: XLA:CPU runs a contraction over two axes (the attention output
    projection over heads x head_dim) 2.5x slower as an einsum than flattened."""
    lead, inner = x.shape[:x.ndim - n_in], w.shape[:n_in]
    y = x.reshape(-1, math.prod(inner)) @ w.reshape(math.prod(inner), -1)
    return y.reshape(*lead, *w.shape[n_in:])


def gate(g: jax.Array, u: jax.Array, act: str = "silu") -> jax.Array:
    """``act(g) * u`` in float32, rounded to ``g``'s dtype once.

    Matmuls run in the compute dtype; the elementwise chains between them run in float32, which
    is more accurate (one rounding instead of one per op) and, where the hardware has no
    bfloat16 vector arithmetic (XLA:CPU without AVX512-BF16 emulates every bfloat16 op with two
    conversions), several times cheaper. On GPU and TPU the chain fuses either way.
    """
    return (activation(act)(g.astype(jnp.float32)) * u.astype(jnp.float32)).astype(g.dtype)


def gated_ffn(h: jax.Array, w1: jax.Array, w2: jax.Array, w3: jax.Array, act: str = "silu") -> jax.Array:
    """``w3 (act(w1 h) * (w2 h))``: w1 is the gate, w2 the up projection, w3 the down projection."""
    return gate(h @ w1, h @ w2, act) @ w3
