"""Bank tiers: levels deeper than ``bank.device_levels`` live off device, and each step brings to
the device only the rows it touches.

The batch is a pure function of (seed, step), so the nodes a step touches are known before it
runs (from the loader's leaf table, without reading a record): per level and data-parallel shard,
the sorted nodes it owns that the global batch fetches (the step's *slots*, at most
``min(batch, nodes per shard)``). For an off-device level the step's state holds exactly those
rows (master parameters, moments, counters) in fixed-size slot buffers; the exchange and the
row-wise AdamW address them by their position among the slot ids (``exchange.local_index``), so
the step computes the same numbers as with the level on device.

Host side, per process and per off-device level, :class:`HostLevel` keeps the rows of the nodes
this process owns: the whole level's share in host memory (``bank.host_cache_bytes = 0``), or
rows read on demand from the tensorstore bank with a bounded LRU cache of clean rows (dirty rows
stay in memory until the next save). :class:`TierManager` runs the per-step cycle:

1. ``prefetch(t+1)`` in a background thread: the rows of step t+1's slots that step t does not
   hold (their host copies are current: every earlier step's rows were written back);
2. ``write_back(state)`` after step t: its slot rows go back to the host tier (dirty);
3. ``install(state, t+1)``: the prefetched rows plus the rows step t held (now written back)
   become step t+1's slot buffers (the old ones are donated to the step and dropped).

Saving a checkpoint writes every dirty host row through the store's versioned save
(``BankStore.save(..., host_rows=...)``), so a checkpoint pairs with a bank version that
includes every row written back up to its step, and a crash before the commit leaves the
previous version readable: the store's guarantees, extended to the tier.
"""

from __future__ import annotations

import collections
import concurrent.futures
import threading
import time
from collections.abc import Callable

import jax
import numpy as np

from memlm.bank.cache import LRUCache
from memlm.bank.device import BankState, LevelPlacement
from memlm.bank.layout import BankLayout, LevelLayout
from memlm.bank.rows import stored_fields
from memlm.bank.store import BankStore


def empty_fields(layout: BankLayout, lv: LevelLayout, n: int) -> dict[str, np.ndarray]:
    """Zero rows of every stored field of a level (the shapes and dtypes ``read_fields`` returns)."""
    return {f.path: np.zeros((n, *f.row_shape(layout, lv)), jax.numpy.dtype(f.dtype(layout)))
            for f in stored_fields(layout)}

class HostLevel:
    """This process's rows of one off-device level: in host memory whole, or read from the store
    and cached (``cache_bytes > 0``). Rows are every stored field (``store.read_fields``)."""

    def __init__(self, store: BankStore, lv: LevelLayout, ranges: list[tuple[int, int]], cache_bytes: int = 0,
                 chunk: int = 4096):
        self.store, self.lv, self.ranges = store, lv, sorted(ranges)
        self.cache_bytes = int(cache_bytes)
        self._lock = threading.Lock()
        self._dirty: set[int] = set()
        self.stats = collections.Counter()
        self._dense: dict[tuple[int, int], dict[str, np.ndarray]] = {}
        self._cache = LRUCache(self.cache_bytes)  # node -> row; dirty rows pinned until saved
        if not self.cache_bytes:
            for lo, hi in self.ranges:
                hi = min(hi, lv.nodes)
                parts = [store.read_fields(lv.level, np.arange(a, min(a + chunk, hi))) for a in range(lo, hi, chunk)]
                self._dense[(lo, hi)] = {f: np.concatenate([p[f] for p in parts]) for f in parts[0]} if parts else {}
                self.stats["store_bytes_read"] += sum(v.nbytes for v in self._dense[(lo, hi)].values())

    def _where(self, node: int) -> tuple[tuple[int, int], int]:
        for lo, hi in self._dense:
            if lo <= node < hi:
                return (lo, hi), node - lo
        raise KeyError(f"level {self.lv.level} node {node} is not held by this process")

    def get(self, nodes: np.ndarray) -> dict[str, np.ndarray]:
        """Every field of ``nodes`` (sorted, owned by this process)."""
        nodes = np.asarray(nodes, np.int64)
        if not self.cache_bytes:
            out = {}
            for (lo, hi), fields in self._dense.items():
                sel = np.flatnonzero((nodes >= lo) & (nodes < hi))
                for f, arr in fields.items():
                    if f not in out:
                        out[f] = np.empty((nodes.size, *arr.shape[1:]), arr.dtype)
                    out[f][sel] = arr[nodes[sel] - lo]
            self.stats["host_bytes_read"] += sum(v.nbytes for v in out.values())
            return out
        with self._lock:
            hit = np.array([int(n) in self._cache for n in nodes], bool)
            cached = {int(n): self._cache.peek(int(n)) for n in nodes[hit]}
            self._cache.touch(cached)
        missing = nodes[~hit]
        fresh = self.store.read_fields(self.lv.level, missing) if missing.size else {}
        self.stats["cache_hits"] += int(hit.sum())
        self.stats["cache_misses"] += int(missing.size)
        self.stats["host_bytes_read"] += sum(sum(v.nbytes for v in row.values()) for row in cached.values())
        self.stats["store_bytes_read"] += sum(v.nbytes for v in fresh.values())
        out = empty_fields(self.store.layout, self.lv, nodes.size)
        miss_pos = np.flatnonzero(~hit)
        for f in out:
            if missing.size:
                out[f][miss_pos] = fresh[f]
            for i in np.flatnonzero(hit):
                out[f][i] = cached[int(nodes[i])][f]
        with self._lock:
            for j, n in enumerate(missing):
                self._insert(int(n), {f: fresh[f][j].copy() for f in fresh})
        return out

    def _insert(self, node: int, row: dict[str, np.ndarray]) -> None:
        self._cache.put(node, row)
        evicted = self._cache.evict(pinned=lambda n: n in self._dirty)  # dirty rows: kept until the next save
        if evicted:
            self.stats["cache_evictions"] += evicted

    def put(self, nodes: np.ndarray, fields: dict[str, np.ndarray]) -> None:
        """Store updated rows of ``nodes`` (sorted, owned) and mark them dirty."""
        nodes = np.asarray(nodes, np.int64)
        self.stats["host_bytes_written"] += sum(v.nbytes for v in fields.values())
        with self._lock:
            self._dirty.update(int(n) for n in nodes)
            if not self.cache_bytes:
                for (lo, hi), dense in self._dense.items():
                    sel = np.flatnonzero((nodes >= lo) & (nodes < hi))
                    for f, arr in dense.items():
                        arr[nodes[sel] - lo] = fields[f][sel]
                return
            for j, n in enumerate(nodes):
                self._insert(int(n), {f: np.array(fields[f][j]) for f in fields})

    def dirty(self) -> np.ndarray:
        with self._lock:
            return np.array(sorted(self._dirty), np.int64)

    def saved(self) -> None:
        """The dirty rows are in a committed bank version now: they may be evicted again."""
        with self._lock:
            self._dirty.clear()


