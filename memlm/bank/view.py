"""The view: what a bank handle opened at one version reads.

A handle at version M reads ``main`` overlaid with, for every node changed after M, its
before-image from the first later version that changed it (or, when M is a complete but not yet
applied save, its after-image); a node never written reads as its initial block, recomputed
from (seed, level, array, node) (``bank.init``), with zero moments and counter.

Why a module of its own: the per-node counters, written flags and the overlay are the one
thing every read consults (row reads, block reads, the device load, the before-images of a
save), and they follow from the manifest alone. Building them needs only the delta parts of
each version (a callable from :mod:`memlm.bank.versions`), so this module does not import it.
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Mapping

import jax.numpy as jnp
import numpy as np

from memlm.bank import tsio
from memlm.bank.init import init_rows
from memlm.bank.layout import BankLayout, LevelLayout
from memlm.bank.rows import Field, RowArrays, vkey

PartsFn = Callable[[int, LevelLayout], list[tuple[str, np.ndarray]]]  # (version, level) -> [(part, nodes)]


class VersionView:
    """Per-node counters and written flags of one version, the overlay of the nodes whose rows
    live in a delta, and the reads through them."""

    def __init__(self, arrays: RowArrays, layout: BankLayout, seed: int, stats: collections.Counter):
        self.arrays, self.layout, self.seed, self.stats = arrays, layout, seed, stats
        self.count: dict[str, np.ndarray] = {}
        self.written: dict[str, np.ndarray] = {}
        self.overlay: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}  # key -> (nodes, group, row)
        self.groups: list[str] = []

    def build(self, manifest: Mapping, target: int, parts: PartsFn) -> None:
        """Per-node counters and written flags of version ``target``, and the overlay that maps
        nodes changed after it (or by an unapplied latest save) to the delta rows holding them."""
        entries = [e for e in manifest["versions"] if e["version"] > target]
        groups: list[str] = []
        latest = manifest["versions"][-1]
        unapplied = latest["version"] == target and latest["state"] == "complete"
        for lv in self.layout.levels:
            main = f"main/{lv.key}/"
            count = self.arrays.array(main, "count").read().result()
            written = self.arrays.array(main, "written").read().result()
            seen = np.zeros(lv.nodes, bool)
            ov_nodes, ov_src, ov_row = [], [], []
            sources = [(e["version"], "before") for e in entries]
            if unapplied:
                sources = [(target, "after")]
            for version, kind in sources:
                for part, nodes in parts(version, lv):
                    fresh = np.flatnonzero(~seen[nodes])
                    seen[nodes] = True
                    group = f"{kind}/{vkey(version)}/{lv.key}/{part}"
                    groups.append(group)
                    ov_nodes.append(nodes[fresh])
                    ov_src.append(np.full(fresh.size, len(groups) - 1, np.int32))
                    ov_row.append(fresh)
                    count[nodes[fresh]] = self.arrays.array(group, "count")[fresh].read().result()
                    written[nodes[fresh]] = self.arrays.array(group, "written")[fresh].read().result()
            if ov_nodes:
                nodes = np.concatenate(ov_nodes)
                order = np.argsort(nodes)
                self.overlay[lv.key] = (nodes[order], np.concatenate(ov_src)[order], np.concatenate(ov_row)[order])
            else:
                self.overlay[lv.key] = (np.zeros(0, np.int64), np.zeros(0, np.int32), np.zeros(0, np.int64))
            self.count[lv.key], self.written[lv.key] = count, written
        self.groups = groups

    def note_written(self, lv: LevelLayout, nodes: np.ndarray, rows: Mapping[str, np.ndarray]) -> None:
        """Rows of ``nodes`` just written into ``main``: their counters and flags (once built)."""
        if lv.key in self.count:
            self.count[lv.key][nodes] = rows["count"]
            self.written[lv.key][nodes] = rows["written"]

    def plan(self, lv: LevelLayout, field: Field, nodes: np.ndarray) -> Callable[[], np.ndarray]:
        """Issue the reads for ``field`` of ``nodes`` (sorted) in this view; returns the finisher."""
        if field.kind == "count":
            return lambda: self.count[lv.key][nodes].copy()
        if field.kind == "written":
            return lambda: self.written[lv.key][nodes].copy()
        written = self.written[lv.key][nodes].astype(bool)
        ov_nodes, ov_src, ov_row = self.overlay[lv.key]
        pos = np.searchsorted(ov_nodes, nodes)
        hit = (pos < ov_nodes.size) & (ov_nodes[np.minimum(pos, max(ov_nodes.size - 1, 0))] == nodes) \
            if ov_nodes.size else np.zeros(nodes.size, bool)
        futures = []
        from_main = np.flatnonzero(written & ~hit)
        if from_main.size:
            arr = self.arrays.array(f"main/{lv.key}/", field)
            sel = nodes[from_main]
            src = arr[int(sel[0]):int(sel[-1]) + 1] if tsio.contiguous(sel) else arr[sel]
            futures.append((from_main, src.read()))
        from_delta = np.flatnonzero(written & hit)
        for g in np.unique(ov_src[pos[from_delta]]):
            local = from_delta[ov_src[pos[from_delta]] == g]
            arr = self.arrays.array(self.groups[int(g)], field)
            futures.append((local, arr[ov_row[pos[local]]].read()))
        self.stats["rows_read"] += int(from_main.size + from_delta.size)
        fresh = np.flatnonzero(~written)

        def finish() -> np.ndarray:
            shape = field.row_shape(self.layout, lv)
            out = np.zeros((nodes.size, *shape), jnp.dtype(field.dtype(self.layout)))
            for where, fut in futures:
                out[where] = fut.result()
            if field.kind == "params" and fresh.size:
                out[fresh] = init_rows(self.layout, self.seed, lv.level, field.array, nodes[fresh])
            return out

        return finish
