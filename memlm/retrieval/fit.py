"""Top-down balanced hierarchical k-means: embeddings -> Tree (docs/paper.md §3.1).

Level by level: every point carries the index of its node at the level above; the nodes of a
level are fitted together in vmapped groups (``kmeans.fit_nodes``), then every point is routed one
level down with the routing code itself (``routing.descend_levels``), so the fit statistics count
exactly the nodes that ``route`` gives the same points.

Scale: the points are streamed (an ``np.memmap`` works) and never held twice; per level the host
holds one int32 node index per point, a sort order, and one group of node pools (at most
``POOL_BYTES``). A group's per-step batches total about ``group_bytes``, which keeps the Lloyd
steps of small nodes inside the CPU cache. Pools are padded to a power of two, so a level has a
few shapes, hence a few compilations, shared by all groups (and levels) of equal shape. Work per
level is O(steps * min(n, k**(l-1) * steps * batch) * k * dim); memory never grows with n squared.
"""

from __future__ import annotations

import math
import time

import numpy as np

from memlm.retrieval.kmeans import fit_nodes
from memlm.retrieval.routing import descend_levels
from memlm.retrieval.tree import Tree

GROUP_BYTES = 16 * 2**20  # one step's batches of a vmapped group: small enough to stay in cache on a CPU
POOL_BYTES = 512 * 2**20  # node pools of a vmapped group held on the host and device at once
MAX_GROUP = 4096


def _padded_len(m: int) -> int:
    """Pool rows padded to a power of two (at least 16): few distinct shapes, so few compilations."""
    return max(16, 1 << (max(1, int(m)) - 1).bit_length())


def _pow2_floor(x: int) -> int:
    return 1 << (max(1, x).bit_length() - 1)


