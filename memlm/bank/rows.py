"""Rows of a bank's levels in tensorstore: what a stored row is, and block-aligned row writes.

A node's *row* is every stored field of it at one level (see :mod:`memlm.bank.store` for the
layout of a location): per block array its ``params`` (bank master dtype), ``mu`` and ``nu``
(float32), then the per-node ``count`` (int32) and ``written`` flag (uint8). A *group* is a key
prefix holding one array per field (``main/level{l}/``, a delta part ``after/v{N}/level{l}/p{i}/``).

Why a module of its own: the write-ahead log, the versioned reads and the device load all read
and write rows the same way. This is the one place that knows a row's schema (fields, shapes,
dtypes), keeps the opened tensorstore arrays, and cuts writes into batches of whole zarr shards
(one key each) so that a pass rewrites every touched shard once, staging the next batch while
the previous one commits.
"""

from __future__ import annotations

import collections
import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence

import jax.numpy as jnp
import numpy as np
import tensorstore as ts

from memlm.bank import tsio
from memlm.bank.layout import BankLayout, LevelLayout

KINDS = ("params", "mu", "nu")

RowsFn = Callable[[int, int], Mapping[str, np.ndarray]]  # (i, j) -> every field of nodes[i:j]


@dataclasses.dataclass(frozen=True)
class Field:
    """One stored array of a level: a block array's params / mu / nu, or a per-node scalar."""

    array: str | None
    kind: str  # params, mu, nu, count, written

    @property
    def path(self) -> str:
        return f"{self.array}/{self.kind}" if self.array else self.kind

    def row_shape(self, layout: BankLayout, lv: LevelLayout) -> tuple[int, ...]:
        return layout.array(self.array).shape(lv.rank) if self.array else ()

    def dtype(self, layout: BankLayout) -> str:
        dtypes = {"params": layout.master_dtype, "mu": "float32", "nu": "float32", "count": "int32", "written": "uint8"}
        return dtypes[self.kind]


def vkey(version: int) -> str:
    """The key segment of a version in delta group names (zero-padded: keys sort by version)."""
    return f"v{version:012d}"


def stored_fields(layout: BankLayout) -> list[Field]:
    """Every stored field of a level, in storage order: the block arrays' kinds, count, written."""
    return [Field(a.name, k) for a in layout.arrays for k in KINDS] + [Field(None, "count"), Field(None, "written")]


def row_bytes(layout: BankLayout, lv: LevelLayout) -> int:
    """Stored bytes of one node across all its fields."""
    return sum(math.prod(f.row_shape(layout, lv)) * np.dtype(jnp.dtype(f.dtype(layout))).itemsize
               for f in stored_fields(layout))


def shard_batches(nodes: np.ndarray, shard_nodes: int, max_rows: int) -> list[tuple[int, int]]:
    """Split sorted node ids into [i, j) batches of whole shards, about ``max_rows`` rows each,
    so that every shard of the target array is rewritten once per pass."""
    if nodes.size == 0:
        return []
    shard = nodes // shard_nodes
    starts = np.flatnonzero(np.diff(shard)) + 1
    bounds = [0, *starts.tolist(), nodes.size]
    out, i = [], 0
    for b in bounds[1:]:
        if b - i >= max_rows or b == nodes.size:
            out.append((i, b))
            i = b
    return out


def pipelined(batches: Sequence[tuple[int, int]], stage: Callable[[int, int, ts.Transaction], list],
              done: Callable[[int, int], None]) -> None:
    """Run batches as transactions, staging batch i+1 while batch i commits (one shard set
    per batch, so the two never touch the same block); ``done(i, j)`` once batch [i, j) is durable."""
    inflight = None
    for i, j in batches:
        txn = ts.Transaction()
        for fut in stage(i, j, txn):
            fut.result()
        if inflight is not None:
            inflight[0].result()
            done(*inflight[1])
        inflight = (txn.commit_async(), (i, j))
    if inflight is not None:
        inflight[0].result()
        done(*inflight[1])


