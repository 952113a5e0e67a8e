"""The training loader: batches of prepared sequences as a pure function of (seed, step).

- The stream: a global shuffle (grain's index shuffle) over all sequences, reshuffled every
  epoch, repeated forever. Global batch ``t`` is stream positions ``[t*B, (t+1)*B)``;
  :meth:`Loader.batch_at` computes it directly, so resuming needs no data seek and no saved
  iterator state: a run restarts at its step on any number of processes.
- Co-location by leaf: prepare writes sequences in leaf order (``leaf_histogram.sequences`` in
  the manifest counts them per leaf), so a sequence's leaf is a lookup. The global batch is
  sorted by leaf (ties by stream position) before it is split: process ``h`` of ``P`` takes the
  ``h``-th contiguous ``B/P`` rows, and inside a process the rows go to its devices in order. A
  data-parallel shard therefore holds sequences of neighbouring leaves, which are the nodes its
  shard of the bank owns: most fetched blocks are local, and a micro-batch repeats few nodes.
  Sorting permutes rows only within a step, so the step's loss and gradient do not change.
- ``subtree=i``: only the sequences under level-1 node ``i`` (one of the paper's per-subtree
  frozen-anchor jobs); they are one contiguous range of sequence indices.
- Each sequence takes the generic memory with probability ``generic_prob`` (the paper:
  1/(k+1)), decided by a hash of (seed, stream position): whatever the process count.
- Sibling paths (``train.sibling_path_prob`` = q): a fetching sequence reads, with probability q,
  the path of a sibling instead of its own (at level ``sibling_level`` a uniform other child of the
  same parent, uniform choices below it), flagged in ``sibling``; hashed like the generic draw, with
  their own salt. The step lets no block learn from such a sequence, so the anchor learns to do
  without a block it was not meant to get, as at evaluation when a query is routed wrongly.
- Reading runs on threads (``data.num_threads``) with ``data.prefetch`` batches ahead.

A batch is a dict of numpy arrays: ``tokens``, ``segment_ids``, ``positions`` [B, S] int32,
``paths`` [B, depth] int32 (``paths[:, l-1]`` is the level-l node), ``generic`` [B] bool and, with
sibling paths on, ``sibling`` [B] bool. Padding has segment id 0.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import numpy as np

from memlm.data.records import decode_sequence, read_manifest
from memlm.memspec import leaf_paths_of

_MASK64 = (1 << 64) - 1
_SIBLING_SALT = 0x51B1_1A6E_D0C0_FFEE  # sibling-path draws are independent of the generic draws


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def generic_draw(seed: int, index: int) -> float:
    """A uniform number in [0, 1) that depends only on (seed, global stream position)."""
    return (_splitmix64(_splitmix64(seed & _MASK64) ^ (index & _MASK64)) >> 11) / float(1 << 53)


def sibling_leaves(seed: int, positions: np.ndarray, leaves: np.ndarray, eligible: np.ndarray, *, prob: float,
                   level: int, k: int, depth: int) -> tuple[np.ndarray, np.ndarray]:
    """(leaves, flags): each ``eligible`` row's leaf is, with probability ``prob``, replaced by a
    sibling's: at ``level`` a uniform other child of the row's level-(level-1) node, uniform children
    below it. A pure function of (seed, stream position, leaf), like :func:`generic_draw`."""
    out, flags = np.array(leaves, np.int64), np.zeros(len(leaves), bool)
    if prob <= 0:
        return out, flags
    base = _splitmix64(seed & _MASK64 ^ _SIBLING_SALT)
    for i, pos in enumerate(positions):
        h = _splitmix64(base ^ (int(pos) & _MASK64))
        if not eligible[i] or (h >> 11) / float(1 << 53) >= prob:
            continue
        own = int(out[i]) // k ** (depth - level)
        h = _splitmix64(h)
        node = own - own % k + (own % k + 1 + h % (k - 1)) % k
        for _ in range(depth - level):
            h = _splitmix64(h)
            node = node * k + h % k
        out[i], flags[i] = node, True
    return out, flags


class Loader:
    """Batches of packed sequences from a prepared data directory (see the module docstring)."""

    def __init__(self, data_dir: str | os.PathLike, *, batch_size: int, seed: int, generic_prob: float,
                 process_index: int = 0, process_count: int = 1, num_threads: int = 2, prefetch: int = 4,
                 subtree: int | None = None, sibling_prob: float = 0.0, sibling_level: int = 1):
        import grain

        from memlm.run.paths import location

        if batch_size % process_count:
            raise ValueError(f"global batch size {batch_size} is not divisible by the process count {process_count}")
        if not 0 <= process_index < process_count:
            raise ValueError(f"process index {process_index} is outside [0, {process_count})")
        if not 0.0 <= generic_prob <= 1.0:
            raise ValueError(f"generic probability {generic_prob} is outside [0, 1]")
        if not 0.0 <= sibling_prob < 1.0:
            raise ValueError(f"sibling-path probability {sibling_prob} is outside [0, 1)")
        self.data_dir = location(data_dir)
        self.manifest = read_manifest(self.data_dir)
        shards = [self.data_dir / s for s in self.manifest["shards"]]
        missing = [s for s in shards if not s.exists()]
        if missing:
            raise FileNotFoundError(f"data directory {str(data_dir)!r} lacks shard {str(missing[0])!r} "
                                    "(in its manifest)")
        self.batch_size = batch_size
        self.host_batch_size = batch_size // process_count
        self.seed, self.generic_prob = seed, generic_prob
        self.process_index, self.process_count = process_index, process_count
        self.num_sequences = int(self.manifest["sequences"])
        self._source = grain.sources.ArrayRecordDataSource([os.fspath(s) for s in shards])
        if len(self._source) != self.num_sequences:
            raise ValueError(f"shards of {str(data_dir)!r} hold {len(self._source)} sequences, "
                             f"the manifest says {self.num_sequences}")
        counts = np.asarray(self.manifest.get("leaf_histogram", {}).get("sequences", []), np.int64)
        self._leaf_starts = np.concatenate([[0], np.cumsum(counts)]) if counts.sum() == self.num_sequences else None
        lo, hi = 0, self.num_sequences
        if subtree is not None:
            k, depth = int(self.manifest["k"]), int(self.manifest["depth"])
            if not 0 <= subtree < k:
                raise ValueError(f"config key 'train.subtree' = {subtree}: the tree has level-1 nodes 0..{k - 1}")
            if self._leaf_starts is None:
                raise ValueError(f"{str(data_dir)!r} has no per-leaf sequence counts: re-run `memlm prepare`")
            per = k ** (depth - 1)
            lo, hi = int(self._leaf_starts[subtree * per]), int(self._leaf_starts[(subtree + 1) * per])
            if hi == lo:
                raise ValueError(f"config key 'train.subtree' = {subtree}: no sequences under that level-1 node")
        self.k, self.depth = int(self.manifest["k"]), int(self.manifest["depth"])
        if sibling_prob and not 1 <= sibling_level <= self.depth:
            raise ValueError(f"sibling level {sibling_level} is outside the tree's levels 1..{self.depth}")
        self.sibling_prob, self.sibling_level = float(sibling_prob), int(sibling_level)
        self.first, self.count = lo, hi - lo
        self._stream = grain.MapDataset.range(self.count).seed(seed).shuffle().repeat(None)
        self._read_options = grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch)

    def global_rows(self, step: int) -> tuple[np.ndarray, np.ndarray]:
        """(sequence indices, stream positions) of global batch ``step``, in the order hosts split it."""
        positions = np.arange(step * self.batch_size, (step + 1) * self.batch_size, dtype=np.int64)
        index = self.first + np.fromiter((self._stream[int(p)] for p in positions), np.int64, positions.size)
        if self._leaf_starts is not None:
            leaf = np.searchsorted(self._leaf_starts, index, side="right") - 1
            order = np.lexsort((positions, leaf))
            index, positions = index[order], positions[order]
        return index, positions

    def global_leaves(self, step: int) -> tuple[np.ndarray, np.ndarray]:
        """(leaf, generic flag) of every sequence of global batch ``step``, without reading a record:
        what the bank tiers need to know which rows a step will touch."""
        if self._leaf_starts is None:
            raise ValueError(f"{str(self.data_dir)!r} has no per-leaf sequence counts: re-run `memlm prepare`")
        index, positions = self.global_rows(step)
        leaf = np.searchsorted(self._leaf_starts, index, side="right") - 1
        generic = self._generic(positions)
        return self._siblings(positions, leaf, generic)[0], generic

    def _generic(self, positions: np.ndarray) -> np.ndarray:
        p = self.generic_prob
        return np.array([p > 0 and generic_draw(self.seed, int(i)) < p for i in positions], bool)

    def _siblings(self, positions: np.ndarray, leaves: np.ndarray, generic: np.ndarray):
        return sibling_leaves(self.seed, positions, leaves, ~generic, prob=self.sibling_prob,
                              level=self.sibling_level, k=self.k, depth=self.depth)

    def batch_at(self, step: int) -> dict[str, np.ndarray]:
        """This process's part of global batch ``step``, computed directly (no iteration)."""
        index, positions = self.global_rows(step)
        part = slice(self.process_index * self.host_batch_size, (self.process_index + 1) * self.host_batch_size)
        index, positions = index[part], positions[part]
        records = self._source.__getitems__([int(i) for i in index])
        rows = [decode_sequence(r) for r in records]
        out: dict[str, Any] = {k: np.stack([r[k] for r in rows]) for k in ("tokens", "segment_ids", "positions")}
        out["paths"] = np.stack([r["path"] for r in rows])
        out["generic"] = self._generic(positions)
        if self.sibling_prob:
            leaves, out["sibling"] = self._siblings(positions, out["paths"][:, -1], out["generic"])
            out["paths"] = np.where(out["sibling"][:, None], leaf_paths_of(leaves, self.k, self.depth), out["paths"])
        return out

    def iterate(self, start: int = 0) -> Iterator[dict[str, np.ndarray]]:
        """This process's batches from step ``start`` on, read ahead on threads."""
        import grain

        steps = grain.MapDataset.range(start, start + (1 << 40)).map(self.batch_at)
        return iter(steps.to_iter_dataset(self._read_options))

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return self.iterate(0)


