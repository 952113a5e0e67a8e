"""Packed sequences on disk: one ArrayRecord record per sequence, sharded, plus a JSON manifest.

A record is a little-endian byte string: an int32 header
``[magic, version, seq_len, n_tokens, n_segments, depth, leaf, token_bytes]``, the path
(int32 [depth]), per segment its length (int32), unit index (int64: the document, or window, in
prepare's unit order) and first token within the unit (int32), then the tokens (uint16 when the
vocabulary fits, else uint32) without padding. Segment ids and positions are derived from the
segment lengths when read (``packing.segment_arrays``), so a record costs about 2 bytes a token
plus 16 bytes a segment; the unit and start say where every token came from (tests, analysis).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from memlm.data.packing import segment_arrays

MAGIC = 0x4D454D31  # "MEM1"
VERSION = 1
_HEADER = 8
MANIFEST = "manifest.json"


class RecordError(ValueError):
    """A record or manifest is not what this version writes; the message names it."""


def encode_sequence(tokens: np.ndarray, seg_lens: np.ndarray, path: np.ndarray, leaf: int, seq_len: int,
                    token_bytes: int = 2, units: np.ndarray | None = None, starts: np.ndarray | None = None) -> bytes:
    """One packed sequence as record bytes (see the module docstring for the layout).

    ``units`` / ``starts``: each segment's unit index and first token within it (default -1 / 0).
    """
    tokens = np.asarray(tokens)
    n_seg = len(seg_lens)
    if int(np.sum(seg_lens)) != len(tokens) or len(tokens) > seq_len:
        raise RecordError(f"segments hold {int(np.sum(seg_lens))} tokens, the sequence {len(tokens)} "
                          f"(seq_len {seq_len})")
    units = np.full(n_seg, -1) if units is None else units
    starts = np.zeros(n_seg) if starts is None else starts
    dtype = {2: "<u2", 4: "<u4"}[token_bytes]
    header = np.array([MAGIC, VERSION, seq_len, len(tokens), n_seg, len(path), leaf, token_bytes], "<i4")
    return b"".join((header.tobytes(), np.asarray(path, "<i4").tobytes(), np.asarray(seg_lens, "<i4").tobytes(),
                     np.asarray(units, "<i8").tobytes(), np.asarray(starts, "<i4").tobytes(),
                     tokens.astype(dtype).tobytes()))


def _layout(record: bytes) -> tuple[list[int], dict[str, np.ndarray]]:
    header = [int(x) for x in np.frombuffer(record, "<i4", count=_HEADER)]
    magic, version, seq_len, n, n_seg, depth, _, token_bytes = header
    if magic != MAGIC or version != VERSION:
        raise RecordError(f"not a memlm packed-sequence record (magic {magic:#x}, version {version})")
    parts, off = {}, 4 * _HEADER
    for name, dtype, count in (("path", "<i4", depth), ("seg_lens", "<i4", n_seg), ("units", "<i8", n_seg),
                               ("starts", "<i4", n_seg), ("tokens", "<u2" if token_bytes == 2 else "<u4", n)):
        parts[name] = np.frombuffer(record, dtype, count=count, offset=off)
        off += np.dtype(dtype).itemsize * count
    return header, parts


def decode_sequence(record: bytes) -> dict[str, np.ndarray]:
    """Record bytes -> tokens, segment_ids, positions [seq_len] int32 and path [depth] int32.

    Padding positions carry token 0, segment 0 and position 0.
    """
    header, parts = _layout(record)
    seq_len, n = header[2], header[3]
    tokens = np.zeros(seq_len, np.int32)
    tokens[:n] = parts["tokens"]
    segment_ids, positions = segment_arrays(parts["seg_lens"], seq_len)
    return {"tokens": tokens, "segment_ids": segment_ids, "positions": positions,
            "path": parts["path"].astype(np.int32)}


def decode_segments(record: bytes) -> dict[str, Any]:
    """Where a record's tokens came from: leaf, path, and per segment its length, unit and start."""
    header, parts = _layout(record)
    return {"leaf": header[6], "seq_len": header[2], "path": parts["path"].astype(np.int32),
            "seg_lens": parts["seg_lens"].astype(np.int64), "units": parts["units"].astype(np.int64),
            "starts": parts["starts"].astype(np.int64), "tokens": parts["tokens"].astype(np.int64)}


class ShardWriter:
    """Writes records into ``<dir>/<prefix>-NNNNN.array_record`` shards of ``per_shard`` records each."""

    def __init__(self, directory: str | os.PathLike, per_shard: int, prefix: str = "train"):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.per_shard = per_shard
        self.prefix = prefix
        self.shards: list[str] = []
        self.count = 0
        self._writer = None
        self._in_shard = 0

    def write(self, record: bytes) -> None:
        from array_record.python.array_record_module import ArrayRecordWriter

        if self._writer is None or self._in_shard == self.per_shard:
            self._close_shard()
            name = f"{self.prefix}-{len(self.shards):05d}.array_record"
            self._writer = ArrayRecordWriter(str(self.directory / name), "group_size:1")
            self.shards.append(name)
            self._in_shard = 0
        self._writer.write(record)
        self._in_shard += 1
        self.count += 1

    def _close_shard(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def close(self) -> list[str]:
        """Finish the last shard; returns the shard file names (relative to the directory)."""
        self._close_shard()
        return self.shards

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write JSON atomically (temp file, then rename): a reader never sees half a manifest."""
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, sort_keys=False)
        f.write("\n")
    os.replace(tmp, path)


def read_manifest(data_dir: str | os.PathLike) -> dict[str, Any]:
    """The manifest of a prepared data directory (a path or a URL); a clear error when there is none."""
    from memlm.run.paths import location

    path = location(data_dir) / MANIFEST
    if not path.is_file():
        raise RecordError(f"{str(data_dir)!r} is not a prepared data directory (no {MANIFEST}); "
                          "run `memlm prepare` first")
    return json.loads(path.read_text(encoding="utf-8"))
