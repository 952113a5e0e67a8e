"""What a memory block is made of, per memory type: the contract between model and bank.

Each memory type declares the arrays of one block (one tree node) for every memory layer,
with the axis that carries the block size r. The bank stores, per level l, each array with a
leading node axis (``[k**l, *shape(r_l)]``); gathering a path concatenates the levels along
the rank axis, giving a ``FetchedMemory``: a dict name -> ``[B, *shape(R)]`` with R = sum r_l.
Concatenation is exact for every type: extra SwiGLU units add up, LoRA ranks concatenate
(B.A over stacked ranks is the sum of the per-level products) and KV slots append.

Training passes the same memory in slot form (:class:`SlotMemory`): every fetched block once,
per level, and for every sequence the slot it reads. The model gathers a sequence's rows layer by
layer inside its scan, so no ``[B, L, d, R]`` per-sequence copy of the memory of all layers exists,
and the gradient comes back per slot (duplicates in a batch already summed).

The model consumes a FetchedMemory as an input and never imports the bank; the bank stores
whatever arrays the spec lists, so every type trains, saves and fetches through the same code.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, NamedTuple

import ml_collections
import numpy as np

from memlm.config import memory_layers

FetchedMemory = Mapping  # dict[str, jax.Array]: name -> [B, *block_shape(R)]


class SlotMemory(NamedTuple):
    """Fetched memory by slot (a pytree), for a batch of B sequences split into G groups.

    ``levels[i][name]``: ``[G, S_i, *shape(r_i)]``, the blocks fetched for level i, S_i slots per
    group (a group is one data-parallel shard: its sequences only read its own slots);
    ``index[i]``: ``[G, B // G]`` int32, the slot within its group that each sequence reads;
    ``generic``: ``{name: [G, *shape(R)]}`` (the one generic block, a copy per group, so its
    gradient stays per group until the step sums it) or None; ``use_generic``: ``[B]`` bool, the
    sequences that read the generic memory instead of their levels (or None); ``frozen``: ``[B]``
    bool, sequences whose fetched blocks get no gradient from them (sibling paths), or None.
    """

    levels: tuple[dict[str, Any], ...]
    index: tuple[Any, ...]
    generic: dict[str, Any] | None = None
    use_generic: Any | None = None
    frozen: Any | None = None


@dataclasses.dataclass(frozen=True)
class BlockArray:
    """One array of a memory block; ``shape(r)`` excludes the node (bank) or batch (fetched) axis."""

    name: str
    dims: tuple[str | int, ...]  # symbolic dims; "r" marks the rank axis
    logical_axes: tuple[str, ...]
    init: str  # "normal" (truncated), "zeros" or "kaiming_uniform"
    fan_in: int = 0  # for kaiming_uniform

    def shape(self, r: int) -> tuple[int, ...]:
        return tuple(r if d == "r" else int(d) for d in self.dims)

    @property
    def rank_axis(self) -> int:
        return self.dims.index("r")

    def size(self, r: int) -> int:
        n = 1
        for s in self.shape(r):
            n *= s
        return n


def block_arrays(cfg: ml_collections.ConfigDict) -> tuple[BlockArray, ...]:
    """The arrays of one memory block for ``cfg.memory.type`` (empty for ``none``)."""
    m = cfg.model
    start, end = memory_layers(cfg)
    n_mem = end - start
    d, f = m.d_model, m.d_ff
    q_width = m.n_heads * m.head_dim
    kv_width = (m.n_kv_heads or m.n_heads) * m.head_dim
    kind = cfg.memory.type

    def a(name, dims, axes, init, fan_in=0):
        return BlockArray(name, (n_mem, *dims), ("layers", *axes), init, fan_in)

    if kind == "none":
        return ()
    if kind == "ffn":
        return (
            a("w1", (d, "r"), ("embed", "mem_rank"), "normal"),
            a("w2", (d, "r"), ("embed", "mem_rank"), "normal"),
            a("w3", ("r", d), ("mem_rank", "embed"), "zeros"),
        )
    if kind == "lora_qk":
        return (
            a("q_a", (d, "r"), ("embed", "mem_rank"), "kaiming_uniform", d),
            a("q_b", ("r", q_width), ("mem_rank", "q_heads"), "zeros"),
            a("k_a", (d, "r"), ("embed", "mem_rank"), "kaiming_uniform", d),
            a("k_b", ("r", kv_width), ("mem_rank", "kv_heads"), "zeros"),
        )
    if kind == "lora_ov":
        return (
            a("v_a", (d, "r"), ("embed", "mem_rank"), "kaiming_uniform", d),
            a("v_b", ("r", kv_width), ("mem_rank", "kv_heads"), "zeros"),
            a("o_a", (q_width, "r"), ("q_heads", "mem_rank"), "kaiming_uniform", q_width),
            a("o_b", ("r", d), ("mem_rank", "embed"), "zeros"),
        )
    if kind == "lora_ffn":
        return (
            a("w1_a", (d, "r"), ("embed", "mem_rank"), "kaiming_uniform", d),
            a("w1_b", ("r", f), ("mem_rank", "mlp"), "zeros"),
            a("w2_a", (d, "r"), ("embed", "mem_rank"), "kaiming_uniform", d),
            a("w2_b", ("r", f), ("mem_rank", "mlp"), "zeros"),
            a("w3_a", (f, "r"), ("mlp", "mem_rank"), "kaiming_uniform", f),
            a("w3_b", ("r", d), ("mem_rank", "embed"), "zeros"),
        )
    if kind == "kv":
        # Memory slots attend per query head; keys carry no RoPE and the slots no causal mask.
        return (
            a("keys", ("r", q_width), ("mem_rank", "q_heads"), "normal"),
            a("values", ("r", q_width), ("mem_rank", "q_heads"), "zeros"),
        )
    raise ValueError(f"unknown memory type {kind!r}")


def level_sizes(cfg: ml_collections.ConfigDict) -> tuple[int, ...]:
    """r_l for each tree level 1..depth (zeros where a level has no memory)."""
    sizes = tuple(cfg.memory.sizes) + (0,) * cfg.tree.depth
    return sizes[: cfg.tree.depth] if cfg.memory.type != "none" else (0,) * cfg.tree.depth


def leaf_paths_of(leaves: Any, k: int, depth: int) -> np.ndarray:
    """Root-to-leaf paths ``[n, depth]`` int32 of leaf ids at the deepest level:
    ``path[:, l-1] = leaf // k**(depth-l)`` (node ids count within their level)."""
    leaves = np.asarray(leaves, np.int64)
    return np.stack([leaves // k ** (depth - lv) for lv in range(1, depth + 1)], axis=1).astype(np.int32)


def fetched_rank(cfg: ml_collections.ConfigDict) -> int:
    """R = sum_l r_l: the rank axis size of a fetched memory (and of the generic memory)."""
    return sum(level_sizes(cfg))


def block_params(cfg: ml_collections.ConfigDict, r: int) -> int:
    """Parameters of one block with block size r (s_l = 3 r L d for FFN-memory)."""
    return sum(b.size(r) for b in block_arrays(cfg))


def fetched_shapes(cfg: ml_collections.ConfigDict, batch: int) -> dict[str, tuple[int, ...]]:
    """Shapes of a FetchedMemory for a batch: name -> (batch, *shape(R))."""
    r = fetched_rank(cfg)
    return {b.name: (batch, *b.shape(r)) for b in block_arrays(cfg)}


def uses_memory(cfg: ml_collections.ConfigDict) -> bool:
    """Whether a run of ``cfg`` trains (and fetches) memory: a memory type, in a mode that is not
    anchor pretraining."""
    return cfg.train.mode != "anchor" and cfg.memory.type != "none"
