"""How sure a routing is: each text's distance to the centroids on its path, and its margin to siblings.

Greedy descent (``routing``) always returns a path, however far a text lies from every centroid.
These scores say how well a text fits the nodes it was routed to, for the prepare manifest (how
far training units lie from their nodes) and for the evaluation gate (:func:`gated`), which
sends a query that fits its nodes badly to the generic memory instead of a block it may not
belong to.

- ``distance[i, l-1]``: L2 distance from text i (L2-normalised, as routing does) to the centroid
  of its level-l node.
- ``margin[i, l-1]``: at level l, the distance to the nearest other child of the same parent
  minus ``distance[i, l-1]`` (>= 0 on a greedy path; small = the text nearly went elsewhere).

Plain numpy on the host: eval routes a batch of queries, prepare a chunk of units at a time.
"""

from __future__ import annotations

import numpy as np

GATES = ("off", "distance", "margin")
_CHUNK = 8192  # rows per step: bounds the [rows, k, dim] child buffer


def _unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def path_distances(tree, embeddings: np.ndarray, paths: np.ndarray) -> np.ndarray:
    """float32 ``[n, depth]``: distance of each text to the centroid of its node at each level."""
    x = _unit(embeddings)
    paths = np.asarray(paths)
    out = np.empty(paths.shape, np.float32)
    for level, cent in enumerate(tree.centroids):
        out[:, level] = np.linalg.norm(x - cent[paths[:, level]], axis=-1)
    return out


def path_scores(tree, embeddings: np.ndarray, paths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(distance, margin), each float32 ``[n, depth]`` (see the module docstring)."""
    paths = np.asarray(paths)
    n, k = len(paths), tree.k
    dist = np.empty(paths.shape, np.float32)
    margin = np.empty(paths.shape, np.float32)
    for a in range(0, n, _CHUNK):
        x = _unit(embeddings[a:a + _CHUNK])
        p = paths[a:a + _CHUNK]
        for level, cent in enumerate(tree.centroids):
            parent = p[:, level] // k
            children = cent[parent[:, None] * k + np.arange(k)]  # [rows, k, dim]
            d = np.linalg.norm(x[:, None, :] - children, axis=-1)
            own = p[:, level] % k
            rows = np.arange(len(p))
            dist[a:a + len(p), level] = d[rows, own]
            d[rows, own] = np.inf
            margin[a:a + len(p), level] = d.min(axis=1) - dist[a:a + len(p), level]
    return dist, margin


def gated(distance: np.ndarray, margin: np.ndarray, mode: str, threshold: float, level: int) -> np.ndarray:
    """bool ``[n]``: the texts whose routing is not trusted at ``level`` (1-based).

    ``distance``: farther than ``threshold`` from the level's node centroid; ``margin``: a
    sibling less than ``threshold`` farther than the text's own node; ``off``: none.
    """
    if mode not in GATES:
        raise ValueError(f"gate mode {mode!r}: choose from {', '.join(GATES)}")
    n = np.shape(distance)[0]
    if mode == "off":
        return np.zeros(n, bool)
    if not 1 <= level <= np.shape(distance)[1]:
        raise ValueError(f"gate level {level}: the tree has levels 1..{np.shape(distance)[1]}")
    if mode == "distance":
        return np.asarray(distance)[:, level - 1] > threshold
    return np.asarray(margin)[:, level - 1] < threshold
