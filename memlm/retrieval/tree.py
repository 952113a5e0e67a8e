"""The cluster tree: centroids per level plus metadata, and its file format.

A tree file is an ``.npz`` (no pickles) holding ``centroids_<l>`` (float32 ``[k**l, dim]``) and
``counts_<l>`` (int64 ``[k**l]``, the fit points routed to each node) for l = 1..depth, and
``meta``: UTF-8 JSON with ``format``, ``version``, ``k``, ``depth``, ``dim``, ``embedder``,
``seed``, ``fit`` (the k-means settings), ``stats`` (per-level shares) and ``id``. The id is a
content hash of the structure and the centroids, so two trees with the same id route every text
the same way; data prepared with one tree can check it is trained or evaluated with that tree.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

FORMAT = "memlm-tree"
VERSION = 1


class TreeError(ValueError):
    """A tree file is missing, corrupt, or does not match what the caller expects."""


@dataclasses.dataclass
class Tree:
    """A balanced k-ary tree of centroids: ``centroids[l-1]`` is float32 ``[k**l, dim]``."""

    k: int
    depth: int
    dim: int
    embedder: str
    centroids: list[np.ndarray]
    counts: list[np.ndarray] = dataclasses.field(default_factory=list)
    stats: dict[str, Any] = dataclasses.field(default_factory=dict)
    seed: int = 0
    fit: dict[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        self.centroids = [np.ascontiguousarray(c, np.float32) for c in self.centroids]
        self.counts = [np.asarray(c, np.int64) for c in self.counts]
        _check_arrays(self, source="Tree")

    @property
    def id(self) -> str:
        """Content hash (16 hex digits) of k, depth, dim, embedder and the centroid bytes."""
        h = hashlib.sha256(json.dumps([self.k, self.depth, self.dim, self.embedder]).encode())
        for c in self.centroids:
            h.update(c.tobytes())
        return h.hexdigest()[:16]

    def meta(self) -> dict[str, Any]:
        return {"format": FORMAT, "version": VERSION, "k": self.k, "depth": self.depth, "dim": self.dim,
                "embedder": self.embedder, "seed": self.seed, "fit": self.fit, "stats": self.stats, "id": self.id}

    def save(self, path: str | os.PathLike) -> Path:
        """Write the tree atomically (temporary file, then rename); returns the path."""
        path = Path(path)
        arrays = {f"centroids_{i}": c for i, c in enumerate(self.centroids, start=1)}
        arrays.update({f"counts_{i}": c for i, c in enumerate(self.counts, start=1)})
        arrays["meta"] = np.frombuffer(json.dumps(self.meta(), sort_keys=True).encode(), np.uint8)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike, expect_dim: int | None = None, expect_embedder: str | None = None) -> Tree:
        """Read and verify a tree file; ``expect_*`` check it fits the embedder about to route with it."""
        path = Path(path)
        if not path.is_file():
            raise TreeError(f"tree file {path} does not exist")
        try:
            with np.load(path, allow_pickle=False) as z:
                arrays = {name: z[name] for name in z.files}
        except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
            raise TreeError(f"tree file {path} is corrupt or not a tree file: {e}") from e
        if "meta" not in arrays:
            raise TreeError(f"tree file {path}: missing field 'meta'")
        try:
            meta = json.load(io.BytesIO(arrays["meta"].tobytes()))
        except ValueError as e:
            raise TreeError(f"tree file {path}: field 'meta' is not valid JSON: {e}") from e
        for field in ("format", "version", "k", "depth", "dim", "embedder", "id"):
            if field not in meta:
                raise TreeError(f"tree file {path}: missing field {field!r}")
        if meta["format"] != FORMAT or meta["version"] != VERSION:
            raise TreeError(f"tree file {path}: field 'format' / 'version' = {meta['format']!r} / {meta['version']!r}, "
                            f"expected {FORMAT!r} / {VERSION}")
        depth = int(meta["depth"])
        for level in range(1, depth + 1):
            if f"centroids_{level}" not in arrays:
                raise TreeError(f"tree file {path}: missing field 'centroids_{level}' (depth = {depth})")
        try:
            tree = cls(k=int(meta["k"]), depth=depth, dim=int(meta["dim"]), embedder=str(meta["embedder"]),
                       centroids=[arrays[f"centroids_{i}"] for i in range(1, depth + 1)],
                       counts=[arrays[f"counts_{i}"] for i in range(1, depth + 1) if f"counts_{i}" in arrays],
                       stats=meta.get("stats", {}), seed=int(meta.get("seed", 0)), fit=meta.get("fit", {}))
        except TreeError as e:
            raise TreeError(f"tree file {path}: {e}") from e
        if tree.id != meta["id"]:
            raise TreeError(f"tree file {path} is corrupt: field 'id' = {meta['id']!r} but its centroids hash to "
                            f"{tree.id!r}")
        if expect_dim is not None and tree.dim != expect_dim:
            raise TreeError(f"tree file {path}: field 'dim' = {tree.dim}, but the embedder gives {expect_dim}-d "
                            f"vectors; refit the tree with this embedder")
        if expect_embedder is not None and tree.embedder != expect_embedder:
            raise TreeError(f"tree file {path}: field 'embedder' = {tree.embedder!r}, but the embedder in use is "
                            f"{expect_embedder!r}; refit the tree or set tree.embedder = {tree.embedder!r}")
        return tree


def _check_arrays(tree: Tree, source: str) -> None:
    if tree.k < 2 or tree.depth < 1 or tree.dim < 1:
        raise TreeError(f"{source}: k = {tree.k}, depth = {tree.depth}, dim = {tree.dim}: need k >= 2, depth >= 1, "
                        f"dim >= 1")
    if len(tree.centroids) != tree.depth:
        raise TreeError(f"{source}: {len(tree.centroids)} levels of centroids for depth = {tree.depth}")
    for level, c in enumerate(tree.centroids, start=1):
        if c.shape != (tree.k**level, tree.dim):
            raise TreeError(f"{source}: field 'centroids_{level}' has shape {c.shape}, expected "
                            f"{(tree.k**level, tree.dim)} for k = {tree.k}, dim = {tree.dim}")
        if not np.isfinite(c).all():
            raise TreeError(f"{source}: field 'centroids_{level}' holds non-finite values")
    for level, c in enumerate(tree.counts, start=1):
        if c.shape != (tree.k**level,):
            raise TreeError(f"{source}: field 'counts_{level}' has shape {c.shape}, expected {(tree.k**level,)}")
