"""Greedy nearest-centroid descent in plain numpy: what a routing proxy needs next to the embedder.

It computes what ``memlm.retrieval.routing`` computes (same float32 maths: rows L2-normalised,
squared distances up to ``|x|^2`` as ``|c|^2 - 2 x.c``, the k children of the node taken above),
without jax, so a router serving an exported bank imports numpy only. Depends on nothing in memlm.
"""

from __future__ import annotations

import numpy as np


def descend(centroids: list[np.ndarray], k: int, embeddings: np.ndarray) -> np.ndarray:
    """Paths int32 ``[n, len(centroids)]``: at every level the nearest of the k children of the node above."""
    x = np.asarray(embeddings, np.float32)
    if x.ndim != 2 or not np.isfinite(x).all():
        raise ValueError(f"embeddings must be a finite [n, dim] array, got shape {x.shape}")
    x = x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), np.float32(1e-12))
    parent = np.zeros(len(x), np.int64)
    out = []
    for cent in centroids:
        cent = np.asarray(cent, np.float32)
        sqnorm = np.sum(np.square(cent, dtype=np.float64), -1).astype(np.float32)
        children = parent[:, None] * k + np.arange(k)
        dots = np.einsum("nd,nkd->nk", x, cent[children])
        dist = sqnorm[children] - np.float32(2.0) * dots
        parent = children[np.arange(len(x)), np.argmin(dist, axis=-1)]
        out.append(parent)
    return np.stack(out, axis=1).astype(np.int32) if out else np.zeros((len(x), 0), np.int32)


def adapter_name(path: np.ndarray | list[int], levels: int, prefix: str = "path") -> str:
    """The adapter of a path: its first ``levels`` node ids (the levels that hold memory), e.g. ``path-3-14``."""
    return "-".join([prefix, *(str(int(n)) for n in list(path)[:levels])])
