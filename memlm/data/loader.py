"""The training loader: grain over the prepared ArrayRecord shards.

- Global shuffle over all sequences of all shards, reshuffled every epoch; epochs repeat forever.
- The batch is a pure function of (seed, step): global batch ``t`` is global samples
  ``[t*B, (t+1)*B)`` of the shuffled, repeated stream, and :meth:`Loader.batch_at` computes it
  directly. Resuming needs no data seek.
- The iterator (``iter(loader)``) is a grain ``DatasetIterator``: ``get_state`` / ``set_state``, and
  it checkpoints with orbax through ``grain.checkpoint.CheckpointSave`` / ``CheckpointRestore``.
- Hosts: process ``h`` of ``P`` reads global samples ``h, h+P, h+2P, ...``, so its batch ``t`` is
  its share of global batch ``t``; the hosts' batches are disjoint and together make the global one.
- Each sequence takes the generic memory with probability ``generic_prob`` (the paper: 1/(k+1)),
  decided by a hash of (seed, global sample index): the same sequence at the same step always
  decides the same way, whatever the host count.
- Reading runs on threads (``data.num_threads``), not processes: records are small and decoding
  is numpy, so threads keep up (bench/bench_loader.py) without process start-up cost.

A batch is a dict of numpy arrays: ``tokens``, ``segment_ids``, ``positions`` [B, S] int32,
``paths`` [B, depth] int32 (``paths[:, l-1]`` is the level-l node) and ``generic`` [B] bool.
Padding has segment id 0. The model's loss should skip targets whose segment differs from the
input's (padding, and the first token of the next document after an EOT).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from memlm.data.records import decode_sequence, read_manifest

_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def generic_draw(seed: int, index: int) -> float:
    """A uniform number in [0, 1) that depends only on (seed, global sample index)."""
    return (_splitmix64(_splitmix64(seed & _MASK64) ^ (index & _MASK64)) >> 11) / float(1 << 53)


class _Decode:
    """grain map-with-index transform: record bytes -> arrays, plus the generic flag."""

    def __init__(self, seed: int, generic_prob: float):
        self.seed = seed
        self.generic_prob = generic_prob

    def __call__(self, index: int, record: bytes) -> dict[str, Any]:
        out = decode_sequence(record)
        out["paths"] = out.pop("path")
        out["generic"] = np.bool_(self.generic_prob > 0 and generic_draw(self.seed, index) < self.generic_prob)
        return out


class Loader:
    """Batches of packed sequences from a prepared data directory (see the module docstring)."""

    def __init__(self, data_dir: str | os.PathLike, *, batch_size: int, seed: int, generic_prob: float,
                 process_index: int = 0, process_count: int = 1, num_threads: int = 2, prefetch: int = 4):
        import grain

        if batch_size % process_count:
            raise ValueError(f"global batch size {batch_size} is not divisible by the process count {process_count}")
        if not 0 <= process_index < process_count:
            raise ValueError(f"process index {process_index} is outside [0, {process_count})")
        if not 0.0 <= generic_prob <= 1.0:
            raise ValueError(f"generic probability {generic_prob} is outside [0, 1]")
        self.data_dir = Path(data_dir)
        self.manifest = read_manifest(data_dir)
        shards = [str(self.data_dir / s) for s in self.manifest["shards"]]
        missing = [s for s in shards if not Path(s).is_file()]
        if missing:
            raise FileNotFoundError(f"data directory {str(data_dir)!r} lacks shard {missing[0]!r} (in its manifest)")
        self.batch_size = batch_size
        self.host_batch_size = batch_size // process_count
        self.seed = seed
        self.process_index, self.process_count = process_index, process_count
        self.num_sequences = int(self.manifest["sequences"])
        source = grain.sources.ArrayRecordDataSource(shards)
        if len(source) != self.num_sequences:
            raise ValueError(f"shards of {str(data_dir)!r} hold {len(source)} sequences, "
                             f"the manifest says {self.num_sequences}")
        stream = (grain.MapDataset.source(source).seed(seed).shuffle().repeat(None)
                  .map_with_index(_Decode(seed, generic_prob)))
        self._dataset = stream[process_index::process_count].batch(self.host_batch_size, drop_remainder=True)
        self._read_options = grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch)

    @property
    def steps_per_epoch(self) -> float:
        """Global batches per pass over the data (a fraction: batches straddle epochs)."""
        return self.num_sequences / self.batch_size

    def batch_at(self, step: int) -> dict[str, np.ndarray]:
        """This host's part of global batch ``step``, computed directly (no iteration)."""
        return self._dataset[step]

    def __iter__(self):
        """A checkpointable grain iterator over this host's batches, from step 0 (``set_state`` to resume)."""
        return iter(self._dataset.to_iter_dataset(self._read_options))


def make_loader(cfg, data_dir: str | os.PathLike, *, process_index: int | None = None,
                process_count: int | None = None) -> Loader:
    """The loader a config asks for: global batch ``train.batch_size``, seed ``train.seed``, generic
    probability 1/(tree.k+1) when ``memory.generic`` is on (else 0), hosts from JAX when not given."""
    if process_index is None or process_count is None:
        import jax

        process_index, process_count = jax.process_index(), jax.process_count()
    generic_prob = 1.0 / (cfg.tree.k + 1) if cfg.memory.type != "none" and cfg.memory.generic else 0.0
    manifest = read_manifest(data_dir)
    if manifest["seq_len"] != cfg.data.seq_len:
        raise ValueError(f"config key 'data.seq_len' = {cfg.data.seq_len}, but {str(data_dir)!r} was packed "
                         f"with seq_len {manifest['seq_len']}")
    return Loader(data_dir, batch_size=cfg.train.batch_size, seed=cfg.train.seed, generic_prob=generic_prob,
                  process_index=process_index, process_count=process_count,
                  num_threads=cfg.data.num_threads, prefetch=cfg.data.prefetch)
