"""Greedy nearest-centroid descent of the tree: text embeddings -> paths ``[n, depth]``.

``path[:, l-1]`` is the global index of the level-l node, in ``[0, k**l)``; the children of node i
are ``k*i .. k*i + k - 1`` one level down. At each level only the k children of the current node
are compared (L2 distance), so a text costs O(depth * k) distance evaluations (docs/paper.md §3.1).
Inputs are L2-normalised here, by the same code for training documents, evaluation contexts and
the tree fit, so a text always gets the same path.

Blocking (the paper's memory-blocking test, docs/paper.md §6): at the blocked level a text takes the
next-best sibling instead of the node it would have taken, then descends greedily below it.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

CHUNK = 16384  # rows per jitted call: one fixed shape (the last chunk is padded), bounded memory
_FULL_MATMUL_NODES = 256  # levels this small compare against all their centroids in one matmul
_MAX_TILE = 32
_GATHER_ROWS = 2048  # rows per step of the gather fallback: bounds its [rows, k, dim] buffer


def _children_dots(x: jax.Array, parent: jax.Array, cent: jax.Array, k: int) -> jax.Array:
    """``x[i] . cent[parent[i]*k + j]`` for j < k: dots ``[n, k]`` with each row's own children.

    Small levels: one dense matmul. Larger levels: rows are sorted by parent and laid out in
    tiles of T rows of one parent each (each parent's rows padded to a multiple of T), so every
    tile is a ``[T, dim] x [dim, k]`` matmul against one gathered ``[k, dim]`` block; the gather
    traffic is per tile instead of per row (several times faster on a CPU). With too few rows per
    parent for tiles, the per-row gather runs in bounded sub-chunks.
    """
    x, parent, cent = jnp.asarray(x), jnp.asarray(parent), jnp.asarray(cent)
    n, dim = x.shape
    n_par = cent.shape[0] // k
    if cent.shape[0] <= _FULL_MATMUL_NODES:
        return jnp.take_along_axis(x @ cent.T, parent[:, None] * k + jnp.arange(k), axis=1)
    tile = min(_MAX_TILE, 1 << max(0, (n // n_par).bit_length() - 1))
    blocks = cent.reshape(n_par, k, dim)
    if tile < 4:  # few rows per parent: gather each row's children
        if n % _GATHER_ROWS:
            return jnp.einsum("nd,nkd->nk", x, blocks[parent])
        pieces = jax.lax.map(lambda a: jnp.einsum("nd,nkd->nk", a[0], blocks[a[1]]),
                             (x.reshape(-1, _GATHER_ROWS, dim), parent.reshape(-1, _GATHER_ROWS)))
        return pieces.reshape(n, k)
    order = jnp.argsort(parent)
    sorted_parent = parent[order]
    counts = jnp.zeros(n_par, jnp.int32).at[parent].add(1)
    padded = (counts + tile - 1) // tile * tile
    slot = (jnp.cumsum(padded) - padded)[sorted_parent] + jnp.arange(n) - (jnp.cumsum(counts) - counts)[sorted_parent]
    size = -(-(n + n_par * (tile - 1)) // tile) * tile
    tiles = jnp.zeros((size, dim), x.dtype).at[slot].set(x[order]).reshape(-1, tile, dim)
    tile_parent = jnp.zeros(size // tile, jnp.int32).at[slot // tile].set(sorted_parent)
    dots = jnp.einsum("ntd,nkd->ntk", tiles, blocks[tile_parent]).reshape(size, k)[slot]
    return jnp.zeros((n, k), dots.dtype).at[order].set(dots)


def _level_distances(x: jax.Array, parent: jax.Array, cent: jax.Array, sqnorm: jax.Array, k: int) -> jax.Array:
    """Squared L2 distances (up to the constant |x|^2) from each row to the k children of its parent."""
    return sqnorm[parent[:, None] * k + jnp.arange(k)] - 2.0 * _children_dots(x, parent, cent, k)


@functools.partial(jax.jit, static_argnames=("k", "block_level"))
def _descend(levels: tuple, x: jax.Array, first_parent: jax.Array, avoid: jax.Array, *, k: int,
             block_level: int | None) -> jax.Array:
    """Paths ``[n, len(levels)]`` below ``first_parent``; at level ``block_level`` (1-based, relative to
    ``levels``) skip node ``avoid``, or the row's own best node when ``avoid < 0``."""
    x = x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)
    parent = first_parent
    out = []
    for level, (cent, sqnorm) in enumerate(levels, start=1):
        dist = _level_distances(x, parent, cent, sqnorm, k)
        if level == block_level:
            local = jnp.arange(k)
            own = jnp.argmin(dist, axis=-1)[:, None] == local
            blocked = jnp.where(avoid < 0, own, parent[:, None] * k + local == avoid)
            dist = jnp.where(blocked, jnp.inf, dist)
        parent = parent * k + jnp.argmin(dist, axis=-1).astype(jnp.int32)
        out.append(parent)
    return jnp.stack(out, axis=1)


