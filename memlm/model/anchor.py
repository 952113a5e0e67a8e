"""The anchor transformer (OpenLM block, as in the paper) in Flax NNX.

Pre-norm decoder: gain-only LayerNorm (or RMSNorm), QK-norm over the full query / key width,
RoPE (base 100,000), head dimension decoupled from ``d_model``, grouped-query attention as an
option, SwiGLU FFN, no biases, tied or separate output head. Layer parameters are stacked on a
leading "layers" axis and run under ``jax.lax.scan`` with a configurable remat policy, so
compile time does not grow with depth. Parameters are float32 by default and cast to the
compute dtype (bfloat16 by default) at use.

The same block takes the options of the converted families (``memlm.convert``), each a config
key of the ``model`` section: RMSNorm with ``(1 + w)`` gains, q / k / v biases, per-head QK-norm,
embeddings scaled by ``sqrt(d)``, GeGLU, sliding-window (local) layers with their own RoPE base,
post-attention / post-FFN norms, a query pre-attention scalar, attention and final-logit
soft-capping, and linear or Llama 3 RoPE scaling. Which layers are local is a per-layer flag
scanned with the layer parameters, so the layer scan stays one loop.

Fetched memory is an *input* of the call (``memory``: a FetchedMemory dict or a SlotMemory,
see ``memlm.memspec``), never a parameter: the model cannot see or update the bank.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from memlm.config import memory_layers
from memlm.memspec import SlotMemory, block_arrays
from memlm.model import adapters
from memlm.model.kernels import KERNELS, kernel_attention
from memlm.model.layers import (
    attention,
    document_mask,
    layer_norm,
    mixed_einsum,
    rope,
    rope_frequencies,
    rope_tables_from,
    token_matmul,
    window_mask,
)
from memlm.sharding import constrain

RESIDUAL = ("batch", "seq", None)  # logical axes of the residual stream [B, T, d]
# Logical axes of one layer's parameters (the stacked "layers" axis dropped): how each is gathered for use.
LAYER_AXES = {"attn_norm": ("norm",), "wq": ("embed", "heads", "head_dim"), "wk": ("embed", "kv_heads", "head_dim"),
              "wv": ("embed", "kv_heads", "head_dim"), "bq": ("heads", "head_dim"), "bk": ("kv_heads", "head_dim"),
              "bv": ("kv_heads", "head_dim"), "q_norm": ("norm",), "k_norm": ("norm",),
              "wo": ("heads", "head_dim", "embed"), "post_attn_norm": ("norm",), "ffn_norm": ("norm",),
              "w1": ("embed", "mlp"), "w2": ("embed", "mlp"), "w3": ("mlp", "embed"), "post_ffn_norm": ("norm",)}
BIASES = ("bq", "bk", "bv")


def gathered(w: jax.Array, axes: tuple[str, ...] | None) -> jax.Array:
    """A weight as it is used: its ``embed`` axis (split over ``fsdp`` at rest) whole, the tensor-parallel
    axes still split. Called after the cast to the compute dtype, so FSDP gathers move compute-dtype bytes."""
    if axes is None:
        return w
    return constrain(w, tuple(None if a == "embed" else a for a in axes))

LAYER_PARAMS = ("attn_norm", "wq", "wk", "wv", "bq", "bk", "bv", "q_norm", "k_norm", "wo", "post_attn_norm",
                "ffn_norm", "w1", "w2", "w3", "post_ffn_norm")
# Architecture options: AnchorSpec field -> the model config key's default (memlm's own block).
ARCH_DEFAULTS: dict[str, object] = dict(
    norm_offset=False, qk_norm_scope="full", qkv_bias=False, embed_scale=False, ffn_activation="silu",
    post_norms=False, sliding_window=0, local_layers=(), rope_local_base=0.0, rope_scaling="none",
    rope_scaling_factor=1.0, rope_low_freq_factor=1.0, rope_high_freq_factor=4.0, rope_original_max_len=8192,
    query_pre_attn_scalar=0.0, attn_softcap=0.0, final_softcap=0.0,
)


@dataclasses.dataclass(frozen=True)
class AnchorSpec:
    """The static shape of an anchor (hashable: it is part of the NNX graph definition)."""

    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    d_ff: int
    tied_embeddings: bool
    norm: str
    qk_norm: bool
    norm_eps: float
    rope_base: float
    init_std: float
    param_dtype: str
    compute_dtype: str
    remat: str
    attention: str
    memory_type: str
    memory_layers: tuple[int, int]
    lora_alpha: float
    memory_rank_axes: tuple[tuple[str, int], ...] = ()  # (array name, rank axis of [B, *block]) per memory array
    norm_offset: bool = False
    qk_norm_scope: str = "full"
    qkv_bias: bool = False
    embed_scale: bool = False
    ffn_activation: str = "silu"
    post_norms: bool = False
    sliding_window: int = 0
    local_layers: tuple[int, ...] = ()
    rope_local_base: float = 0.0
    rope_scaling: str = "none"
    rope_scaling_factor: float = 1.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_len: int = 8192
    query_pre_attn_scalar: float = 0.0
    attn_softcap: float = 0.0
    final_softcap: float = 0.0

    @classmethod
    def from_config(cls, cfg: ml_collections.ConfigDict) -> AnchorSpec:
        m = cfg.model
        arch = {k: m.get(k, v) for k, v in ARCH_DEFAULTS.items()}
        arch["local_layers"] = tuple(sorted(int(i) for i in arch["local_layers"]))
        return cls(
            vocab_size=m.vocab_size, d_model=m.d_model, n_layers=m.n_layers, n_heads=m.n_heads,
            n_kv_heads=m.n_kv_heads or m.n_heads, head_dim=m.head_dim, d_ff=m.d_ff,
            tied_embeddings=m.tied_embeddings, norm=m.norm, qk_norm=m.qk_norm, norm_eps=m.norm_eps,
            rope_base=m.rope_base, init_std=m.init_std, param_dtype=m.param_dtype, compute_dtype=m.compute_dtype,
            remat=m.remat, attention=m.attention, memory_type=cfg.memory.type,
            memory_layers=memory_layers(cfg), lora_alpha=cfg.memory.lora_alpha,
            memory_rank_axes=tuple((b.name, b.rank_axis) for b in block_arrays(cfg)), **arch,
        )

    @property
    def dtype(self) -> jnp.dtype:
        return jnp.dtype(self.compute_dtype)

    def normalize(self, x: jax.Array, gain: jax.Array, dtype: jnp.dtype | None = None) -> jax.Array:
        """The block's norm (kind, epsilon and gain convention of this anchor); ``dtype``: the result's."""
        return layer_norm(x, gain, self.norm_eps, self.norm, self.norm_offset, dtype)

    @property
    def attn_scale(self) -> float | None:
        """The attention score scale; None: the default ``1 / sqrt(head_dim)``."""
        return self.query_pre_attn_scalar ** -0.5 if self.query_pre_attn_scalar else None

    def inv_freq(self, local: bool = False) -> jax.Array:
        """RoPE inverse frequencies of the global layers (scaled) or of the local layers."""
        if local and self.rope_local_base:
            return rope_frequencies(self.head_dim, self.rope_local_base)
        return rope_frequencies(self.head_dim, self.rope_base, self.rope_scaling, self.rope_scaling_factor,
                                self.rope_low_freq_factor, self.rope_high_freq_factor, self.rope_original_max_len)


def _param(key: jax.Array, shape: tuple[int, ...], std: float, dtype: str, axes: tuple[str, ...]) -> nnx.Param:
    value = std * jax.random.truncated_normal(key, -3.0, 3.0, shape, jnp.float32)
    return nnx.Param(value.astype(dtype), logical_axes=axes)


def _ones(shape: tuple[int, ...], dtype: str, axes: tuple[str, ...], offset: bool = False) -> nnx.Param:
    """A norm gain of one (stored as zero when gains are offsets from one)."""
    return nnx.Param((jnp.zeros if offset else jnp.ones)(shape, dtype), logical_axes=axes)


def _zeros(shape: tuple[int, ...], dtype: str, axes: tuple[str, ...]) -> nnx.Param:
    return nnx.Param(jnp.zeros(shape, dtype), logical_axes=axes)


class Anchor(nnx.Module):
    """Decoder-only anchor LM. ``__call__`` returns float32 logits ``[B, T, vocab_size]``.

    Initialisation: truncated normal (+-3 std) with ``init_std`` for every matrix, the output
    projections (``wo``, ``w3``) scaled by ``1/sqrt(2 n_layers)``; norm gains one; biases zero.
    """

    def __init__(self, cfg: ml_collections.ConfigDict | AnchorSpec, *, rngs: nnx.Rngs):
        s = cfg if isinstance(cfg, AnchorSpec) else AnchorSpec.from_config(cfg)
        self.spec = s
        L, d, h, kv, dh, f = s.n_layers, s.d_model, s.n_heads, s.n_kv_heads, s.head_dim, s.d_ff
        std, pd = s.init_std, s.param_dtype
        out_std = std / (2 * L) ** 0.5
        off = s.norm_offset
        self.embed = _param(rngs.params(), (s.vocab_size, d), std, pd, ("vocab", "embed"))
        self.attn_norm = _ones((L, d), pd, ("layers", "norm"), off)
        self.wq = _param(rngs.params(), (L, d, h, dh), std, pd, ("layers", "embed", "heads", "head_dim"))
        self.wk = _param(rngs.params(), (L, d, kv, dh), std, pd, ("layers", "embed", "kv_heads", "head_dim"))
        self.wv = _param(rngs.params(), (L, d, kv, dh), std, pd, ("layers", "embed", "kv_heads", "head_dim"))
        if s.qkv_bias:
            self.bq = _zeros((L, h, dh), pd, ("layers", "heads", "head_dim"))
            self.bk = _zeros((L, kv, dh), pd, ("layers", "kv_heads", "head_dim"))
            self.bv = _zeros((L, kv, dh), pd, ("layers", "kv_heads", "head_dim"))
        if s.qk_norm:
            per_head = s.qk_norm_scope == "head"
            self.q_norm = _ones((L, dh if per_head else h * dh), pd, ("layers", "norm"), off)
            self.k_norm = _ones((L, dh if per_head else kv * dh), pd, ("layers", "norm"), off)
        self.wo = _param(rngs.params(), (L, h, dh, d), out_std, pd, ("layers", "heads", "head_dim", "embed"))
        if s.post_norms:
            self.post_attn_norm = _ones((L, d), pd, ("layers", "norm"), off)
        self.ffn_norm = _ones((L, d), pd, ("layers", "norm"), off)
        self.w1 = _param(rngs.params(), (L, d, f), std, pd, ("layers", "embed", "mlp"))
        self.w2 = _param(rngs.params(), (L, d, f), std, pd, ("layers", "embed", "mlp"))
        self.w3 = _param(rngs.params(), (L, f, d), out_std, pd, ("layers", "mlp", "embed"))
        if s.post_norms:
            self.post_ffn_norm = _ones((L, d), pd, ("layers", "norm"), off)
        self.final_norm = _ones((d,), pd, ("norm",), off)
        if not s.tied_embeddings:
            self.head = _param(rngs.params(), (d, s.vocab_size), std, pd, ("embed", "vocab"))

    def _layer_params(self) -> dict[str, jax.Array]:
        return {n: getattr(self, n)[...] for n in LAYER_PARAMS if hasattr(self, n)}

    def __call__(
        self,
        tokens: jax.Array,
        segment_ids: jax.Array | None = None,
        positions: jax.Array | None = None,
        memory: Mapping[str, jax.Array] | SlotMemory | None = None,
        cache: Mapping[str, jax.Array] | None = None,
        return_hidden: bool = False,
    ) -> jax.Array | tuple[jax.Array, dict[str, jax.Array]]:
        """Logits for ``tokens [B, T]``.

        ``segment_ids [B, T]`` (documents packed in one row; 0 is padding) restrict attention to
        the same document; ``positions [B, T]`` are the RoPE positions (reset per document).
        ``memory`` is the FetchedMemory of the batch, or the same as a SlotMemory (or None: the
        anchor alone). With ``cache`` (see :func:`init_cache`) the call appends to a KV cache and
        returns ``(logits, cache)``. ``return_hidden`` returns the final-normed hidden states
        ``[B, T, d]`` instead of the logits (see :meth:`project`): a loss can then compute the
        logits chunk by chunk and never hold ``[B, T, vocab]``.
        """
        s = self.spec
        b, t = tokens.shape
        if segment_ids is None:
            segment_ids = jnp.ones((b, t), jnp.int32)
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        x = constrain(gathered(self.embed[...].astype(s.dtype), ("vocab", "embed"))[tokens], RESIDUAL)
        if s.embed_scale:
            x = x * jnp.asarray(s.d_model ** 0.5, s.dtype)
        if cache is None:
            q_index = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
            kv_index = q_index
            ctx = dict(segment_ids=segment_ids)
            if _needs_dense_mask(s):
                ctx["mask"] = document_mask(segment_ids, segment_ids, q_index, q_index)
        else:
            q_index = cache["lengths"][:, None] + jnp.arange(t, dtype=jnp.int32)
            kv_segments = jax.vmap(lambda c, u, i: jax.lax.dynamic_update_slice(c, u, (i,)))(
                cache["segments"], segment_ids, cache["lengths"])
            kv_index = jnp.broadcast_to(jnp.arange(kv_segments.shape[1], dtype=jnp.int32), kv_segments.shape)
            mask = document_mask(segment_ids, kv_segments, q_index, kv_index) & (kv_segments != 0)[:, None, None]
            ctx = dict(mask=mask, write_index=cache["lengths"])
        ctx["rope"] = rope_tables_from(positions, s.inv_freq())
        flags = None
        if s.local_layers:
            if "mask" in ctx:
                ctx["mask_local"] = window_mask(ctx["mask"], q_index, kv_index, s.sliding_window)
            if s.rope_local_base:
                ctx["rope_local"] = rope_tables_from(positions, s.inv_freq(local=True))
            flags = jnp.isin(jnp.arange(s.n_layers), jnp.asarray(s.local_layers))

        params = self._layer_params()
        start, end = s.memory_layers if memory is not None and s.memory_type != "none" else (0, 0)
        new_k, new_v = [], []
        for a, z in ((0, start), (start, end), (end, s.n_layers)):
            if z <= a:
                continue
            seg_params = {n: p[a:z] for n, p in params.items()}
            seg_mem = fixed = None
            if a == start and z == end and end > start:
                seg_mem = _layer_major(memory)
                if isinstance(memory, SlotMemory):
                    fixed = (memory.index, memory.use_generic, memory.frozen)
            seg_cache = None if cache is None else (cache["k"][a:z], cache["v"][a:z])
            seg_flags = None if flags is None else flags[a:z]
            x, kv = self._scan(x, seg_params, seg_mem, seg_cache, ctx, fixed, seg_flags)
            if cache is not None:
                new_k.append(kv[0])
                new_v.append(kv[1])

        x = constrain(s.normalize(x, self.final_norm[...]), RESIDUAL)
        if return_hidden and cache is None:
            return x
        logits = self.project(x)
        if cache is None:
            return logits
        new_cache = dict(
            k=jnp.concatenate(new_k, 0), v=jnp.concatenate(new_v, 0), segments=kv_segments,
            lengths=cache["lengths"] + jnp.sum(segment_ids != 0, axis=1).astype(jnp.int32),
        )
        return logits, new_cache

    def project(self, hidden: jax.Array) -> jax.Array:
        """float32 logits ``[..., vocab]`` of final-normed hidden states ``[..., d]`` (the output head,
        soft-capped when ``final_softcap`` is set), so a chunked loss and the full forward agree."""
        s = self.spec
        head = self.embed[...].T if s.tied_embeddings else self.head[...]
        head = gathered(head.astype(s.dtype), ("embed", "vocab"))
        logits = mixed_einsum("...d,dv->...v", hidden.astype(s.dtype), head)
        if s.final_softcap:
            logits = jnp.tanh(logits / s.final_softcap) * s.final_softcap
        return logits

    def _scan(self, x, params, mem, cache, ctx, fixed=None, flags=None):
        """Run layers under ``lax.scan``; ``fixed`` (a SlotMemory's index and generic flags) is
        closed over, while its layer-major slots are scanned with the parameters, as are the
        per-layer ``flags`` (True: a local, sliding-window layer)."""
        s = self.spec

        def body(carry, xs):
            p, m, c, local = xs
            if fixed is not None:
                m = _sequence_memory(s, m, *fixed)
            return layer(s, p, carry, m, c, ctx if local is None else _local_context(ctx, local))

        if cache is None and s.remat != "none":
            policy = {
                "full": jax.checkpoint_policies.nothing_saveable,
                "dots": jax.checkpoint_policies.checkpoint_dots,
                "dots_no_batch": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
            }[s.remat]
            body = jax.checkpoint(body, policy=policy, prevent_cse=False)
        return jax.lax.scan(body, x, (params, mem, cache, flags))


def _local_context(ctx: Mapping[str, jax.Array], local: jax.Array) -> dict:
    """The layer's mask and RoPE tables: the sliding-window ones where ``local`` (a scanned flag)."""
    out = dict(ctx, local=local)
    if "mask" in ctx:
        out["mask"] = jnp.where(local, ctx["mask_local"], ctx["mask"])
    if "rope_local" in ctx:
        out["rope"] = tuple(jnp.where(local, a, b) for a, b in zip(ctx["rope_local"], ctx["rope"], strict=True))
    return out


def _layer_major(memory: Mapping[str, jax.Array] | SlotMemory) -> Mapping[str, jax.Array] | SlotMemory:
    """The memory with its layer axis first, so ``lax.scan`` hands every layer its own slice.

    A SlotMemory keeps its per-sequence ``index`` / ``use_generic`` outside the scan: only the
    slot arrays (``[G, S, L, ...]``) and the generic block (``[L, ...]``) are sliced by layer.
    """
    if not isinstance(memory, SlotMemory):
        return {n: jnp.moveaxis(m, 1, 0) for n, m in memory.items()}
    levels = tuple({n: jnp.moveaxis(a, 2, 0) for n, a in lv.items()} for lv in memory.levels)
    generic = None if memory.generic is None else {n: jnp.moveaxis(a, 1, 0) for n, a in memory.generic.items()}
    return (levels, generic)


def _sequence_memory(s: AnchorSpec, layer_mem, index, use_generic, frozen=None) -> dict[str, jax.Array]:
    """One layer's per-sequence memory ``{name: [B, *block]}`` from its slots.

    Each group (data-parallel shard) gathers from its own slots only: a batched gather whose
    batch axis is the sharded group axis, so the partitioner keeps it local. Levels concatenate
    along the rank axis; sequences flagged ``use_generic`` read the generic block instead, and those
    flagged ``frozen`` read their blocks under ``stop_gradient`` (the blocks do not learn from them).
    """
    levels, generic = layer_mem
    out = {}
    for name, axis in s.memory_rank_axes:
        parts = []
        for lv, ix in zip(levels, index, strict=True):
            rows = jax.vmap(lambda slot, i: jnp.take(slot, i, axis=0))(lv[name], ix)  # [G, B/G, *block]
            parts.append(rows.reshape(-1, *rows.shape[2:]))
        x = parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=axis)
        if frozen is not None:
            x = jnp.where(frozen.reshape((-1,) + (1,) * (x.ndim - 1)), jax.lax.stop_gradient(x), x)
        if generic is not None:
            g = generic[name]  # [G, *block]: each group reads its own copy
            grouped = x.reshape(g.shape[0], -1, *x.shape[1:])
            flag = use_generic.reshape(grouped.shape[:2] + (1,) * (x.ndim - 1))
            x = jnp.where(flag, g[:, None].astype(x.dtype), grouped).reshape(x.shape)
        out[name] = x
    return out


