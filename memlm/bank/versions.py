"""Bank versions and the write-ahead log: the manifest, the deltas, applying, recovery, rollback.

A version N exists once ``manifest.json`` names it (one atomic key write) with state
``complete``; its delta is the before-images (of the nodes it changed, as they were) and
after-images (as N leaves them) of every process's part, written *before* that commit. Applying
N copies its after-images into ``main`` (idempotent: a crash midway is redone on the next
writable open), and then N is marked ``applied`` and the deltas no kept version needs are
deleted. The full protocol, and what a crash at each point leaves, is in
:mod:`memlm.bank.store`'s docstring.

Why a module of its own: everything that makes a save crash-safe and an old version
restorable lives here, apart from how rows are stored (:mod:`memlm.bank.rows`), how a handle
reads a version (:mod:`memlm.bank.view`) and how processes coordinate (:mod:`memlm.bank.sync`);
the store's ``save`` only runs these steps in order, with barriers between them.
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Mapping

import numpy as np
import tensorstore as ts

from memlm.bank import tsio
from memlm.bank.layout import BankLayout, LevelLayout
from memlm.bank.rows import RowArrays, pipelined, stored_fields, vkey
from memlm.bank.view import VersionView

MANIFEST_KEY = "manifest.json"

NodeRowsFn = Callable[[np.ndarray], Mapping[str, np.ndarray]]  # sorted nodes -> every field of them


class VersionLog:
    """The manifest of one bank location and the write-ahead log operations over it.

    ``manifest`` is the parsed ``manifest.json``: ``{versions: [{version, state, dirty, parts}],
    next_version, rollback_to}``; ``keep`` is how many versions stay restorable.
    """

    def __init__(self, kv: ts.KvStore, arrays: RowArrays, layout: BankLayout, keep: int,
                 stats: collections.Counter, phase: Callable[[str], None]):
        self.kv, self.arrays, self.layout, self.keep = kv, arrays, layout, int(keep)
        self.stats, self.phase = stats, phase
        self.manifest: dict = {}
        self._background: list[ts.Future] = []  # garbage deletions still running

    # ---- the manifest --------------------------------------------------------------------------
    def read(self) -> dict | None:
        """(Re)read ``manifest.json``; None when it is missing."""
        self.manifest = tsio.read_json(self.kv, MANIFEST_KEY)
        return self.manifest

    def write(self) -> None:
        """Write ``manifest.json`` (one all-or-nothing key write)."""
        tsio.write_json(self.kv, MANIFEST_KEY, self.manifest)

    @property
    def versions(self) -> list[int]:
        """Restorable versions, oldest first (a pending rollback hides the versions it drops)."""
        cut = self.manifest.get("rollback_to")
        return [e["version"] for e in self.manifest["versions"] if cut is None or e["version"] <= cut]

    def entry(self, version: int) -> dict:
        """The manifest entry of ``version``."""
        return next(e for e in self.manifest["versions"] if e["version"] == version)

    def commit(self, version: int, parts: Mapping[str, list[int]]) -> None:
        """Name ``version`` complete in the manifest, with every part's row count per level:
        from this write on, the version exists (and as a whole)."""
        entry = {"version": version, "state": "complete", "dirty": {k: sum(v) for k, v in parts.items()},
                 "parts": dict(parts)}
        self.manifest["versions"].append(entry)
        self.manifest["next_version"] = version + 1
        self.write()

    def parts(self, version: int, lv: LevelLayout) -> list[tuple[str, np.ndarray]]:
        """``[(part suffix "p{i}/", its nodes)]`` of a committed version's delta at a level."""
        out = []
        for i, n in enumerate(self.entry(version).get("parts", {}).get(lv.key, [])):
            if n:
                part = f"p{i}/"
                nodes = self.arrays.array(f"before/{vkey(version)}/{lv.key}/{part}", "nodes").read().result()
                out.append((part, nodes.astype(np.int64)))
        return out

    # ---- writing and applying a delta ----------------------------------------------------------
    def write_delta(self, version: int, lv: LevelLayout, nodes: np.ndarray, rows_fn: NodeRowsFn, part: str,
                    view: VersionView) -> None:
        """Before- and after-images of ``nodes`` (this process's part) under ``before/vN/.../part`` and
        ``after/vN/.../part``, batch by batch."""
        before, after = (f"{g}/{vkey(version)}/{lv.key}/{part}" for g in ("before", "after"))
        main = f"main/{lv.key}/"
        n = nodes.size
        arrays = self.arrays
        arrays.create_group(before, lv, n, with_nodes=True)
        arrays.create_group(after, lv, n)
        arrays.array(before, "nodes").write(nodes.astype(np.int32)).result()
        shard = min(n, int(arrays.shard_nodes[lv.key]))
        step = max(shard, arrays.max_rows(lv) // shard * shard)
        fields = stored_fields(self.layout)

        def stage(i: int, j: int, txn: ts.Transaction) -> list:
            sel = nodes[i:j]
            was = np.flatnonzero(view.written[lv.key][sel])
            old = {f.path: arrays.array(main, f)[sel[was]].read() for f in fields if f.array} if was.size else {}
            rows = rows_fn(sel)
            pending = [arrays.array(after, f).with_transaction(txn)[i:j].write(rows[f.path]) for f in fields]
            pending.append(arrays.array(before, "count").with_transaction(txn)[i:j].write(view.count[lv.key][sel]))
            pending.append(arrays.array(before, "written").with_transaction(txn)[i:j].write(
                view.written[lv.key][sel]))
            for path, fut in old.items():
                pending.append(arrays.array(before, path).with_transaction(txn)[i + was].write(fut.result()))
            return pending

        def done(i: int, j: int) -> None:
            self.stats["delta_rows_written"] += j - i
            self.phase("delta-batch")

        pipelined([(i, min(n, i + step)) for i in range(0, n, step)], stage, done)

    def apply_version(self, version: int, lv: LevelLayout, view: VersionView, direct: NodeRowsFn | None = None,
                      share: tuple[int, int] = (0, 1)) -> None:
        """Apply version ``version``'s after-images of a level into ``main``: the zarr shards whose
        index modulo ``share[1]`` is ``share[0]`` (one process per key). With ``direct`` (a single
        process saving), the rows come straight from the devices instead of being read back."""
        parts = self.parts(version, lv)
        if not parts:
            return
        nodes = np.concatenate([n for _, n in parts])
        src = np.concatenate([np.full(n.size, i) for i, (_, n) in enumerate(parts)])
        row = np.concatenate([np.arange(n.size) for _, n in parts])
        order = np.argsort(nodes)
        nodes, src, row = nodes[order], src[order], row[order]
        shard_nodes = int(self.arrays.shard_nodes[lv.key])
        keep = (nodes // shard_nodes) % share[1] == share[0]
        nodes, src, row = nodes[keep], src[keep], row[keep]
        if not nodes.size:
            return
        groups = [f"after/{vkey(version)}/{lv.key}/{part}" for part, _ in parts]

        def rows_fn(i: int, j: int) -> Mapping[str, np.ndarray]:
            if direct is not None:
                return direct(nodes[i:j])
            out: dict[str, np.ndarray] = {}
            for g in np.unique(src[i:j]):
                sel = np.flatnonzero(src[i:j] == g)
                got = self.arrays.group_rows(groups[int(g)], row[i:j][sel])(0, sel.size)
                for path, value in got.items():
                    if path not in out:
                        out[path] = np.empty((j - i, *value.shape[1:]), value.dtype)
                    out[path][sel] = value
            return out

        self.arrays.write_main(lv, nodes, rows_fn, lambda sel, rows: view.note_written(lv, sel, rows))

    def mark_applied(self, version: int) -> None:
        """Mark ``version`` applied, keep the last ``keep`` versions and delete, in the background,
        the deltas nobody can need any more."""
        self.entry(version)["state"] = "applied"
        versions = self.manifest["versions"]
        dropped, kept = versions[:-self.keep], versions[-self.keep:]
        self.manifest["versions"] = kept
        self.write()
        # Garbage under version keys that are never written again (numbers only grow), so it is
        # deleted in the background; the first kept version's before-images restore nothing kept.
        self._background = [f for f in self._background if not f.done()]
        for v in [e["version"] for e in dropped] + ([kept[0]["version"]] if dropped else []):
            self._background.append(tsio.delete_prefix(self.kv, f"before/{vkey(v)}/", wait=False))
        self._background.append(tsio.delete_prefix(self.kv, f"after/{vkey(version)}/", wait=False))
        self.arrays.forget_deltas()

    def wait(self) -> None:
        """Wait for the background garbage deletions."""
        for future in self._background:
            future.result()
        self._background = []

    # ---- recovery, rollback, garbage -----------------------------------------------------------
    def recover(self, view: VersionView) -> None:
        """Finish what a crash interrupted: a pending rollback, or a complete but unapplied save."""
        if self.manifest.get("rollback_to") is not None:
            self.rollback(int(self.manifest["rollback_to"]), view)
        latest = self.manifest["versions"][-1]
        if latest["state"] == "complete":
            version = latest["version"]
            for lv in self.layout.levels:
                self.apply_version(version, lv, view)
            self.mark_applied(version)

    def rollback(self, target: int, view: VersionView) -> None:
        """Bring ``main`` back to ``target`` and forget the later versions (redone if interrupted)."""
        self.manifest["rollback_to"] = target
        self.write()
        view.build(self.manifest, target, self.parts)
        for lv in self.layout.levels:
            ov_nodes, ov_src, ov_row = view.overlay[lv.key]
            for g in np.unique(ov_src):
                mine = ov_src == g
                self.arrays.write_main(lv, ov_nodes[mine], self.arrays.group_rows(view.groups[int(g)], ov_row[mine]),
                                       lambda sel, rows, lv=lv: view.note_written(lv, sel, rows))
        self.manifest["versions"] = [e for e in self.manifest["versions"] if e["version"] <= target]
        self.manifest["rollback_to"] = None
        self.write()
        tsio.delete_prefix(self.kv, f"before/{vkey(target + 1)}", upto="before0")
        self.collect_garbage()

    def collect_garbage(self) -> None:
        """Delete after-images (all applied by now), before-images no kept version needs, and any
        delta the manifest does not name (an interrupted save)."""
        kept = [e["version"] for e in self.manifest["versions"]]
        tsio.delete_prefix(self.kv, "after/")
        tsio.delete_prefix(self.kv, "before/", upto=f"before/{vkey(kept[1])}" if len(kept) > 1 else None)
        tsio.delete_prefix(self.kv, f"before/{vkey(int(self.manifest['next_version']))}", upto="before0")
        self.arrays.forget_deltas()
