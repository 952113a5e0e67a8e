"""The training data of an edit: chosen leaves re-packed without some documents, new sequences copied.

Re-packing uses prepare's own packer (:func:`memlm.data.units.pack_leaf`) on the units prepare kept
(their tokens and paths), so a leaf re-packed with nothing excluded gives the very sequences prepare
wrote; without the forgotten documents it gives what prepare would have written had they never been
in the corpus. Nothing is re-embedded or re-routed. The result is a data directory the training
loader reads like any other (sequences in leaf order, a per-leaf histogram), under the edit's folder.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from memlm.data.packing import group_by_leaf
from memlm.data.records import ShardWriter, write_json
from memlm.data.units import PackSpec, pack_leaf
from memlm.edit.documents import RunDocuments


class _Records:
    """A writer that keeps records in memory (one leaf's, before a replay share is drawn)."""

    def __init__(self):
        self.records: list[bytes] = []

    def write(self, record: bytes) -> None:
        self.records.append(record)


def leaf_parts(docs: RunDocuments, leaves: np.ndarray, exclude: np.ndarray) -> dict[int, list[dict[str, Any]]]:
    """Per chosen leaf, the payloads of its units from every source (prepare's payload form), without the
    units of ``exclude`` documents. ``leaves``: bool per leaf."""
    out: dict[int, list[dict[str, Any]]] = {}
    n_leaves = len(leaves)
    first_unit, source = 0, None
    for order, u in enumerate(docs.units()):
        if u.source is not source:  # unit ids count from 0 in each source, as prepare numbers them
            first_unit, source = 0, u.source
        paths = u.paths()
        spans = np.load(u.encode_dir / "spans.npz")
        offsets = np.load(u.encode_dir / "doc_offsets.npy")
        keep = leaves[paths[:, -1]] & ~np.isin(u.documents(), exclude)
        base, first_unit = first_unit, first_unit + len(paths)
        for lf, members in group_by_leaf(np.where(keep, paths[:, -1], n_leaves), n_leaves + 1):
            if lf == n_leaves or len(members) == 0:
                continue
            start, stop = spans["start"][members], spans["stop"][members]
            out.setdefault(lf, []).append({
                "leaf": lf, "unit": u.index, "root": os.fspath(u.source.data_dir), "order": order,
                "path": paths[members[0]].copy(), "ids": members.astype(np.int64) + base,
                "lengths": (stop - start).astype(np.int64), "ends": spans["ends"][members].copy(),
                "first_token": (offsets[spans["doc"][members]] + start).astype(np.int64)})
    return out


def _spec(docs: RunDocuments, n_leaves: int) -> PackSpec:
    tok = docs.manifest["tokenizer"]
    return PackSpec(root=os.fspath(docs.data_dir), key="", leaves=n_leaves, ranges=1,
                    seq_len=int(docs.manifest["seq_len"]), records_per_shard=4096, eot_id=int(tok["eot_id"]),
                    token_bytes=2 if int(tok["vocab_size"]) <= 65536 else 4)


def _leaf_records(data_dir: Path) -> tuple[Any, np.ndarray]:
    """(record source, first sequence of each leaf + total) of a prepared data directory."""
    import grain

    from memlm.data.records import read_manifest

    man = read_manifest(data_dir)
    source = grain.sources.ArrayRecordDataSource([os.fspath(data_dir / s) for s in man["shards"]])
    counts = np.asarray(man["leaf_histogram"]["sequences"], np.int64)
    return source, np.concatenate([[0], np.cumsum(counts)])


def build(out: Path, docs: RunDocuments, *, repack: np.ndarray, exclude: np.ndarray, new: Path | None = None,
          replay: float = 1.0, seed: int = 0) -> dict[str, Any]:
    """Write the edit's training data into ``out``; returns its manifest.

    ``repack`` (bool per leaf): leaves re-packed from every source without ``exclude``'s documents;
    ``new``: a prepared data directory whose sequences are all taken (``memlm learn``'s new documents).
    With ``new``, a re-packed leaf contributes the share ``replay`` (in [0, 1]) of its old sequences, drawn
    at random; without, all of them.
    """
    n_leaves = len(repack)
    spec = _spec(docs, n_leaves)
    parts = leaf_parts(docs, repack, exclude) if repack.any() else {}
    new_src, new_starts = _leaf_records(new) if new is not None else (None, None)
    out.mkdir(parents=True, exist_ok=True)
    counts = np.zeros(n_leaves, np.int64)
    n_new = n_old = 0
    with ShardWriter(out / "shards", spec.records_per_shard, prefix="edit") as writer:
        for lf in range(n_leaves):
            fresh = []
            if new_src is not None and new_starts[lf + 1] > new_starts[lf]:
                fresh = new_src.__getitems__(list(range(int(new_starts[lf]), int(new_starts[lf + 1]))))
            old: list[bytes] = []
            if lf in parts:
                buf = _Records()
                pack_leaf(buf, lf, parts[lf], spec)
                old = buf.records
                if new is not None and replay < 1.0:
                    want = round(replay * len(old))
                    pick = np.sort(np.random.default_rng([seed, lf]).choice(len(old), size=want, replace=False))
                    old = [old[i] for i in pick]
            for r in list(fresh) + old:
                writer.write(r)
            counts[lf] = len(fresh) + len(old)
            n_new, n_old = n_new + len(fresh), n_old + len(old)
        shards = writer.close()
    manifest = {"kind": "edit", "seq_len": spec.seq_len, "k": int(docs.manifest["k"]),
                "depth": int(docs.manifest["depth"]), "sequences": int(counts.sum()),
                "shards": [f"shards/{s}" for s in shards], "leaf_histogram": {"sequences": counts.tolist()},
                "tokenizer": docs.manifest["tokenizer"], "tree": {"id": docs.manifest["tree"]["id"]},
                "new_sequences": n_new, "repacked_sequences": n_old}
    write_json(out / "manifest.json", manifest)
    return manifest