class TierManager:
    """Slot ids, host rows and the per-step install / write-back for the off-device levels of a run."""

    def __init__(self, store: BankStore, layout: BankLayout, placement: dict[str, LevelPlacement],
                 sharding_of: Callable[[str], jax.sharding.Sharding], leaves_at: Callable[[int], tuple],
                 cache_bytes: int = 0):
        self.store, self.layout = store, layout
        self.levels = {k: pl for k, pl in placement.items() if pl.slots}
        self.leaves_at = leaves_at  # step -> (leaf of every global-batch sequence, generic flags)
        self.sharding = {k: sharding_of(k) for k in self.levels}
        self.local: dict[str, list[tuple[int, jax.Device]]] = {}  # key -> [(shard, device)] of this process
        self.host: dict[str, HostLevel] = {}
        for k, pl in self.levels.items():
            shape = (pl.device_rows,)
            pairs = []
            for device, index in self.sharding[k].addressable_devices_indices_map(shape).items():
                start, _, _ = index[0].indices(pl.device_rows)
                pairs.append((start // pl.slots, device))
            self.local[k] = sorted(pairs, key=lambda x: (x[0], x[1].id))
            shards = sorted({d for d, _ in pairs})
            ranges = [(d * pl.per_shard, (d + 1) * pl.per_shard) for d in shards]
            self.host[k] = HostLevel(store, layout.level(int(k[5:])), ranges, cache_bytes)
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="memlm-tier")
        self._pending: tuple[int, concurrent.futures.Future] | None = None
        self._held: dict[str, np.ndarray] = {}  # slot ids of the step whose rows are on device
        self.stall_s = 0.0

    # ---- which rows a step needs -------------------------------------------------------------
    def slot_ids(self, step: int) -> dict[str, np.ndarray]:
        """Per off-device level, ``[shards, slots]``: each shard's owned nodes that step ``step``
        fetches (sorted, ``-1``-padded). The same on every process."""
        leaves, generic = self.leaves_at(step)
        out = {}
        depth, k = self.layout.depth, self.layout.k
        for key, pl in self.levels.items():
            level = int(key[5:])
            nodes = np.unique(leaves[~generic] // k ** (depth - level))
            ids = np.full((pl.shards, pl.slots), -1, np.int32)
            owner = nodes // pl.per_shard
            for d in range(pl.shards):
                mine = nodes[owner == d]
                ids[d, :mine.size] = mine
            out[key] = ids
        return out

    def _mine(self, key: str, ids: np.ndarray) -> dict[int, np.ndarray]:
        return {d: ids[d][ids[d] >= 0].astype(np.int64) for d in {d for d, _ in self.local[key]}}

    # ---- the per-step cycle ------------------------------------------------------------------
    def prefetch(self, step: int) -> None:
        """Start reading, in the background, step ``step``'s rows that the device does not hold."""
        ids = self.slot_ids(step)

        def read():
            out = {}
            for key, all_ids in ids.items():
                held = self._held.get(key)
                for d, nodes in self._mine(key, all_ids).items():
                    if held is not None:
                        nodes = np.setdiff1d(nodes, held[d][held[d] >= 0])
                    out[(key, d)] = (nodes, self.host[key].get(nodes) if nodes.size else None)
            return ids, out

        self._pending = (step, self._pool.submit(read))

    def install(self, state: BankState, step: int) -> tuple[BankState, dict[str, np.ndarray]]:
        """``state`` with step ``step``'s slot buffers, and the slot ids (for the batch)."""
        if self._pending is None or self._pending[0] != step:
            self.prefetch(step)
        t0 = time.perf_counter()
        ids, pre = self._pending[1].result()
        self.stall_s = time.perf_counter() - t0
        self._pending = None
        params, mu, nu = dict(state.params), dict(state.mu), dict(state.nu)
        count, dirty = dict(state.count), dict(state.dirty)
        for key, pl in self.levels.items():
            lv = self.layout.level(int(key[5:]))
            rows = {}
            for d, nodes in self._mine(key, ids[key]).items():
                got_nodes, got = pre[(key, d)]
                rest = np.setdiff1d(nodes, got_nodes)
                fields = empty_fields(self.layout, lv, nodes.size)
                if got is not None:
                    pos = np.searchsorted(nodes, got_nodes)
                    for f in fields:
                        fields[f][pos] = got[f]
                if rest.size:  # rows the previous step held: written back, now current on the host
                    fresh = self.host[key].get(rest)
                    pos = np.searchsorted(nodes, rest)
                    for f in fields:
                        fields[f][pos] = fresh[f]
                rows[d] = (nodes, fields)
            params[key], mu[key], nu[key] = {}, {}, {}
            for a in self.layout.arrays:
                for kind, tree in (("params", params), ("mu", mu), ("nu", nu)):
                    dtype = self.layout.master_dtype if kind == "params" else np.float32
                    tree[key][a.name] = self._device(key, pl, rows, f"{a.name}/{kind}", a.shape(lv.rank), dtype)
            count[key] = self._device(key, pl, rows, "count", (), np.int32)
            dirty[key] = self._device(key, pl, rows, None, (), np.bool_)
        self._held = ids
        return state.replace(params=params, mu=mu, nu=nu, count=count, dirty=dirty), ids

    def _device(self, key: str, pl: LevelPlacement, rows: dict, field: str | None, row_shape: tuple,
                dtype) -> jax.Array:
        buffers = []
        for d, device in self.local[key]:
            buf = np.zeros((pl.slots, *row_shape), dtype)
            nodes, fields = rows[d]
            if field is not None and nodes.size:
                buf[:nodes.size] = fields[field]
            buffers.append(jax.device_put(buf, device))
        return jax.make_array_from_single_device_arrays((pl.device_rows, *row_shape), self.sharding[key], buffers)

    def write_back(self, state: BankState) -> None:
        """After a step: its updated slot rows go back to the host tier (and become dirty)."""
        for key in self.levels:
            ids = self._held.get(key)
            if ids is None:
                continue
            done = set()
            for d, device in self.local[key]:
                if d in done:
                    continue
                done.add(d)
                nodes = ids[d][ids[d] >= 0].astype(np.int64)
                if not nodes.size:
                    continue
                fields = {}
                for a in self.layout.arrays:
                    for kind, tree in (("params", state.params), ("mu", state.mu), ("nu", state.nu)):
                        fields[f"{a.name}/{kind}"] = self._local(tree[key][a.name], device)[:nodes.size]
                fields["count"] = self._local(state.count[key], device)[:nodes.size]
                fields["written"] = np.ones(nodes.size, np.uint8)
                self.host[key].put(nodes, fields)

    @staticmethod
    def _local(x: jax.Array, device: jax.Device) -> np.ndarray:
        return np.asarray(next(s.data for s in x.addressable_shards if s.device == device))

    def host_rows(self) -> dict[str, tuple[np.ndarray, Callable]]:
        """For ``BankStore.save``: per level, this process's dirty nodes and their fields."""
        return {key: (host.dirty(), host.get) for key, host in self.host.items()}

    def saved(self) -> None:
        for host in self.host.values():
            host.saved()

    def metrics(self) -> dict[str, float]:
        out = {"bank/fetch_stall_s": self.stall_s}
        for key, host in self.host.items():
            st = host.stats
            out[f"bank/{key}_store_bytes_read"] = float(st["store_bytes_read"])  # from tensorstore (disk)
            out[f"bank/{key}_host_bytes_read"] = float(st["host_bytes_read"])  # from host memory
            out[f"bank/{key}_host_bytes_written"] = float(st["host_bytes_written"])
            if host.cache_bytes:
                total = st["cache_hits"] + st["cache_misses"]
                out[f"bank/{key}_cache_hit_rate"] = st["cache_hits"] / total if total else 0.0
        return out

    def close(self) -> None:
        self._pool.shutdown(wait=True)



class InferenceTiers:
    """A bank for inference whose levels deeper than ``device_levels`` stay off device.

    Levels ``1..device_levels`` are loaded on device in the compute dtype and gathered there; the
    deeper levels' blocks are read per batch of paths: from host memory holding the whole level
    (``cache_bytes = 0``), or from the store through an LRU cache of blocks bounded by
    ``cache_bytes`` (a deep block is shared by few queries, a shallow one by many). The fetched
    memory equals :func:`memlm.bank.device.gather` on the whole bank.
    """

    def __init__(self, store: BankStore, device_levels: int, cache_bytes: int = 0, chunk: int = 4096):
        self.store, self.layout = store, store.layout
        self.off = [lv for lv in self.layout.levels if 0 <= device_levels < lv.level]
        self.state = store.load(inference=True, slots={lv.key: 1 for lv in self.off})
        self.cache_bytes = int(cache_bytes)
        self.stats = collections.Counter()
        self._dtype = jax.numpy.dtype(self.layout.dtype)
        self._whole: dict[str, dict[str, np.ndarray]] = {}
        self._cache = LRUCache(self.cache_bytes)  # (level, node) -> blocks in the compute dtype
        if not self.cache_bytes:
            for lv in self.off:
                self._whole[lv.key] = {
                    a.name: np.concatenate([store.read_rows(lv.level, a.name, np.arange(s, min(s + chunk, lv.nodes)))
                                            for s in range(0, lv.nodes, chunk)]).astype(self._dtype)
                    for a in self.layout.arrays}
                self.stats["store_bytes_read"] += sum(v.nbytes for v in self._whole[lv.key].values())

    def _rows(self, lv: LevelLayout, nodes: np.ndarray) -> dict[str, np.ndarray]:
        """Blocks of ``nodes`` (any order, repeats allowed) of off-device level ``lv``."""
        if not self.cache_bytes:
            return {name: arr[nodes] for name, arr in self._whole[lv.key].items()}
        uniq = np.unique(nodes)
        missing = [int(n) for n in uniq if (lv.level, int(n)) not in self._cache]
        self.stats["cache_hits"] += uniq.size - len(missing)
        self.stats["cache_misses"] += len(missing)
        if missing:
            fresh = {a.name: self.store.read_rows(lv.level, a.name, missing).astype(self._dtype)
                     for a in self.layout.arrays}
            self.stats["store_bytes_read"] += sum(v.nbytes for v in fresh.values())
            for j, n in enumerate(missing):
                self._cache.put((lv.level, n), {name: arr[j] for name, arr in fresh.items()})
        rows = {}
        self._cache.touch((lv.level, int(n)) for n in uniq)
        for name in (a.name for a in self.layout.arrays):
            rows[name] = np.stack([self._cache.peek((lv.level, int(n)))[name] for n in nodes])
        self._cache.evict(floor=uniq.size)  # never the batch's own rows
        return rows

    @property
    def _cache_used(self) -> int:
        """Bytes held by the block cache."""
        return self._cache.used

    def gather(self, paths: np.ndarray) -> dict[str, jax.Array]:
        """FetchedMemory ``{name: [B, *shape(R)]}`` for paths ``[B, depth]``: levels in order,
        concatenated on the rank axis, as the all-device gather."""
        paths = np.asarray(paths, np.int64)
        self.layout.check_paths(paths)
        off = {lv.key: self._rows(lv, paths[:, lv.level - 1]) for lv in self.off}
        out = {}
        for a in self.layout.arrays:
            parts = []
            for lv in self.layout.levels:
                if lv.key in off:
                    parts.append(jax.numpy.asarray(off[lv.key][a.name]))
                else:
                    parts.append(jax.numpy.take(self.state.params[lv.key][a.name],
                                                jax.numpy.asarray(paths[:, lv.level - 1]), axis=0))
            out[a.name] = parts[0] if len(parts) == 1 else jax.numpy.concatenate(parts, axis=a.rank_axis + 1)
        return out