def _gather_rows(embeddings: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """L2-normalised float32 rows ``embeddings[idx]``; a memmap is read in sorted row order."""
    flat = idx.ravel()
    if isinstance(embeddings, np.memmap):
        perm = np.argsort(flat, kind="stable")
        rows = np.empty((flat.size, embeddings.shape[1]), np.float32)
        rows[perm] = embeddings[flat[perm]]
    else:
        rows = np.take(embeddings, flat, axis=0).astype(np.float32, copy=False)
    norm = np.sqrt(np.einsum("nd,nd->n", rows, rows))
    if not np.isfinite(norm).all():
        raise ValueError("fit_tree: the embeddings hold non-finite values (NaN or inf)")
    rows *= (1.0 / np.maximum(norm, 1e-12))[:, None]
    return rows.reshape(*idx.shape, embeddings.shape[1])


def _fit_level(embeddings, order, starts, pool_len, parent_centroids, *, level, k, steps, batch, balance_factor,
               seed, group_bytes) -> np.ndarray:
    """Centroids ``[n_parents * k, dim]`` of one level; node p's children go to rows ``p*k .. p*k+k-1``."""
    n_parents, dim = len(pool_len), embeddings.shape[1]
    rng = np.random.default_rng([seed, level])
    u_init = rng.random((n_parents, k), np.float32)  # k-means++ draws of node p: row p, whatever the grouping
    shifts = rng.integers(0, np.iinfo(np.int32).max, (n_parents, steps), np.int32)
    out = np.empty((n_parents * k, dim), np.float32)
    padded = np.array([_padded_len(m) for m in pool_len])
    pending = None

    def collect(pending):
        nodes, result = pending
        out[(nodes[:, None] * k + np.arange(k)).ravel()] = np.asarray(result)[: len(nodes)].reshape(-1, dim)

    for size in sorted(set(padded.tolist()), reverse=True):
        nodes_of_size = np.nonzero(padded == size)[0]
        cap = min(MAX_GROUP, _pow2_floor(group_bytes // (min(size, batch) * dim * 4)),
                  _pow2_floor(POOL_BYTES // (size * dim * 4)))
        group = min(cap, 1 << (len(nodes_of_size) - 1).bit_length())  # one shape per pool size: one compilation
        for g0 in range(0, len(nodes_of_size), group):
            nodes = nodes_of_size[g0 : g0 + group]
            idx = np.zeros((group, size), np.int64)
            lens = np.zeros(group, np.int32)  # padding nodes: no points
            for r, p in enumerate(nodes):
                idx[r, : pool_len[p]] = order[starts[p] : starts[p] + pool_len[p]]
                lens[r] = pool_len[p]
            pick = np.zeros(group, np.int64)
            pick[: len(nodes)] = nodes
            result = fit_nodes(u_init[pick], shifts[pick], _gather_rows(embeddings, idx), lens,
                               parent_centroids[pick], steps=steps, batch=batch, balance_factor=balance_factor)
            if pending is not None:  # gather the next group on the host while this one computes
                collect(pending)
            pending = (nodes, result)
    if pending is not None:
        collect(pending)
    return out


def _distance_sums(embeddings: np.ndarray, centroids: np.ndarray, node: np.ndarray, chunk: int = 65536):
    """(sum of squared, sum of) L2 distances from each L2-normalised point to its node's centroid."""
    sq = lin = 0.0
    for a in range(0, embeddings.shape[0], chunk):
        x = np.asarray(embeddings[a:a + chunk], np.float32)
        x = x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)
        d2 = np.sum(np.square(x - centroids[node[a:a + chunk]]), axis=-1, dtype=np.float64)
        sq += float(d2.sum())
        lin += float(np.sqrt(d2).sum())
    return sq, lin


def _level_stats(counts: np.ndarray, k: int, n: int, inertia: float, distance_sum: float) -> dict:
    parent_counts = counts.reshape(-1, k).sum(1)
    in_parent = counts.reshape(-1, k).max(1) / np.maximum(parent_counts, 1)
    return {
        "nodes": int(counts.size),
        "largest_count": int(counts.max()),
        "smallest_count": int(counts.min()),
        "largest_share": float(counts.max() / n),
        "smallest_share": float(counts.min() / n),
        "empty_nodes": int((counts == 0).sum()),
        "largest_share_in_parent": float(in_parent[parent_counts > 0].max()),
        "inertia": inertia,  # sum over the fit points of the squared distance to their node's centroid
        "mean_distance": distance_sum / n,
    }


def fit_tree(embeddings: np.ndarray, *, k: int, depth: int, steps: int = 20, batch: int = 6400,
             balance_factor: float | None = 1.5, seed: int = 0, embedder_name: str = "minilm",
             group_bytes: int = GROUP_BYTES, say=None) -> Tree:
    """Fit a depth-``depth``, ``k``-ary tree on ``embeddings`` ``[n, dim]`` (array or memmap).

    ``steps`` mini-batch Lloyd steps of ``batch`` samples per node; a cluster over
    ``balance_factor / k`` of an assignment step is split with the smallest (None or inf: off).
    Deterministic for ``seed`` (see ``kmeans`` for the per-node algorithm and edge cases).
    A node uses at most ``steps * batch`` of its points, so at corpus scale fit on a uniform sample
    of about ``k**(depth-1) * steps * batch`` points and route the whole corpus with ``route``.
    ``say`` (a callable) gets a line as each level is fitted.
    """
    if embeddings.ndim != 2 or embeddings.shape[0] < 1 or embeddings.shape[1] < 1:
        raise ValueError(f"fit_tree: embeddings of shape {tuple(embeddings.shape)}, need [n >= 1, dim >= 1]")
    for name, value, low in (("k", k, 2), ("depth", depth, 1), ("steps", steps, 1), ("batch", batch, 1)):
        if int(value) != value or value < low:
            raise ValueError(f"fit_tree: {name} = {value!r}, must be an integer >= {low}")
    factor = math.inf if balance_factor is None else float(balance_factor)
    if not factor >= 1.0:
        raise ValueError(f"fit_tree: balance_factor = {balance_factor!r}, must be >= 1 (or None / inf for off)")
    n, dim = embeddings.shape
    t0 = time.perf_counter()
    node = np.zeros(n, np.int32)  # each point's node at the level above (the root: 0)
    parent_centroids = np.zeros((1, dim), np.float32)
    centroids, counts, stats = [], [], {"n_points": int(n)}
    for level in range(1, depth + 1):
        n_parents = k ** (level - 1)
        shuffle = np.random.default_rng([seed, level]).random(n, np.float32)
        order = np.lexsort((shuffle, node))  # grouped by node, random order inside a node
        node_counts = np.bincount(node, minlength=n_parents)
        starts = np.cumsum(node_counts) - node_counts
        pool_len = np.minimum(node_counts, steps * batch)
        del shuffle
        level_centroids = _fit_level(embeddings, order, starts, pool_len, parent_centroids, level=level, k=k,
                                     steps=steps, batch=batch, balance_factor=factor, seed=seed,
                                     group_bytes=group_bytes)
        del order
        node = descend_levels([level_centroids], k, embeddings, first_parent=node)[:, 0]
        counts.append(np.bincount(node, minlength=k**level).astype(np.int64))
        stats[f"level_{level}"] = _level_stats(counts[-1], k, n, *_distance_sums(embeddings, level_centroids, node))
        centroids.append(level_centroids)
        parent_centroids = level_centroids
        if say is not None:
            say(f"tree level {level}/{depth} fitted: {k ** level} nodes ({time.perf_counter() - t0:.1f} s)")
    fit = {"steps": int(steps), "batch": int(batch), "n_points": int(n),
           "balance_factor": None if math.isinf(factor) else factor}
    return Tree(k=int(k), depth=int(depth), dim=int(dim), embedder=embedder_name, centroids=centroids, counts=counts,
                stats=stats, seed=int(seed), fit=fit)
