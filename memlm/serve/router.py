"""The router of a served bank: a text -> the name of its path's adapter.

``memlm export RUN --serve --out DIR`` writes ``DIR/router/``::

    router.json      the tree (k, depth, dim, id), the embedder (name, dtype, batch, max tokens), the
                     run's routing settings (``eval.route_*``), how many levels name an adapter, and
                     the generic adapter (or null)
    centroids.npz    ``centroids_{l}``: float32 ``[k**l, dim]`` per level

A routing proxy embeds the text with the named embedder and descends the tree with
:func:`memlm.serve.descent.descend` (numpy only); ``memlm route --serve DIR --text TEXT`` does both
and prints the adapter name. With ``eval.route_gate`` on, texts the gate does not trust get the
generic adapter, as ``memlm eval``'s ``fetched`` gives them the generic memory.
"""

from __future__ import annotations

import json
import os
import types
from pathlib import Path
from typing import Any

import numpy as np

from memlm.serve.descent import adapter_name, descend

FORMAT = "memlm-serve-router"
VERSION = 1
ROUTE_KEYS = ("route_gate", "route_gate_threshold", "route_gate_level", "route_descent", "route_beam")


class RouterError(ValueError):
    """A router folder is missing or malformed."""


def write_router(out: Path, tree: Any, cfg: Any, embed_dtype: str, name_levels: int, generic: str | None) -> dict:
    """Write ``out/router.json`` and ``out/centroids.npz`` for a tree; returns the JSON."""
    out.mkdir(parents=True, exist_ok=True)
    np.savez(out / "centroids.npz", **{f"centroids_{i}": c for i, c in enumerate(tree.centroids, start=1)})
    doc = {"format": FORMAT, "version": VERSION, "k": tree.k, "depth": tree.depth, "dim": tree.dim,
           "tree_id": tree.id,
           "embedder": {"name": tree.embedder, "dtype": embed_dtype, "batch": int(cfg.tree.embed_batch),
                        "max_tokens": int(cfg.tree.embed_max_tokens)},
           "route": {k: cfg.eval[k] for k in ROUTE_KEYS}, "name_levels": int(name_levels), "prefix": "path",
           "generic": generic, "adapters": "adapters"}
    (out / "router.json").write_text(json.dumps(doc, indent=2) + "\n")
    return doc


class Router:
    """A loaded router folder: ``paths(embeddings)`` and ``names(texts)``."""

    def __init__(self, folder: str | os.PathLike):
        folder = Path(folder)
        if (folder / "router").is_dir():
            folder = folder / "router"
        if not (folder / "router.json").is_file():
            raise RouterError(f"{folder} holds no router.json (write one with `memlm export RUN --serve --out DIR`)")
        self.doc = json.loads((folder / "router.json").read_text())
        if self.doc.get("format") != FORMAT:
            raise RouterError(f"{folder / 'router.json'}: field 'format' = {self.doc.get('format')!r}, not {FORMAT!r}")
        with np.load(folder / "centroids.npz") as z:
            self.centroids = [z[f"centroids_{i}"] for i in range(1, int(self.doc["depth"]) + 1)]
        self.k = int(self.doc["k"])
        self._embedder = None

    def paths(self, embeddings: np.ndarray) -> np.ndarray:
        """Greedy paths int32 ``[n, depth]``."""
        return descend(self.centroids, self.k, embeddings)

    def embed(self, texts: list[str]) -> np.ndarray:
        """Embeddings of texts with the router's embedder (memlm's, as the training documents were embedded)."""
        if self._embedder is None:
            import ml_collections

            from memlm.retrieval import get_embedder

            e = self.doc["embedder"]
            cfg = ml_collections.ConfigDict({"tree": {"embedder": e["name"], "embed_dtype": e["dtype"],
                                                      "embed_batch": e["batch"], "embed_max_tokens": e["max_tokens"]}})
            self._embedder = get_embedder(cfg)
        return self._embedder.embed(texts)

    def gated(self, embeddings: np.ndarray, paths: np.ndarray) -> np.ndarray:
        """bool ``[n]``: the texts ``eval.route_gate`` sends to the generic adapter (none when off)."""
        route = self.doc["route"]
        if route["route_gate"] == "off" or not self.doc.get("generic"):
            return np.zeros(len(paths), bool)
        from memlm.retrieval.confidence import gated, path_scores

        tree = types.SimpleNamespace(k=self.k, centroids=self.centroids)
        distance, margin = path_scores(tree, np.asarray(embeddings, np.float32), paths)
        return gated(distance, margin, route["route_gate"], float(route["route_gate_threshold"]),
                     int(route["route_gate_level"]))

    def names(self, texts: list[str]) -> list[str]:
        """The adapter of each text."""
        emb = self.embed(texts)
        paths = self.paths(emb)
        use_generic = self.gated(emb, paths)
        levels, prefix = int(self.doc["name_levels"]), self.doc.get("prefix", "path")
        return [self.doc["generic"] if g else adapter_name(p, levels, prefix)
                for p, g in zip(paths, use_generic, strict=True)]


def route_cli(serve_dir: str | os.PathLike, texts: list[str]) -> list[str]:
    """The ``memlm route --serve DIR --text TEXT`` verb: print each text's adapter name."""
    names = Router(serve_dir).names(list(texts))
    for name in names:
        print(name)
    return names