def make_loader(cfg, data_dir: str | os.PathLike, *, process_index: int | None = None,
                process_count: int | None = None) -> Loader:
    """The loader a config asks for: global batch ``train.batch_size``, seed ``train.seed``, generic
    probability 1/(tree.k+1) when ``memory.generic`` is on (else 0), ``train.subtree``, sibling paths
    (``train.sibling_path_*``) when the run trains memory, hosts from JAX when not given."""
    if process_index is None or process_count is None:
        import jax

        process_index, process_count = jax.process_index(), jax.process_count()
    generic_prob = 1.0 / (cfg.tree.k + 1) if cfg.memory.type != "none" and cfg.memory.generic else 0.0
    sibling_prob = float(cfg.train.sibling_path_prob) if uses_sibling_paths(cfg) else 0.0
    manifest = read_manifest(data_dir)
    if manifest["seq_len"] != cfg.data.seq_len:
        raise ValueError(f"config key 'data.seq_len' = {cfg.data.seq_len}, but {str(data_dir)!r} was packed "
                         f"with seq_len {manifest['seq_len']}")
    subtree = cfg.train.subtree if cfg.train.subtree >= 0 else None
    return Loader(data_dir, batch_size=cfg.train.batch_size, seed=cfg.train.seed, generic_prob=generic_prob,
                  process_index=process_index, process_count=process_count,
                  num_threads=cfg.data.num_threads, prefetch=cfg.data.prefetch, subtree=subtree,
                  sibling_prob=sibling_prob, sibling_level=int(cfg.train.sibling_path_level))


def uses_sibling_paths(cfg) -> bool:
    """Whether a run's batches carry sibling paths: it trains memory and asks for them."""
    return cfg.train.mode != "anchor" and cfg.memory.type != "none" and cfg.train.sibling_path_prob > 0
