"""Attention kernels for packed documents: segment ids and causality, never a dense mask.

The XLA path (``layers.attention_xla``) and cuDNN take the document mask as a boolean
``[B, 1, T, T]`` array, so no kernel can skip the tiles that mask removes, and the mask itself
costs ``B T^2`` bytes. The two kernels here take the per-token segment ids instead and build the
mask tile by tile inside the kernel:

- ``pallas_gpu``: jax's Pallas (Triton) flash attention for GPU
  (``jax.experimental.pallas.ops.gpu.attention.mha``), causal, with segment ids. It has no
  grouped-query form, so key / value heads are repeated to the query heads (the repeat's
  gradient sums them back).
- ``splash``: jax's splash attention for TPU
  (``jax.experimental.pallas.ops.tpu.splash_attention``), a causal mask AND-ed with the segment
  ids, grouped-query heads native, score soft-capping native; vmapped over the batch.

Both equal the XLA path in values and gradients (``tests/test_kernels.py``, in Pallas interpret
mode on CPU: ``interpret=True``, selected automatically off their own backend). What they do
not cover takes the XLA path, in ``layers.attention``: the KV-cache decoder (queries offset in
the cache), sliding-window layers on ``pallas_gpu`` (splash has a local mask and takes them), and
soft-capped scores on ``pallas_gpu``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

KERNELS = ("pallas_gpu", "splash")


def _interpret(backend: str) -> bool:
    """Run the kernel in Pallas interpret mode when not on its own backend (CPU tests)."""
    return jax.default_backend() != backend


def _block(t: int, preferred: int) -> int:
    """The largest power-of-two tile <= ``preferred`` that divides ``t``."""
    b = preferred
    while b > 1 and t % b:
        b //= 2
    return b


def pallas_gpu_attention(q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array,
                         scale: float | None = None) -> jax.Array:
    """Causal flash attention within segments: ``q [B,T,H,dh]``, ``k, v [B,T,K,dh]``, ``segment_ids [B,T]``."""
    from jax.experimental.pallas.ops.gpu import attention as gpu_attention

    b, t, h, dh = q.shape
    if k.shape[2] != h:
        k = jnp.repeat(k, h // k.shape[2], axis=2)
        v = jnp.repeat(v, h // v.shape[2], axis=2)
    fwd = _block(t, 128)
    bwd = _block(t, 32)
    sizes = gpu_attention.BlockSizes(block_q=fwd, block_k=fwd, block_q_dkv=bwd, block_kv_dkv=bwd,
                                     block_q_dq=bwd, block_kv_dq=bwd)
    return gpu_attention.mha(q, k, v, segment_ids.astype(jnp.int32), sm_scale=dh ** -0.5 if scale is None else scale,
                             causal=True, block_sizes=sizes, interpret=_interpret("gpu"))


def _splash_kernel(heads: int, kv_heads: int, t: int, window: int, softcap: float, interpret: bool):
    """A splash kernel for one (heads, length, window) shape. Built at trace time, once per traced
    call (a layer scan traces its body once); not cached across traces, as its mask info becomes
    arrays of the trace that builds it."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

    one = (sm.LocalMask((t, t), (window - 1, 0), offset=0) if window else sm.CausalMask((t, t)))
    mask = sm.MultiHeadMask([one] * heads)
    blk = _block(t, 512)
    sizes = sk.BlockSizes(block_q=blk, block_kv=blk, block_kv_compute=blk, block_q_dkv=blk, block_kv_dkv=blk,
                          block_kv_dkv_compute=blk, block_q_dq=blk, block_kv_dq=blk)
    make = sk.make_splash_mqa if kv_heads == 1 and heads > 1 else sk.make_splash_mha
    return make(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1, interpret=interpret,
                attn_logits_soft_cap=softcap or None)


def splash_attention(q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array, scale: float | None = None,
                     softcap: float = 0.0, window: int = 0) -> jax.Array:
    """Causal (or sliding-``window``) attention within segments with splash attention; shapes as
    :func:`pallas_gpu_attention`, grouped-query heads as they are. Queries are scaled before the
    kernel (splash applies no scale of its own)."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk

    b, t, h, dh = q.shape
    kv = k.shape[2]
    if t % 128:
        raise ValueError(f"splash attention needs a sequence length that is a multiple of 128, got {t}")
    kernel = _splash_kernel(h, kv, t, int(window), float(softcap), _interpret("tpu"))
    scale = dh ** -0.5 if scale is None else scale
    qh = jnp.swapaxes(q * jnp.asarray(scale, q.dtype), 1, 2)  # [B, H, T, dh]
    kh, vh = jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2)
    if kv == 1 and h > 1:
        kh, vh = kh[:, 0], vh[:, 0]  # the MQA kernel takes one [T, dh] key / value

    def one(qb, kb, vb, sb):
        return kernel(qb, kb, vb, segment_ids=sk.SegmentIds(q=sb, kv=sb))

    out = jax.vmap(one)(qh, kh, vh, segment_ids.astype(jnp.int32))
    return jnp.swapaxes(out, 1, 2).astype(q.dtype)


def kernel_attention(impl: str, q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array,
                     scale: float | None = None, softcap: float = 0.0, window: int = 0) -> jax.Array | None:
    """The named kernel's attention, or None where it does not cover the case (the caller then
    takes the XLA path): ``pallas_gpu`` has neither soft-capping nor sliding windows."""
    if impl == "splash":
        return splash_attention(q, k, v, segment_ids, scale, softcap, window)
    if impl == "pallas_gpu":
        if softcap or window:
            return None
        return pallas_gpu_attention(q, k, v, segment_ids, scale)
    raise ValueError(f"unknown attention kernel {impl!r}; choose one of {', '.join(KERNELS)}")