def layer(s: AnchorSpec, p: Mapping[str, jax.Array], x: jax.Array, mem: Mapping[str, jax.Array] | None,
          cache: tuple[jax.Array, jax.Array] | None, ctx: Mapping[str, jax.Array]):
    """One pre-norm block: ``x + attn(norm(x))`` then ``+ ffn(norm(x))``, memory adapters included
    (with ``post_norms``: ``x + norm(attn(norm(x)))`` and ``x + norm(ffn(norm(x)))``)."""
    dt = s.dtype
    w = {n: gathered(v.astype(dt), LAYER_AXES.get(n)) for n, v in p.items()}
    mem = None if mem is None else {n: v.astype(dt) for n, v in mem.items()}
    b, t, _ = x.shape
    h = s.normalize(x, p["attn_norm"])
    q = jnp.einsum("btd,dhk->bthk", h, w["wq"])
    k = jnp.einsum("btd,dhk->bthk", h, w["wk"])
    v = jnp.einsum("btd,dhk->bthk", h, w["wv"])
    if s.qkv_bias:
        q, k, v = q + w["bq"], k + w["bk"], v + w["bv"]
    if mem is not None:
        q, k, v = adapters.qkv(s, mem, h, q, k, v)
    if s.qk_norm and s.qk_norm_scope == "head":
        q = s.normalize(q, p["q_norm"], jnp.float32)
        k = s.normalize(k, p["k_norm"], jnp.float32)
    elif s.qk_norm:
        q = s.normalize(q.reshape(b, t, -1), p["q_norm"], jnp.float32).reshape(q.shape)
        k = s.normalize(k.reshape(b, t, -1), p["k_norm"], jnp.float32).reshape(k.shape)
    # QK-norm's float32 output goes to RoPE unrounded: the chain rounds to the compute dtype once.
    q_unrotated = q.astype(dt)
    q = rope(q, ctx["rope"]).astype(dt)
    k = rope(k, ctx["rope"]).astype(dt)
    new_cache = None
    if cache is not None:
        write = jax.vmap(lambda c, u, i: jax.lax.dynamic_update_slice(c, u.astype(c.dtype), (i, 0, 0)))
        k_all = write(cache[0], k, ctx["write_index"])
        v_all = write(cache[1], v, ctx["write_index"])
        new_cache = (k_all, v_all)
        k, v = k_all.astype(dt), v_all.astype(dt)
    if cache is None and s.attention in KERNELS:
        a = _kernel_attention(s, q, k, v, ctx)
    else:
        a = attention(q, k, v, ctx["mask"], s.attention, s.attn_scale, s.attn_softcap)
    if mem is not None:
        a = adapters.attention_output(s, mem, q_unrotated, a)
    o = token_matmul(a, w["wo"], 2)
    if mem is not None:
        o = adapters.output(s, mem, a, o)
    if s.post_norms:
        o = s.normalize(o, p["post_attn_norm"])
    x = x + o.astype(x.dtype)
    h = s.normalize(x, p["ffn_norm"])
    f = adapters.ffn(s, mem, h, w["w1"], w["w2"], w["w3"])
    if s.post_norms:
        f = s.normalize(f, p["post_ffn_norm"])
    x = x + f.astype(x.dtype)
    return constrain(x, RESIDUAL), new_cache


