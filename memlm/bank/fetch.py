"""Path fetch for inference: one root-to-leaf path read straight from the store, no bank load.

A query routed to leaf n needs one block per level; shallow blocks are shared by every query
on the same topic (a level-1 block serves 1/k of the corpus), so they are kept in an LRU cache
and a follow-up query that shares levels 1-2 reads only its deeper blocks. All uncached blocks
of a path are requested at once, so their reads overlap.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import numpy as np

from memlm.bank.cache import LRUCache
from memlm.bank.store import BankStore
from memlm.memspec import FetchedMemory


class PathFetcher:
    """Reads FetchedMemory for single paths from a :class:`BankStore` (any version, read-only is fine).

    ``cache_levels``: levels whose blocks are cached; ``cache_blocks``: LRU capacity in blocks.
    ``block_reads`` counts blocks read from the store, ``cache_hits`` blocks served from the cache.
    The cache belongs to the store's version: make a new fetcher for a newly opened version.
    """

    def __init__(self, store: BankStore, *, cache_levels: Sequence[int] = (1, 2), cache_blocks: int = 64):
        self.store = store
        self.layout = store.layout
        self.cache_levels = frozenset(cache_levels)
        self.cache_blocks = int(cache_blocks)
        self._cache = LRUCache(self.cache_blocks, cost=lambda block: 1)  # (level, node) -> blocks; cost in blocks
        self.block_reads = 0
        self.cache_hits = 0

    def fetch_blocks(self, path: Sequence[int]) -> dict[int, dict[str, np.ndarray]]:
        """The blocks ``{level: {name: block}}`` on ``path`` (node per tree level, root first)."""
        path = np.asarray(path, np.int64).reshape(1, -1)
        self.layout.check_paths(path)
        wanted = [(lv.level, int(path[0, lv.level - 1])) for lv in self.layout.levels]
        blocks: dict[int, dict[str, np.ndarray]] = {}
        missing = []
        for key in wanted:
            if key in self._cache:
                blocks[key[0]] = self._cache.get(key)
                self.cache_hits += 1
            else:
                missing.append(key)
        for key, block in zip(missing, self.store.read_blocks(missing), strict=True):
            blocks[key[0]] = block
            self.block_reads += 1
            if key[0] in self.cache_levels and self.cache_blocks > 0:
                self._cache.put(key, block)
                self._cache.evict()
        return blocks

    def fetch(self, path: Sequence[int], device: jax.Device | None = None) -> FetchedMemory:
        """FetchedMemory for a batch of one: ``{name: [1, *shape(R)]}`` in the bank dtype, levels
        concatenated along the rank axis (the same as the device tier's ``gather``)."""
        blocks = self.fetch_blocks(path)
        out = {}
        for a in self.layout.arrays:
            parts = [blocks[lv.level][a.name] for lv in self.layout.levels]
            joined = parts[0] if len(parts) == 1 else np.concatenate(parts, axis=a.rank_axis)
            out[a.name] = jax.device_put(joined[None], device)
        return out
