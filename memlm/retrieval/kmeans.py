"""Balanced mini-batch k-means of one tree node, vmapped over the nodes of a level.

Per node (docs/paper.md §3.1, after Grangier et al. 2025 and Jegou et al. 2010):

- The node's *pool* is a random subset of at most ``steps * batch`` of its (L2-normalised)
  points, in random order; step t takes the next ``min(batch, pool size)`` rows of the pool,
  cyclically, so a large node sees ``steps`` fresh batches and a node smaller than one batch
  runs full-batch Lloyd on all its points.
- Initialisation: k-means++ on the first batch (D^2 sampling with exact squared distances).
- Each step is one Lloyd iteration on its batch: assign every row to the nearest centroid (L2),
  balance, and set each centroid to the mean of its rows; a centroid with no rows keeps its value.
  Centroids are plain means of unit vectors and are *not* renormalised: routing compares L2
  distances to them, as in the paper.
- Balancing, at every assignment step: while the largest cluster holds more than
  ``balance_factor / k`` of the batch, the smallest cluster is recycled: its rows go to their
  next-nearest clusters, and it takes half of the largest cluster's rows, chosen at random. Its
  centroid then becomes the mean of a random half of the crowded region, next to the crowded
  centroid but off by a random direction, and the following Lloyd steps split the region along it
  (Jegou et al.'s split of a large cluster into an empty one, extended to the smallest cluster).
  ``balance_factor = inf`` turns balancing off.
- Fewer than k distinct points: k-means++ picks every distinct point before it repeats one, so
  the first children start as the distinct points and the others as exact copies of them; ties
  go to the lowest index, so a copy is never routed to and routing stays defined. Duplicate points
  in general: identical rows always share a path (a path is a function of the vector); balancing
  may spread one point's copies over several children, which then tie, and the lowest wins.
  A node with no points gives all k children its parent's centroid (only child 0 is reached).
- Randomness (k-means++ draws, balancing offsets) is drawn on the host per (seed, level) in a
  layout indexed by node and passed in, so a node's result does not depend on how nodes are
  grouped into vmapped calls, and the jitted code holds no random-number generator (which made
  it several times slower to compile on a CPU).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


def distances(x: jax.Array, centroids: jax.Array) -> jax.Array:
    """Squared L2 distances ``[rows, k]`` up to ``|x|^2``, which is the same for every centroid."""
    return jnp.sum(centroids * centroids, -1) - 2.0 * x @ centroids.T


def kmeans_pp(u: jax.Array, x: jax.Array, valid: jax.Array) -> jax.Array:
    """``len(u)`` centroids from the valid rows of ``x`` by D^2 sampling, pick j drawn by inverse CDF at
    ``u[j]`` in [0, 1); a row repeats only once every distinct valid row is a centroid."""
    k = u.shape[0]

    def pick(u, d2):
        w = jnp.where(valid, d2, 0.0)
        w = jnp.where(w.sum() > 0, w, valid.astype(x.dtype))  # all distinct rows taken: uniform over valid rows
        cdf = jnp.cumsum(w)
        last = w.shape[0] - 1 - jnp.argmax(w[::-1] > 0)  # u * total may round up to the total
        return jnp.minimum(jnp.sum(cdf <= u * cdf[-1]), last)

    first = pick(u[0], jnp.zeros(x.shape[0], x.dtype))
    c = jnp.zeros((k, x.shape[1]), x.dtype).at[0].set(x[first])
    d2 = jnp.sum((x - x[first]) ** 2, -1)  # exact: a duplicate of a chosen row has d2 == 0

    def body(j, carry):
        c, d2 = carry
        i = pick(u[j], d2)
        return c.at[j].set(x[i]), jnp.minimum(d2, jnp.sum((x - x[i]) ** 2, -1))

    c, _ = jax.lax.fori_loop(1, k, body, (c, d2))
    return c


def balance(shift: jax.Array, dist: jax.Array, valid: jax.Array, k: int, balance_factor: float) -> jax.Array:
    """Nearest-centroid assignment of rows with distances ``dist`` ``[rows, k]``, balanced: while a cluster
    holds over ``balance_factor / k`` of the valid rows, the smallest cluster gives its rows to their
    next-nearest clusters and takes half of the big cluster's rows, chosen at random (the rows are in
    random order; the half is taken in that order from position ``shift``)."""
    limit = balance_factor * valid.sum() / k
    columns = jnp.arange(k)

    def body(state):
        i, a, _ = state
        counts = jnp.zeros(k, jnp.int32).at[a].add(valid.astype(jnp.int32))
        big, small = jnp.argmax(counts), jnp.argmin(counts)
        split = (counts[big] > limit) & (counts[big] - counts[small] > 1)
        elsewhere = jnp.argmin(jnp.where(columns == small, jnp.inf, dist), axis=-1).astype(a.dtype)
        a = jnp.where(split & (a == small), elsewhere, a)
        member = (a == big) & valid & split
        rank = jnp.roll(jnp.cumsum(jnp.roll(member, -shift)), shift) - 1  # rank among members from `shift` on
        return i + 1, jnp.where(member & (rank < member.sum() // 2), small, a), ~split

    def cond(state):
        i, _, done = state
        return (i < 2 * k) & ~done

    a = jnp.argmin(dist, axis=-1).astype(jnp.int32)
    _, a, _ = jax.lax.while_loop(cond, body, (0, a, False))
    return a


def fit_node(u_init: jax.Array, shifts: jax.Array, pool: jax.Array, pool_len: jax.Array, parent: jax.Array, *,
             steps: int, batch: int, balance_factor: float) -> jax.Array:
    """k = ``len(u_init)`` centroids ``[k, d]`` of one node from its pool ``[P, d]`` (first ``pool_len`` rows
    valid); ``u_init`` drives k-means++, ``shifts[t]`` the balancing split of step t."""
    k = u_init.shape[0]
    rows = min(batch, pool.shape[0])
    n_batch = jnp.minimum(rows, pool_len)
    valid = jnp.arange(rows) < n_batch
    c = kmeans_pp(u_init, pool[:rows], valid)

    def step(t, c):
        if pool.shape[0] <= batch:  # static: every node of the group fits one batch: full-batch Lloyd
            x = pool[:rows]
        else:
            x = pool[(t * n_batch + jnp.arange(rows)) % jnp.maximum(pool_len, 1)]
        a = balance(shifts[t] % rows, distances(x, c), valid, k, balance_factor)
        onehot = jax.nn.one_hot(a, k, dtype=x.dtype) * valid[:, None]
        counts = onehot.sum(0)
        sums = onehot.T @ x
        return jnp.where(counts[:, None] > 0, sums / jnp.maximum(counts, 1.0)[:, None], c)

    c = jax.lax.fori_loop(0, steps, step, c)
    return jnp.where(pool_len > 0, c, jnp.broadcast_to(parent, c.shape))


@functools.partial(jax.jit, static_argnames=("steps", "batch", "balance_factor"))
def fit_nodes(u_init: jax.Array, shifts: jax.Array, pools: jax.Array, pool_lens: jax.Array, parents: jax.Array, *,
              steps: int, batch: int, balance_factor: float) -> jax.Array:
    """Centroids ``[G, k, d]`` of G nodes (``u_init`` ``[G, k]``, ``shifts`` ``[G, steps]``), vmapped."""
    fit = functools.partial(fit_node, steps=steps, batch=batch, balance_factor=balance_factor)
    return jax.vmap(fit)(u_init, shifts, pools, pool_lens, parents)