def descend_levels(centroids: list[np.ndarray], k: int, embeddings: np.ndarray, *,
                   first_parent: np.ndarray | None = None, block_level: int | None = None, avoid: int = -1,
                   chunk: int = CHUNK) -> np.ndarray:
    """Route ``embeddings`` (array or memmap, streamed in chunks) through the given levels of centroids.

    ``first_parent`` gives each row's node one level above ``centroids[0]`` (default: the root, 0).
    """
    n = embeddings.shape[0]
    levels = tuple((jnp.asarray(c, jnp.float32), jnp.asarray(np.sum(np.square(c, dtype=np.float64), -1), jnp.float32))
                   for c in centroids)
    out = np.empty((n, len(centroids)), np.int32)
    pending = None
    for start in range(0, n, chunk):
        stop = min(start + chunk, n)
        x = np.zeros((chunk, embeddings.shape[1]), np.float32)
        x[: stop - start] = embeddings[start:stop]
        if not np.isfinite(x).all():
            raise ValueError(f"embeddings rows {start}..{stop - 1} hold non-finite values (NaN or inf)")
        parent = np.zeros(chunk, np.int32)
        if first_parent is not None:
            parent[: stop - start] = first_parent[start:stop]
        result = _descend(levels, x, parent, jnp.int32(avoid), k=k, block_level=block_level)
        if pending is not None:  # copy the previous chunk out while this one computes
            out[pending[0] : pending[1]] = np.asarray(pending[2])[: pending[1] - pending[0]]
        pending = (start, stop, result)
    if pending is not None:
        out[pending[0] : pending[1]] = np.asarray(pending[2])[: pending[1] - pending[0]]
    return out


def _check(tree, embeddings) -> None:
    if embeddings.ndim != 2 or embeddings.shape[1] != tree.dim:
        raise ValueError(f"embeddings of shape {tuple(embeddings.shape)}: the tree routes [n, {tree.dim}] "
                         f"({tree.embedder} embeddings)")


def route(tree, embeddings: np.ndarray, block_level: int | None = None) -> np.ndarray:
    """Paths int32 ``[n, depth]``; with ``block_level`` = l, each text skips its own best level-l node."""
    _check(tree, embeddings)
    if block_level is not None and not 1 <= block_level <= tree.depth:
        raise ValueError(f"block_level = {block_level}: must be in [1, {tree.depth}]")
    return descend_levels(tree.centroids, tree.k, embeddings, block_level=block_level)


def route_avoiding(tree, embeddings: np.ndarray, level: int, node: int) -> np.ndarray:
    """Paths int32 ``[n, depth]`` that never pass through ``node`` at ``level``: texts that would, take
    the next-best sibling there and descend greedily below it; other texts keep their greedy path."""
    _check(tree, embeddings)
    if not 1 <= level <= tree.depth:
        raise ValueError(f"level = {level}: must be in [1, {tree.depth}]")
    if not 0 <= node < tree.k**level:
        raise ValueError(f"node = {node}: level {level} has nodes 0 .. {tree.k**level - 1}")
    return descend_levels(tree.centroids, tree.k, embeddings, block_level=level, avoid=node)


def route_beam(tree, embeddings: np.ndarray, width: int) -> np.ndarray:
    """Candidate paths int32 ``[n, width, depth]`` per text: a beam over the tree by summed distance to
    the nodes' centroids (``width`` partial paths kept per level), with the greedy path always first.

    The other candidates follow in order of summed distance; a tree with fewer than ``width``
    leaves repeats its last candidate. Plain numpy: meant for a batch of evaluation queries.
    """
    _check(tree, embeddings)
    if width < 1:
        raise ValueError(f"width = {width}: must be >= 1")
    x = np.asarray(embeddings, np.float32)
    x = x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)
    n, k = len(x), tree.k
    greedy = route(tree, x)
    nodes = np.zeros((n, 1), np.int64)  # kept partial paths: their last node, and their summed distance
    cost = np.zeros((n, 1), np.float64)
    hist = np.zeros((n, 1, 0), np.int64)
    for cent in tree.centroids:
        children = nodes[:, :, None] * k + np.arange(k)  # [n, w, k]
        d = np.linalg.norm(x[:, None, None, :] - cent[children], axis=-1)
        total = (cost[:, :, None] + d).reshape(n, -1)
        keep = np.argsort(total, axis=1, kind="stable")[:, :width]
        rows = np.arange(n)[:, None]
        parent = keep // k
        hist = np.concatenate([hist[rows, parent], children.reshape(n, -1)[rows, keep][..., None]], axis=2)
        nodes, cost = children.reshape(n, -1)[rows, keep], total[rows, keep]
    if hist.shape[1] < width:
        hist = np.concatenate([hist, np.repeat(hist[:, -1:], width - hist.shape[1], axis=1)], axis=1)
    out = hist.astype(np.int32)
    for i in range(n):  # the greedy path first; the beam's others after it, in order
        same = np.flatnonzero((out[i] == greedy[i]).all(axis=1))
        cand = np.concatenate([greedy[i][None], out[i][[j for j in range(width) if j not in same.tolist()]]])
        out[i] = np.concatenate([cand, np.repeat(cand[-1:], max(0, width - len(cand)), axis=0)])[:width]
    return out
