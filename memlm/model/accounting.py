"""Parameter and FLOP accounting for a config, counted from the model's actual parameters.

FLOPs per token follow the usual 6N rule for training (2N forward, 4N backward) over every
matrix the token passes through, the output head included (also when tied); norms are not
counted, nor are biases. Causal attention adds ``2 * 2 * S * h * d_h`` per layer forward (QK^T
and PV), halved for the causal mask, so ``6 * L * S * h * d_h`` per token for training; counting the
diagonal as half a key, as ``S / 2`` does, a local (sliding-window) layer of window W < S attends
to ``((W - 1)^2 / 2 + (S - W + 1)(W - 1/2)) / S`` keys on average (``S / 2`` at W = S). Memory FLOPs are kept
separate: every fetched parameter is used once per token in one multiply-add, so a fetched
memory of M parameters costs ``6 M`` per token in training and ``2 M`` in inference (this holds
for FFN, LoRA and KV memories alike).
"""

from __future__ import annotations

import math

import jax
import ml_collections
import numpy as np

from memlm.memspec import block_params, fetched_rank, level_sizes
from memlm.model.functional import AnchorFunctional


def anchor_param_shapes(cfg: ml_collections.ConfigDict) -> dict[str, tuple[int, ...]]:
    """Shapes of the anchor's parameters, built abstractly (nothing is allocated)."""
    shapes = AnchorFunctional(cfg).shapes
    return {name: tuple(s.shape) for name, s in shapes.items()}


def anchor_params(cfg: ml_collections.ConfigDict) -> int:
    """Total anchor parameters (embedding, head, norms included)."""
    return sum(math.prod(s) for s in anchor_param_shapes(cfg).values())


def attention_flops(n_layers: int, seq: int, heads: int, head_dim: int, local_layers: tuple[int, ...] = (),
                    window: int = 0) -> int:
    """Training FLOPs per token of the attention scores and mixing (causal; local layers windowed)."""
    n_local = len(local_layers) if 0 < window < seq else 0
    keys = ((window - 1) ** 2 / 2 + (seq - window + 1) * (window - 0.5)) / seq  # mean keys per query
    return 6 * (n_layers - n_local) * seq * heads * head_dim + round(12 * n_local * keys * heads * head_dim)


def accounting(cfg: ml_collections.ConfigDict, seq_len: int | None = None) -> dict:
    """Anchor, per-level block, fetched and bank sizes, and FLOPs per token, for ``cfg``."""
    m = cfg.model
    shapes = anchor_param_shapes(cfg)
    total = sum(math.prod(s) for s in shapes.values())
    norms = sum(math.prod(s) for n, s in shapes.items() if "norm" in n)
    biases = sum(math.prod(s) for n, s in shapes.items() if n in ("bq", "bk", "bv"))
    embed = m.vocab_size * m.d_model
    matmul = total - norms - biases - (embed if not m.tied_embeddings else 0)  # the head is a matmul either way
    seq = seq_len or cfg.data.seq_len
    attn_train = attention_flops(m.n_layers, seq, m.n_heads, m.head_dim, tuple(m.get("local_layers", ())),
                                 int(m.get("sliding_window", 0)))
    k = cfg.tree.k
    bytes_per = np.dtype(jax.numpy.dtype(cfg.memory.dtype)).itemsize
    levels = []
    for level, r in enumerate(level_sizes(cfg), start=1):
        if r:
            block = block_params(cfg, r)
            levels.append(dict(level=level, nodes=k**level, r=r, block_params=block, bank_params=block * k**level))
    fetched = sum(x["block_params"] for x in levels)
    bank = sum(x["bank_params"] for x in levels)
    generic = block_params(cfg, fetched_rank(cfg)) if cfg.memory.type != "none" and cfg.memory.generic else 0
    return dict(
        name=cfg.name,
        anchor_params=total,
        anchor_non_embedding=total - embed - (0 if m.tied_embeddings else m.vocab_size * m.d_model),
        memory_type=cfg.memory.type,
        memory_sizes=list(level_sizes(cfg)),
        levels=levels,
        fetched_params=fetched,
        fetched_ratio=fetched / total,
        bank_params=bank,
        bank_bytes=bank * bytes_per,
        bank_dtype=cfg.memory.dtype,
        master_dtype=cfg.memory.master_dtype,
        # The training state: master parameters, two float32 moments, a 4-byte step counter per node.
        bank_state_bytes=bank * (np.dtype(jax.numpy.dtype(cfg.memory.master_dtype)).itemsize + 8)
        + 4 * sum(x["nodes"] for x in levels),
        generic_params=generic,
        seq_len=seq,
        flops_per_token=dict(
            anchor_train=6 * matmul + attn_train,
            memory_train=6 * fetched,
            anchor_inference=2 * matmul + attn_train // 3,
            memory_inference=2 * fetched,
        ),
        flop_ratio=(6 * matmul + attn_train + 6 * fetched) / (6 * matmul + attn_train),
    )