def _needs_dense_mask(s: AnchorSpec) -> bool:
    """Whether a training / scoring call builds the dense ``[B, 1, T, T]`` document mask: always on
    the XLA and cuDNN paths; with a segment-id kernel only where it falls back to XLA (``pallas_gpu``
    with soft-capped scores or sliding-window layers)."""
    if s.attention not in KERNELS:
        return True
    return s.attention == "pallas_gpu" and bool(s.attn_softcap or s.local_layers)


def _kernel_attention(s: AnchorSpec, q: jax.Array, k: jax.Array, v: jax.Array, ctx: Mapping[str, jax.Array]):
    """Attention through the segment-id kernel ``s.attention`` (see ``memlm.model.kernels``); a
    sliding-window layer (``ctx["local"]``, a scanned flag) takes the kernel's window form, or the
    XLA path where the kernel has none."""
    seg, scale, cap = ctx["segment_ids"], s.attn_scale, s.attn_softcap

    def full():
        out = kernel_attention(s.attention, q, k, v, seg, scale, cap)
        return attention(q, k, v, ctx["mask"], "xla", scale, cap) if out is None else out

    if "local" not in ctx:
        return full()

    def windowed():
        out = kernel_attention(s.attention, q, k, v, seg, scale, cap, s.sliding_window)
        return attention(q, k, v, ctx["mask"], "xla", scale, cap) if out is None else out

    return jax.lax.cond(ctx["local"], windowed, full)


def init_cache(spec: AnchorSpec, batch: int, max_len: int, dtype: str | None = None) -> dict[str, jax.Array]:
    """An empty KV cache for ``batch`` rows of up to ``max_len`` tokens (all layers)."""
    dt = dtype or spec.compute_dtype
    shape = (spec.n_layers, batch, max_len, spec.n_kv_heads, spec.head_dim)
    return dict(k=jnp.zeros(shape, dt), v=jnp.zeros(shape, dt), segments=jnp.zeros((batch, max_len), jnp.int32),
                lengths=jnp.zeros((batch,), jnp.int32))
