"""Memory adapters: how a FetchedMemory changes one anchor layer.

Each function receives the layer's slice of the fetched memory (``mem[name]`` is
``[B, *block_shape]`` without the layer axis) and is the identity when the memory type does
not touch that site. Every type is zero at initialisation (FFN ``w3``, LoRA ``*_b`` and KV
``values`` start at zero), so the augmented model equals the anchor at step 0.

- ``ffn``   (the paper's method): ``r`` extra gated hidden units per layer,
  ``FFN'(u) = FFN(u) + M3 (act(M1 u) * (M2 u))``: exactly a widened FFN. ``act`` is the anchor's
  own FFN activation (SiLU for SwiGLU, tanh-GELU for a GeGLU anchor such as Gemma).
- ``lora_qk`` / ``lora_ov`` / ``lora_ffn``: ``W <- W + alpha * B A`` on the named projections.
  The scale is ``alpha`` (not ``alpha / r``): levels are concatenated along the rank axis and
  must share one scale; the paper found alpha = 2 best and does not say whether it divides by r.
- ``kv``: r extra key / value slots per layer; the (un-rotated) queries attend to them in a
  separate softmax, no RoPE on the slot keys and no causal mask, and the result is added to
  the multi-head attention output before the output projection.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp

from memlm.model.layers import gate, gated_ffn, mixed_einsum


def _lora(x: jax.Array, a: jax.Array, b: jax.Array, alpha: float) -> jax.Array:
    """``alpha * (x A) B`` per sequence: x [B, T, i], a [B, i, r], b [B, r, o] -> [B, T, o]."""
    return alpha * jnp.einsum("btr,bro->bto", jnp.einsum("bti,bir->btr", x, a), b)


def qkv(s, mem: Mapping[str, jax.Array], h: jax.Array, q: jax.Array, k: jax.Array, v: jax.Array):
    """LoRA on the query / key (``lora_qk``) or value (``lora_ov``) projections."""
    if s.memory_type == "lora_qk":
        q = q + _lora(h, mem["q_a"], mem["q_b"], s.lora_alpha).reshape(q.shape)
        k = k + _lora(h, mem["k_a"], mem["k_b"], s.lora_alpha).reshape(k.shape)
    elif s.memory_type == "lora_ov":
        v = v + _lora(h, mem["v_a"], mem["v_b"], s.lora_alpha).reshape(v.shape)
    return q, k, v


def attention_output(s, mem: Mapping[str, jax.Array], q: jax.Array, a: jax.Array) -> jax.Array:
    """KV-memory: a separate attention of the queries over the fetched slots, added to ``a``."""
    if s.memory_type != "kv":
        return a
    b, t, h, dh = q.shape
    keys = mem["keys"].reshape(b, -1, h, dh)
    values = mem["values"].reshape(b, -1, h, dh)
    scores = mixed_einsum("bthd,brhd->bhtr", q, keys) / jnp.sqrt(dh)
    probs = jax.nn.softmax(scores, axis=-1).astype(values.dtype)
    return a + jnp.einsum("bhtr,brhd->bthd", probs, values)


def output(s, mem: Mapping[str, jax.Array], a: jax.Array, o: jax.Array) -> jax.Array:
    """LoRA on the attention output projection (``lora_ov``)."""
    if s.memory_type != "lora_ov":
        return o
    b, t = a.shape[:2]
    return o + _lora(a.reshape(b, t, -1), mem["o_a"], mem["o_b"], s.lora_alpha)


def ffn(s, mem: Mapping[str, jax.Array] | None, h: jax.Array, w1: jax.Array, w2: jax.Array,
        w3: jax.Array) -> jax.Array:
    """The gated FFN (SwiGLU or GeGLU) with FFN-memory units or LoRA-FFN applied."""
    kind = s.ffn_activation
    if mem is None or s.memory_type not in ("ffn", "lora_ffn"):
        return gated_ffn(h, w1, w2, w3, kind)
    if s.memory_type == "ffn":
        y = gated_ffn(h, w1, w2, w3, kind)
        g = jnp.einsum("btd,bdr->btr", h, mem["w1"])
        u = jnp.einsum("btd,bdr->btr", h, mem["w2"])
        return y + jnp.einsum("btr,brd->btd", gate(g, u, kind), mem["w3"])
    alpha = s.lora_alpha
    g = h @ w1 + _lora(h, mem["w1_a"], mem["w1_b"], alpha)
    u = h @ w2 + _lora(h, mem["w2_a"], mem["w2_b"], alpha)
    act = gate(g, u, kind)
    return act @ w3 + _lora(act, mem["w3_a"], mem["w3_b"], alpha)
