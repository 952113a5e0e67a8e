"""An independent plain-numpy forward pass of the anchor transformer (float64), for tests.

Nothing here calls memlm's model code: the maths is written out from its definition, so a test
comparing memlm's logits with :func:`forward` catches a wrong norm, RoPE, mask, attention or memory
adapter even where the product and an older test would share the mistake.

- :func:`hyperparameters` reads a memlm config (ml_collections) into a plain dict;
- :func:`forward` takes that dict, a dict of numpy parameter arrays (the names and shapes of
  ``AnchorFunctional.init``: layer parameters stacked on a leading layer axis) and a fetched memory
  (``{name: [B, n_memory_layers, *block]}``), and returns float64 logits ``[B, T, vocab]``;
- :func:`reference_logits` is both in one call.

The block (pre-norm decoder):

    x = embed[tokens] (* sqrt(d) with embed_scale)
    per layer l:  h = norm(x);  q, k, v = h Wq (+bq), h Wk (+bk), h Wv (+bv)
                  [lora_qk: q += alpha (h Aq) Bq, k += alpha (h Ak) Bk;  lora_ov: v += alpha (h Av) Bv]
                  QK-norm (over all heads' width, or per head), then RoPE (half-split) on q and k
                  a = softmax(cap(q.k * scale) | same document, causal, [window]) v   (grouped queries)
                  [kv: a += softmax(q_unrotated . K_mem / sqrt(dh)) V_mem, per query head, no mask]
                  o = a Wo  [lora_ov: o += alpha (a Ao) Bo];  (post-norm o);  x += o
                  h = norm(x);  f = W3 (act(h W1) * (h W2))
                  [ffn: f += M3 (act(h M1) * (h M2));  lora_ffn: alpha B A added to W1, W2, W3]
                  (post-norm f);  x += f
    logits = cap(norm(x) head)   (head = embed^T when tied)

Norms: gain-only LayerNorm ``(x - mean) / sqrt(var + eps) * g`` or RMSNorm ``x / sqrt(mean(x^2) + eps) * g``;
with norm_offset the gain is applied as ``1 + g``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

ARCH_DEFAULTS = dict(
    norm_offset=False, qk_norm_scope="full", qkv_bias=False, embed_scale=False, ffn_activation="silu",
    post_norms=False, sliding_window=0, local_layers=(), rope_local_base=0.0, rope_scaling="none",
    rope_scaling_factor=1.0, rope_low_freq_factor=1.0, rope_high_freq_factor=4.0, rope_original_max_len=8192,
    query_pre_attn_scalar=0.0, attn_softcap=0.0, final_softcap=0.0,
)


def hyperparameters(cfg) -> dict:
    """The plain hyperparameter dict of a memlm config (model section, memory type / layers / alpha)."""
    m = cfg.model
    hp = dict(
        vocab_size=int(m.vocab_size), d_model=int(m.d_model), n_layers=int(m.n_layers), n_heads=int(m.n_heads),
        n_kv_heads=int(m.n_kv_heads or m.n_heads), head_dim=int(m.head_dim), d_ff=int(m.d_ff),
        tied_embeddings=bool(m.tied_embeddings), norm=str(m.norm), qk_norm=bool(m.qk_norm),
        norm_eps=float(m.norm_eps), rope_base=float(m.rope_base),
    )
    for k, v in ARCH_DEFAULTS.items():
        hp[k] = m.get(k, v)
    hp["local_layers"] = tuple(int(i) for i in hp["local_layers"])
    mem = cfg.memory
    hp["memory_type"] = str(mem.type)
    hp["lora_alpha"] = float(mem.lora_alpha)
    # Placement ablation: which [start, end) layers read memory.
    n, p = hp["n_layers"], int(mem.placement_layers)
    hp["memory_layers"] = {"all": (0, n), "early": (0, p), "late": (n - p, n),
                           "middle": ((n - p) // 2, (n - p) // 2 + p)}[mem.placement]
    return hp


# ---------------------------------------------------------------------------------------------- pieces


def norm(x: np.ndarray, gain: np.ndarray, hp: Mapping) -> np.ndarray:
    """Gain-only LayerNorm or RMSNorm over the last axis."""
    x = np.asarray(x, np.float64)
    if hp["norm"] == "layernorm":
        x = x - x.mean(-1, keepdims=True)
    elif hp["norm"] != "rmsnorm":
        raise ValueError(hp["norm"])
    y = x / np.sqrt((x * x).mean(-1, keepdims=True) + hp["norm_eps"])
    g = np.asarray(gain, np.float64)
    return y * (1.0 + g if hp["norm_offset"] else g)


def inverse_frequencies(head_dim: int, base: float, scaling: str = "none", factor: float = 1.0,
                        low_freq_factor: float = 1.0, high_freq_factor: float = 4.0,
                        original_max_len: float = 8192) -> np.ndarray:
    """RoPE inverse frequencies ``base^(-2i/dh)``, i < dh/2, with linear or Llama-3.1 scaling."""
    inv = base ** (-2.0 * np.arange(head_dim // 2, dtype=np.float64) / head_dim)
    if scaling == "none":
        return inv
    if scaling == "linear":
        return inv / factor
    assert scaling == "llama3", scaling
    out = np.empty_like(inv)
    for i, f in enumerate(inv):
        wavelength = 2 * math.pi / f
        if wavelength < original_max_len / high_freq_factor:  # high frequency: kept
            out[i] = f
        elif wavelength > original_max_len / low_freq_factor:  # low frequency: interpolated by the factor
            out[i] = f / factor
        else:  # in between: a smooth blend of the two
            smooth = (original_max_len / wavelength - low_freq_factor) / (high_freq_factor - low_freq_factor)
            out[i] = (1 - smooth) * f / factor + smooth * f
    return out


def rotate(x: np.ndarray, positions: np.ndarray, inv_freq: np.ndarray) -> np.ndarray:
    """RoPE of ``x [B, T, H, dh]`` in the half-split layout: pairs (i, i + dh/2) rotate by ``pos * inv_freq[i]``."""
    angle = positions.astype(np.float64)[:, :, None, None] * inv_freq  # [B, T, 1, dh/2]
    c, s = np.cos(angle), np.sin(angle)
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return np.concatenate([x1 * c - x2 * s, x1 * s + x2 * c], axis=-1)


def softmax(z: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    if mask is not None:
        z = np.where(mask, z, -np.inf)
    z = z - z.max(-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(-1, keepdims=True)


_erf = np.vectorize(math.erf, otypes=[np.float64])


def act(name: str, x: np.ndarray) -> np.ndarray:
    if name == "silu":
        return x / (1.0 + np.exp(-x))
    if name == "gelu_tanh":
        return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))
    if name == "gelu":
        return 0.5 * x * (1.0 + _erf(x / math.sqrt(2.0)))
    raise ValueError(name)


def mask(segment_ids: np.ndarray, window: int = 0) -> np.ndarray:
    """``[B, T, T]``: query i sees key j iff same segment and j <= i (and i - j < window), by sequence index."""
    t = segment_ids.shape[1]
    i, j = np.arange(t)[:, None], np.arange(t)[None, :]
    ok = (segment_ids[:, :, None] == segment_ids[:, None, :]) & (j <= i)[None]
    if window:
        ok = ok & (i - j < window)[None]
    return ok


def lora(x: np.ndarray, a: np.ndarray, b: np.ndarray, alpha: float) -> np.ndarray:
    """``alpha * x A B`` per sequence: x [B, T, i], a [B, i, r], b [B, r, o]."""
    return alpha * np.einsum("btr,bro->bto", np.einsum("bti,bir->btr", x, a), b)


# ---------------------------------------------------------------------------------------------- forward


def _layer(hp, p, x, mem, seg, pos, local):
    b, t, d = x.shape
    nh, nkv, dh = hp["n_heads"], hp["n_kv_heads"], hp["head_dim"]
    kind = hp["memory_type"] if mem is not None else "none"
    alpha = hp["lora_alpha"]

    h = norm(x, p["attn_norm"], hp)
    q = np.einsum("btd,dhk->bthk", h, p["wq"])
    k = np.einsum("btd,dhk->bthk", h, p["wk"])
    v = np.einsum("btd,dhk->bthk", h, p["wv"])
    if hp["qkv_bias"]:
        q, k, v = q + p["bq"], k + p["bk"], v + p["bv"]
    if kind == "lora_qk":
        q = q + lora(h, mem["q_a"], mem["q_b"], alpha).reshape(q.shape)
        k = k + lora(h, mem["k_a"], mem["k_b"], alpha).reshape(k.shape)
    elif kind == "lora_ov":
        v = v + lora(h, mem["v_a"], mem["v_b"], alpha).reshape(v.shape)
    if hp["qk_norm"]:
        if hp["qk_norm_scope"] == "head":
            q, k = norm(q, p["q_norm"], hp), norm(k, p["k_norm"], hp)
        else:
            q = norm(q.reshape(b, t, nh * dh), p["q_norm"], hp).reshape(q.shape)
            k = norm(k.reshape(b, t, nkv * dh), p["k_norm"], hp).reshape(k.shape)
    q_plain = q
    if local and hp["rope_local_base"]:
        inv = inverse_frequencies(dh, hp["rope_local_base"])
    else:
        inv = inverse_frequencies(dh, hp["rope_base"], hp["rope_scaling"], hp["rope_scaling_factor"],
                                  hp["rope_low_freq_factor"], hp["rope_high_freq_factor"],
                                  hp["rope_original_max_len"])
    q, k = rotate(q, pos, inv), rotate(k, pos, inv)

    # grouped queries: query head i reads key / value head i // (nh / nkv)
    group = nh // nkv
    k_h, v_h = np.repeat(k, group, axis=2), np.repeat(v, group, axis=2)
    scale = hp["query_pre_attn_scalar"] ** -0.5 if hp["query_pre_attn_scalar"] else dh ** -0.5
    scores = np.einsum("bqhd,bkhd->bhqk", q, k_h) * scale
    if hp["attn_softcap"]:
        scores = hp["attn_softcap"] * np.tanh(scores / hp["attn_softcap"])
    allowed = mask(seg, hp["sliding_window"] if local else 0)[:, None]
    a = np.einsum("bhqk,bkhd->bqhd", softmax(scores, allowed), v_h)
    if kind == "kv":  # slots: un-rotated queries, per query head, one softmax of their own, no mask
        keys = mem["keys"].reshape(b, -1, nh, dh)
        values = mem["values"].reshape(b, -1, nh, dh)
        probs = softmax(np.einsum("bthd,brhd->bhtr", q_plain, keys) / math.sqrt(dh))
        a = a + np.einsum("bhtr,brhd->bthd", probs, values)
    a = a.reshape(b, t, nh * dh)
    o = a @ p["wo"].reshape(nh * dh, d)
    if kind == "lora_ov":
        o = o + lora(a, mem["o_a"], mem["o_b"], alpha)
    if hp["post_norms"]:
        o = norm(o, p["post_attn_norm"], hp)
    x = x + o

    h = norm(x, p["ffn_norm"], hp)
    fa = hp["ffn_activation"]
    if kind == "lora_ffn":
        g = h @ p["w1"] + lora(h, mem["w1_a"], mem["w1_b"], alpha)
        u = h @ p["w2"] + lora(h, mem["w2_a"], mem["w2_b"], alpha)
        z = act(fa, g) * u
        f = z @ p["w3"] + lora(z, mem["w3_a"], mem["w3_b"], alpha)
    else:
        f = (act(fa, h @ p["w1"]) * (h @ p["w2"])) @ p["w3"]
    if kind == "ffn":  # r extra gated hidden units: a widened FFN
        g = np.einsum("btd,bdr->btr", h, mem["w1"])
        u = np.einsum("btd,bdr->btr", h, mem["w2"])
        f = f + np.einsum("btr,brd->btd", act(fa, g) * u, mem["w3"])
    if hp["post_norms"]:
        f = norm(f, p["post_ffn_norm"], hp)
    return x + f


def forward(hp: Mapping, params: Mapping, tokens, segment_ids=None, positions=None, memory=None) -> np.ndarray:
    """float64 logits ``[B, T, vocab]``; defaults: one document per row, positions 0..T-1, no memory."""
    p = {n: np.asarray(v, np.float64) for n, v in params.items()}
    tokens = np.asarray(tokens)
    b, t = tokens.shape
    seg = np.ones((b, t), np.int64) if segment_ids is None else np.asarray(segment_ids)
    pos = np.broadcast_to(np.arange(t), (b, t)) if positions is None else np.asarray(positions)
    mem = None
    if memory is not None and hp["memory_type"] != "none":
        mem = {n: np.asarray(v, np.float64) for n, v in memory.items()}
    start, end = hp["memory_layers"]

    x = p["embed"][tokens]
    if hp["embed_scale"]:
        x = x * math.sqrt(hp["d_model"])
    for i in range(hp["n_layers"]):
        pl = {n: p[n][i] for n in ("attn_norm", "wq", "wk", "wv", "bq", "bk", "bv", "q_norm", "k_norm", "wo",
                                   "post_attn_norm", "ffn_norm", "w1", "w2", "w3", "post_ffn_norm") if n in p}
        ml = {n: v[:, i - start] for n, v in mem.items()} if mem is not None and start <= i < end else None
        x = _layer(hp, pl, x, ml, seg, pos, i in hp["local_layers"])
    x = norm(x, p["final_norm"], hp)
    head = p["embed"].T if hp["tied_embeddings"] else p["head"]
    logits = x @ head
    if hp["final_softcap"]:
        logits = hp["final_softcap"] * np.tanh(logits / hp["final_softcap"])
    return logits


def reference_logits(cfg, params, tokens, segment_ids=None, positions=None, memory=None) -> np.ndarray:
    """:func:`forward` for a memlm config; ``params`` / ``memory`` may be jax arrays (converted to numpy)."""
    params = {n: np.asarray(v) for n, v in params.items()}
    memory = None if memory is None else {n: np.asarray(v) for n, v in memory.items()}
    return forward(hyperparameters(cfg), params, tokens, segment_ids, positions, memory)
