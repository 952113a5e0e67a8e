"""What routing did with the corpus, accumulated chunk by chunk while prepare routes it.

Per leaf: the units (documents, or windows of them) routed there and the distinct documents with
at least one unit there. Per level: the mean distance of units to the centroid of their node and
a histogram of those distances (fixed bins over [0, 2], the range of distances between a unit
vector and a centroid of unit vectors), from which quantiles are read. Nothing grows with the
corpus: units come in prepare's order (a document's units are contiguous), so a document seen
in two chunks is recognised by the pairs carried over from the last one.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from memlm.retrieval.confidence import path_distances

BINS = 400  # distance histogram bins over [0, 2]: 0.005 wide
QUANTILES = (0.5, 0.9, 0.99)


class RouteStats:
    """Accumulates :meth:`add` calls (a chunk of units in order); :meth:`result` is JSON-ready."""

    def __init__(self, tree):
        self.tree = tree
        self.leaves = tree.k ** tree.depth
        self.units = np.zeros(self.leaves, np.int64)
        self.documents = np.zeros(self.leaves, np.int64)
        self.hist = np.zeros((tree.depth, BINS), np.int64)
        self.dist_sum = np.zeros(tree.depth, np.float64)
        self.n = 0
        self._carry = np.zeros(0, np.int64)  # (doc, leaf) pairs of the last document of the previous chunk

    def add(self, paths: np.ndarray, embeddings: np.ndarray | None, docs: np.ndarray) -> None:
        """One chunk: its paths ``[m, depth]``, unit embeddings ``[m, dim]`` (None: no distances), documents."""
        paths, docs = np.asarray(paths), np.asarray(docs, np.int64)
        if not len(paths):
            return
        leaf = paths[:, -1].astype(np.int64)
        self.units += np.bincount(leaf, minlength=self.leaves)
        pairs = np.unique(docs * self.leaves + leaf)
        fresh = pairs[~np.isin(pairs, self._carry)]
        self.documents += np.bincount(fresh % self.leaves, minlength=self.leaves)
        self._carry = pairs[pairs // self.leaves == docs[-1]]
        if embeddings is not None:
            dist = path_distances(self.tree, embeddings, paths)
            self.dist_sum += dist.sum(0, dtype=np.float64)
            bins = np.clip((dist * (BINS / 2)).astype(np.int64), 0, BINS - 1)
            for level in range(self.tree.depth):
                self.hist[level] += np.bincount(bins[:, level], minlength=BINS)
            self.n += len(paths)

    def save(self, path) -> None:
        """The accumulated counts (not the carry: a saved part ends with whole documents)."""
        np.savez(path, units=self.units, documents=self.documents, hist=self.hist, dist_sum=self.dist_sum,
                 n=np.int64(self.n))

    def merge(self, path) -> None:
        """Add the counts of a part saved by :meth:`save` (its documents are not in this one)."""
        with np.load(path) as part:
            self.units += part["units"]
            self.documents += part["documents"]
            self.hist += part["hist"]
            self.dist_sum += part["dist_sum"]
            self.n += int(part["n"])

    def result(self) -> dict[str, Any]:
        out: dict[str, Any] = {"leaf_units": self.units.tolist(), "leaf_documents": self.documents.tolist()}
        if self.n:
            levels = {}
            for level in range(self.tree.depth):
                cum = np.cumsum(self.hist[level])
                # the upper edge of the bin holding the q-quantile unit: within 0.005 above the true value
                q = {f"p{round(100 * x)}": float((np.searchsorted(cum, x * self.n) + 1) * 2 / BINS)
                     for x in QUANTILES}
                levels[str(level + 1)] = {"mean_distance": float(self.dist_sum[level] / self.n), "distance": q}
            out["distances"] = {"units": int(self.n), "levels": levels}
        return out