class RowArrays:
    """The tensorstore arrays of one bank location, opened once and kept, and row I/O over them.

    ``shard_nodes``: nodes per outer zarr chunk, per level key; ``batch_bytes``: host memory for
    one batch of rows; ``stats`` (shared with the store) counts rows written; ``phase`` is called
    between batches (the store's fault-injection seam).
    """

    def __init__(self, spec: dict, context: ts.Context, layout: BankLayout, shard_nodes: Mapping[str, int],
                 batch_bytes: int, stats: collections.Counter, phase: Callable[[str], None]):
        self.spec, self.context, self.layout = spec, context, layout
        self.shard_nodes = shard_nodes
        self.batch_bytes = batch_bytes
        self.stats = stats
        self.phase = phase
        self._arrays: dict[str, ts.TensorStore] = {}

    def array(self, group: str, field: Field | str) -> ts.TensorStore:
        """The array of ``field`` (or a named extra array such as ``nodes``) under ``group``."""
        path = group + (field if isinstance(field, str) else field.path) + "/"
        if path not in self._arrays:
            self._arrays[path] = tsio.open_array(tsio.join(self.spec, path), self.context)
        return self._arrays[path]

    def create_group(self, group: str, lv: LevelLayout, rows: int, with_nodes: bool = False) -> None:
        """Create (replacing) every field's array of ``rows`` rows under ``group`` (and ``nodes``)."""
        shard = int(self.shard_nodes[lv.key])
        for f in stored_fields(self.layout):
            path = group + f.path + "/"
            self._arrays[path] = tsio.create_array(tsio.join(self.spec, path), (rows, *f.row_shape(self.layout, lv)),
                                                   f.dtype(self.layout), shard, self.context)
        if with_nodes:
            path = group + "nodes/"
            self._arrays[path] = tsio.create_array(tsio.join(self.spec, path), (rows,), "int32", shard, self.context)

    def forget_deltas(self) -> None:
        """Drop the handles of every array outside ``main/`` (their keys are being deleted)."""
        self._arrays = {k: v for k, v in self._arrays.items() if k.startswith("main/")}

    def max_rows(self, lv: LevelLayout) -> int:
        """Rows of a level per batch: ``batch_bytes`` of stored rows, at least one."""
        return max(1, self.batch_bytes // row_bytes(self.layout, lv))

    def write_main(self, lv: LevelLayout, nodes: np.ndarray, rows_fn: RowsFn,
                   on_durable: Callable[[np.ndarray, Mapping[str, np.ndarray]], None]) -> None:
        """Write rows (all fields) of sorted ``nodes`` into ``main``, each shard rewritten once;
        ``on_durable(nodes, rows)`` after each batch is committed."""
        main = f"main/{lv.key}/"
        staged: dict[tuple[int, int], Mapping[str, np.ndarray]] = {}

        def stage(i: int, j: int, txn: ts.Transaction) -> list:
            sel = nodes[i:j]
            rows = staged[(i, j)] = rows_fn(i, j)
            pending = []
            for f in stored_fields(self.layout):
                arr = self.array(main, f).with_transaction(txn)
                target = arr[int(sel[0]):int(sel[-1]) + 1] if tsio.contiguous(sel) else arr[sel]
                pending.append(target.write(rows[f.path]))
            return pending

        def done(i: int, j: int) -> None:
            on_durable(nodes[i:j], staged.pop((i, j)))
            self.stats["main_rows_written"] += j - i
            self.phase("apply-batch")

        pipelined(shard_batches(nodes, int(self.shard_nodes[lv.key]), self.max_rows(lv)), stage, done)

    def group_rows(self, group: str, rows: np.ndarray) -> RowsFn:
        """rows_fn reading delta rows ``rows[i:j]`` of every field from ``group``."""
        def read(i: int, j: int) -> dict[str, np.ndarray]:
            futures = {f.path: self.array(group, f)[rows[i:j]].read() for f in stored_fields(self.layout)}
            return {path: fut.result() for path, fut in futures.items()}
        return read
