"""The shape of a bank: which levels exist, how many nodes each has, what one block holds.

A hierarchical bank has, for every tree level l (1-based) with block size r_l > 0, ``k**l``
nodes; each node owns one block made of the arrays that ``memspec.block_arrays`` declares for
the memory type. Level l stores each array as ``[k**l, *shape(r_l)]`` (logical axes
``("bank_nodes", *array.logical_axes)``). Levels with r_l = 0 are absent.

The generic memory (the context-independent memory of the fetched size, docs/design.md §1) is a
bank with a single level of one node whose block has rank R = sum r_l; it is read with paths
that are all zero (one column), so it trains, saves and fetches through the same code.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import ml_collections
import numpy as np

from memlm.config import ConfigError, memory_layers
from memlm.memspec import BlockArray, block_arrays, fetched_rank, leaf_paths_of, level_sizes

NODE_AXIS = "bank_nodes"
_ITEMSIZE = {"float32": 4, "bfloat16": 2}


@dataclasses.dataclass(frozen=True)
class LevelLayout:
    """One level of a bank: its 1-based tree level (path column ``level - 1``), r_l and node count."""

    level: int
    rank: int
    nodes: int

    @property
    def key(self) -> str:
        """The name of this level in state pytrees and on disk."""
        return f"level{self.level}"


@dataclasses.dataclass(frozen=True)
class BankLayout:
    """Levels, block arrays, dtype and the model facts a bank is tied to. Hashable (a static jit arg)."""

    memory_type: str
    generic: bool
    k: int
    depth: int  # path columns: tree depth for a hierarchical bank, 1 for the generic memory
    sizes: tuple[int, ...]  # r_l for every level 1..depth, zeros included
    levels: tuple[LevelLayout, ...]  # only the levels with r_l > 0, in level order
    arrays: tuple[BlockArray, ...]
    dtype: str  # compute dtype: what a fetched block is in (what the model reads and devices exchange)
    init_std: float
    n_layers: int
    d_model: int
    memory_layers: tuple[int, int]
    master_dtype: str = "float32"  # stored parameters, updated by the optimizer (moments are always float32)

    @classmethod
    def from_config(cls, cfg: ml_collections.ConfigDict) -> BankLayout:
        """The hierarchical bank of ``cfg`` (a validated config): level l has k**l nodes of rank r_l."""
        arrays = block_arrays(cfg)
        if not arrays:
            raise ConfigError(f"config key 'memory.type' = {cfg.memory.type!r}: there is no memory bank to build")
        k, sizes = cfg.tree.k, level_sizes(cfg)
        levels = tuple(LevelLayout(i + 1, r, k ** (i + 1)) for i, r in enumerate(sizes) if r > 0)
        return cls._make(cfg, arrays, generic=False, depth=cfg.tree.depth, sizes=sizes, levels=levels)

    @classmethod
    def generic_from_config(cls, cfg: ml_collections.ConfigDict) -> BankLayout:
        """The generic memory of ``cfg`` (a validated config): one node whose block has the fetched rank R."""
        arrays = block_arrays(cfg)
        if not arrays:
            raise ConfigError(f"config key 'memory.type' = {cfg.memory.type!r}: there is no generic memory to build")
        r = fetched_rank(cfg)
        return cls._make(cfg, arrays, generic=True, depth=1, sizes=(r,), levels=(LevelLayout(1, r, 1),))

    @classmethod
    def _make(cls, cfg, arrays, *, generic, depth, sizes, levels) -> BankLayout:
        return cls(
            memory_type=cfg.memory.type, generic=generic, k=cfg.tree.k, depth=depth, sizes=tuple(sizes),
            levels=levels, arrays=arrays, dtype=cfg.memory.dtype, init_std=float(cfg.memory.init_std),
            n_layers=cfg.model.n_layers, d_model=cfg.model.d_model, memory_layers=tuple(memory_layers(cfg)),
            master_dtype=cfg.memory.master_dtype,
        )

    # ---- sizes ---------------------------------------------------------------------------------
    @property
    def fetched_rank(self) -> int:
        """R = sum r_l: the rank axis size of a fetched memory."""
        return sum(lv.rank for lv in self.levels)

    def level(self, level: int) -> LevelLayout:
        for lv in self.levels:
            if lv.level == level:
                return lv
        raise KeyError(f"the bank has no level {level} (levels: {[lv.level for lv in self.levels]})")

    def array(self, name: str) -> BlockArray:
        for a in self.arrays:
            if a.name == name:
                return a
        raise KeyError(f"the bank has no array {name!r} (arrays: {[a.name for a in self.arrays]})")

    def array_shape(self, lv: LevelLayout, array: BlockArray) -> tuple[int, ...]:
        """Stored shape of one array of a level: ``[nodes, *shape(r_l)]``."""
        return (lv.nodes, *array.shape(lv.rank))

    def logical_axes(self, array: BlockArray) -> tuple[str, ...]:
        return (NODE_AXIS, *array.logical_axes)

    def rank_offsets(self) -> dict[str, tuple[int, int]]:
        """[start, end) of each level's slice along the rank axis of a fetched memory."""
        out, start = {}, 0
        for lv in self.levels:
            out[lv.key] = (start, start + lv.rank)
            start += lv.rank
        return out

    @property
    def itemsize(self) -> int:
        """Bytes of one fetched (compute-dtype) parameter."""
        return _ITEMSIZE[self.dtype]

    @property
    def master_itemsize(self) -> int:
        """Bytes of one stored (master) parameter."""
        return _ITEMSIZE[self.master_dtype]

    def block_params(self, lv: LevelLayout) -> int:
        """Parameters of one block of level ``lv`` (s_l)."""
        return sum(a.size(lv.rank) for a in self.arrays)

    def block_bytes(self, lv: LevelLayout) -> int:
        return self.block_params(lv) * self.itemsize

    def params(self) -> int:
        """Bank size |W| = sum_l k**l s_l (parameters)."""
        return sum(lv.nodes * self.block_params(lv) for lv in self.levels)

    def bytes(self) -> int:
        """Bytes of the whole bank in the compute dtype (what an inference copy holds)."""
        return self.params() * self.itemsize

    def state_bytes(self) -> int:
        """Bytes of the training state: master parameters, two float32 moments, a 4-byte counter per node."""
        nodes = sum(lv.nodes for lv in self.levels)
        return self.params() * (self.master_itemsize + 8) + 4 * nodes

    def fetched_params(self) -> int:
        """Parameters one sequence fetches: sum_l s_l."""
        return sum(self.block_params(lv) for lv in self.levels)

    # ---- metadata ------------------------------------------------------------------------------
    def metadata(self) -> dict[str, Any]:
        """The facts a stored bank is verified against on open (JSON-able)."""
        return {
            "memory_type": self.memory_type,
            "generic": self.generic,
            "k": self.k,
            "depth": self.depth,
            "sizes": list(self.sizes),
            "n_layers": self.n_layers,
            "d_model": self.d_model,
            "memory_layers": list(self.memory_layers),
            "dtype": self.dtype,
            "master_dtype": self.master_dtype,
            "arrays": {lv.key: {a.name: list(self.array_shape(lv, a)) for a in self.arrays} for lv in self.levels},
        }

    def check_paths(self, paths: np.ndarray) -> None:
        """Host-side check of a path batch ``[B, depth]``: node ranges and parent links (i // k)."""
        paths = np.asarray(paths)
        if paths.ndim != 2 or paths.shape[1] != self.depth:
            raise ValueError(f"paths must have shape [B, {self.depth}], got {list(paths.shape)}")
        for lv in self.levels:
            col = paths[:, lv.level - 1]
            if col.size and (col.min() < 0 or col.max() >= lv.nodes):
                raise ValueError(f"paths: level {lv.level} node index out of range [0, {lv.nodes}): {col.tolist()}")
        if not self.generic:
            for level in range(1, self.depth):
                parent, child = paths[:, level - 1], paths[:, level]
                bad = np.nonzero(child // self.k != parent)[0]
                if bad.size:
                    b = int(bad[0])
                    raise ValueError(f"paths: row {b} node {int(child[b])} at level {level + 1} is not a child of "
                                     f"node {int(parent[b])} at level {level} (k = {self.k})")


def leaf_paths(layout: BankLayout, leaves: np.ndarray) -> np.ndarray:
    """Root-to-leaf paths ``[B, depth]`` (int32) for leaf node indices at the deepest tree level."""
    if layout.generic:
        return np.zeros((np.asarray(leaves).shape[0], 1), np.int32)
    return leaf_paths_of(leaves, layout.k, layout.depth)


def generic_paths(batch: int) -> np.ndarray:
    """Paths into the generic memory: every sequence reads its single node."""
    return np.zeros((batch, 1), np.int32)

