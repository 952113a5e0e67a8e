"""One LRU cache of bank rows, shared by the three readers that keep rows off the store.

- :class:`memlm.bank.tiers.HostLevel` (training, off-device levels): key = node of one level,
  value = every stored field of the node (master params, moments, counter, written flag),
  cost = bytes; rows updated by a step are inserted dirty and *pinned* (never evicted) until
  the next save; evicts after each insert; its own lock (a prefetch thread reads meanwhile).
- :class:`memlm.bank.tiers.InferenceTiers` (inference, off-device levels): key = (level, node),
  value = the parameter blocks cast to the compute dtype, cost = bytes; evicts once per batch,
  after it is assembled, and never below the batch's own rows (``floor``).
- :class:`memlm.bank.fetch.PathFetcher` (single-path fetch): key = (level, node), value = the
  parameter blocks in the bank dtype, only for the levels it caches, cost = 1 (a block count).

Why a module of its own: the three differ only in key, value, cost, pinning and when they
evict; the order (least recently used first), the accounting and the eviction loop are this one
class, and each reader keeps its own policy in its own words.
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Hashable, Iterable, Mapping

import numpy as np

Row = Mapping[str, np.ndarray]


def row_nbytes(row: Row) -> int:
    """Bytes of a cached row (all its arrays)."""
    return sum(v.nbytes for v in row.values())


class LRUCache:
    """Rows by key, least recently used first, with their summed ``cost`` (default: bytes).

    Not thread-safe: a reader used from several threads holds its own lock around it.
    """

    def __init__(self, capacity: int, cost: Callable[[Row], int] = row_nbytes):
        self.capacity = int(capacity)
        self.cost = cost
        self.used = 0
        self._rows: collections.OrderedDict[Hashable, Row] = collections.OrderedDict()

    def __contains__(self, key: Hashable) -> bool:
        return key in self._rows

    def __len__(self) -> int:
        return len(self._rows)

    def get(self, key: Hashable) -> Row:
        """The row of ``key`` (which must be cached), now the most recently used."""
        self._rows.move_to_end(key)
        return self._rows[key]

    def peek(self, key: Hashable) -> Row:
        """The row of ``key`` without touching its recency."""
        return self._rows[key]

    def touch(self, keys: Iterable[Hashable]) -> None:
        """Make ``keys`` (all cached) the most recently used, in this order."""
        for key in keys:
            self._rows.move_to_end(key)

    def put(self, key: Hashable, row: Row) -> None:
        """Insert or replace the row of ``key``, as the most recently used (no eviction)."""
        if key in self._rows:
            self.used -= self.cost(self._rows[key])
        self._rows[key] = row
        self._rows.move_to_end(key)
        self.used += self.cost(row)

    def evict(self, pinned: Callable[[Hashable], bool] | None = None, floor: int = 0) -> int:
        """Drop least recently used rows while over capacity and more than ``floor`` rows are left,
        skipping ``pinned`` keys (stops when only pinned ones are left); returns how many went."""
        dropped = 0
        while self.used > self.capacity and len(self._rows) > floor:
            if pinned is None:
                victim = next(iter(self._rows))
            else:
                victim = next((k for k in self._rows if not pinned(k)), None)
                if victim is None:
                    break  # everything left is pinned
            self.used -= self.cost(self._rows.pop(victim))
            dropped += 1
        return dropped
