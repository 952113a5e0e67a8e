"""Routing agreement: does a probe's retrieval key route to where its training documents went?

A probe that names its training documents (``documents``) or the entity they are about
(``entity``, matched against the documents' ``data.entity_field`` field, see ``probes.py``) has
*target units*: the prepared units (documents, or windows of them) of those documents, each with
the leaf prepare routed it to. At level l the probe's *majority node* is the level-l node that
holds most of its target units (ties: the lowest node index); the probe *agrees* at level l when
its retrieval key routes to that node. The leaf agreement is the agreement at the deepest level.

Reported per frequency bucket and overall: the share of probes that agree at each level, and the
*concentration*: the mean share of a probe's target units that lie in its majority node (how
much of the knowledge one path could reach at best). Probes without targets are left out.

Node indices are global per level and nested (the children of node i are ``k*i .. k*i + k - 1``),
so a leaf's level-l ancestor is ``leaf // k**(depth - l)``: leaf counts are all that is needed.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from memlm.eval.probes import Probe, ProbeFileError, bucket_order

__all__ = ["TrainingLeaves", "format_agreement", "majority_nodes", "routing_agreement"]

Targets = dict[int, int]  # leaf -> target units in it


class TrainingLeaves:
    """Where prepare routed the training documents of a data directory: target leaves per probe."""

    def __init__(self, data_dir: str | Path, manifest: dict, embed_window: int | None = None):
        self.data_dir = Path(data_dir)
        tree = manifest["tree"]
        self.k, self.depth = int(manifest["k"]), int(manifest["depth"])
        self.unit = tree.get("embed_unit", "document")
        self.window = tree.get("embed_window") or embed_window
        self.n_documents = int(manifest["documents"]["training"])
        self.entity_file = (manifest.get("entities") or {}).get("path")
        self._paths = self._first_unit = self._entities = None

    def _leaves_of_units(self, lo: int, hi: int) -> np.ndarray:
        if self._paths is None:
            self._paths = np.load(self.data_dir / "paths.npy", mmap_mode="r")
        return np.asarray(self._paths[lo:hi, -1], np.int64)

    def _unit_range(self, doc: int) -> tuple[int, int]:
        if self.unit == "document":
            return doc, doc + 1
        if self._first_unit is None:
            if not self.window:
                raise ValueError("the manifest says units are windows but not their size: pass embed_window")
            lengths = np.diff(np.load(self.data_dir / "doc_offsets.npy"))
            per_doc = np.maximum(1, -(-lengths // int(self.window)))
            self._first_unit = np.concatenate([[0], np.cumsum(per_doc)])
        return int(self._first_unit[doc]), int(self._first_unit[doc + 1])

    def of_documents(self, ids: Sequence[int]) -> Targets:
        """Target units per leaf of these training documents (ids checked against the corpus)."""
        out: Targets = {}
        for d in dict.fromkeys(ids):
            if not 0 <= d < self.n_documents:
                raise ValueError(f"training document {d} does not exist (the data has {self.n_documents})")
            for leaf in self._leaves_of_units(*self._unit_range(d)).tolist():
                out[leaf] = out.get(leaf, 0) + 1
        return out

    def of_entity(self, name: str) -> Targets | None:
        """Target units per leaf of the documents whose entity field is ``name`` (None: not recorded)."""
        if self.entity_file is None:
            return None
        if self._entities is None:
            self._entities = json.loads((self.data_dir / self.entity_file).read_text(encoding="utf-8"))["leaves"]
        per = self._entities.get(name)
        return None if per is None else {int(leaf): int(c) for leaf, c in per.items()}

    @property
    def has_entities(self) -> bool:
        return self.entity_file is not None

    def of_probes(self, probes: Sequence[Probe], where: str = "probes") -> list[Targets | None]:
        """Each probe's targets: its ``documents`` if given, else its ``entity``, else None."""
        out: list[Targets | None] = []
        for i, p in enumerate(probes):
            try:
                if p.documents is not None:
                    out.append(self.of_documents(p.documents))
                elif p.entity is not None:
                    out.append(self.of_entity(p.entity))
                else:
                    out.append(None)
            except ValueError as e:
                raise ProbeFileError(f"{where}: probe {i + 1} ({p.prompt!r}): {e}") from None
        return out


def majority_nodes(targets: Targets, k: int, depth: int) -> tuple[np.ndarray, np.ndarray]:
    """(node int64 ``[depth]``, share float ``[depth]``): per level the node with most target units
    (ties: the lowest index) and the share of the target units it holds."""
    leaves = np.array(sorted(targets), np.int64)
    counts = np.array([targets[lf] for lf in leaves.tolist()], np.float64)
    nodes, shares = np.empty(depth, np.int64), np.empty(depth, np.float64)
    for level in range(1, depth + 1):
        anc = leaves // k ** (depth - level)
        uniq, inv = np.unique(anc, return_inverse=True)
        per = np.bincount(inv, weights=counts)
        best = int(np.argmax(per))  # np.unique sorts: the first maximum is the lowest node index
        nodes[level - 1], shares[level - 1] = uniq[best], per[best] / counts.sum()
    return nodes, shares


def _summary(hits: np.ndarray, shares: np.ndarray, gated: np.ndarray | None) -> dict[str, Any]:
    depth = hits.shape[1]
    out: dict[str, Any] = {
        "n": int(len(hits)),
        "leaf": float(hits[:, -1].mean()),
        "levels": {str(lv): float(hits[:, lv - 1].mean()) for lv in range(1, depth + 1)},
        "concentration": {str(lv): float(shares[:, lv - 1].mean()) for lv in range(1, depth + 1)},
    }
    if gated is not None:
        out["gated"] = float(gated.mean())
    return out


def routing_agreement(paths: np.ndarray, targets: Sequence[Targets | None], buckets: Sequence[str | None], k: int,
                      gated: np.ndarray | None = None) -> dict[str, Any] | None:
    """Agreement of routed ``paths`` ``[n, depth]`` with each probe's majority nodes, overall and per bucket.

    Returns ``{"n", "leaf", "levels": {"1": share, ...}, "concentration": {...}, "gated"?,
    "by_bucket": {label: {same keys}}}`` over the probes with targets, or None when none has any.
    ``gated`` (bool ``[n]``) adds the share of those probes the confidence gate sent to the generic memory.
    """
    paths = np.asarray(paths)
    keep = [i for i, t in enumerate(targets) if t]
    if not keep:
        return None
    depth = paths.shape[1]
    majority = [majority_nodes(targets[i], k, depth) for i in keep]
    hits = np.stack([paths[i] == m[0] for i, m in zip(keep, majority, strict=True)])
    shares = np.stack([m[1] for m in majority])
    g = None if gated is None else np.asarray(gated, bool)[keep]
    result = _summary(hits, shares, g)
    labels = [buckets[i] for i in keep]
    result["by_bucket"] = {}
    for label in bucket_order(b for b in labels if b is not None):
        sel = np.array([b == label for b in labels])
        result["by_bucket"][label] = _summary(hits[sel], shares[sel], None if g is None else g[sel])
    return result


def format_agreement(agreement: dict[str, Any], title: str = "routing agreement") -> str:
    """A text table: per bucket and overall, the agreeing share at each level, the leaf's concentration."""
    depth = len(agreement["levels"])
    head = ["bucket", "n", *[f"level {lv}" for lv in range(1, depth + 1)], "in leaf"]
    if "gated" in agreement:
        head.append("gated")
    rows = [[b, r] for b, r in agreement["by_bucket"].items()] + [["all", agreement]]
    lines = [f"{title} (share of probes routed to the node holding most of their documents; "
             f"'in leaf': share of their units in that leaf)", "  ".join(f"{h:>9}" for h in head)]
    for label, r in rows:
        cells = [str(label), str(r["n"]), *[f"{100 * r['levels'][str(lv)]:.1f}%" for lv in range(1, depth + 1)],
                 f"{100 * r['concentration'][str(depth)]:.1f}%"]
        if "gated" in r:
            cells.append(f"{100 * r['gated']:.1f}%")
        lines.append("  ".join(f"{c:>9}" for c in cells))
    return "\n".join(lines)
