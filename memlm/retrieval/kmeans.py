"""Balanced mini-batch k-means of one tree node, vmapped over the nodes of a level.

Per node (PAPER.md §3.1, after Grangier et al. 2025 and Jegou et al. 2010):

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
  ``balance_factor / k`` of the batch, a random subset of its rows moves to the smallest cluster
  so that the two hold equal counts (to within one). The smallest centroid then moves into the
  crowded region and splits it. ``balance_factor = inf`` turns balancing off.
- Fewer than k distinct points (including duplicates): k-means++ picks every distinct point
  before it ever repeats one, so the first children hold the distinct points and the remaining
  children are exact copies of them; ties go to the lowest index, so the copies are never routed
  to and routing stays defined. A node with no points gives all k children its parent's centroid
  (only child 0 is reached).
- Randomness comes from ``fold_in(seed, level, node)``, so the result does not depend on how
  nodes are grouped into vmapped calls.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


def assign(x: jax.Array, centroids: jax.Array) -> jax.Array:
    """Index of the nearest centroid (L2) of each row; ties go to the lowest index."""
    dist = jnp.sum(centroids * centroids, -1) - 2.0 * x @ centroids.T  # + |x|^2, the same for every centroid
    return jnp.argmin(dist, axis=-1).astype(jnp.int32)


def kmeans_pp(key: jax.Array, x: jax.Array, valid: jax.Array, k: int) -> jax.Array:
    """k centroids from the valid rows of ``x`` by D^2 sampling; a row repeats only once all distinct rows are used."""
    uniform = jnp.where(valid, 0.0, -jnp.inf)

    def pick(key, d2):
        w = jnp.where(valid, d2, 0.0)
        logits = jnp.where(w.sum() > 0, jnp.log(w), uniform)
        return jax.random.categorical(key, logits)

    keys = jax.random.split(key, k)
    first = pick(keys[0], jnp.zeros(x.shape[0]))
    c = jnp.zeros((k, x.shape[1]), x.dtype).at[0].set(x[first])
    d2 = jnp.sum((x - x[first]) ** 2, -1)  # exact: a duplicate of a chosen point has d2 == 0

    def body(j, carry):
        c, d2 = carry
        i = pick(keys[j], d2)
        return c.at[j].set(x[i]), jnp.minimum(d2, jnp.sum((x - x[i]) ** 2, -1))

    c, _ = jax.lax.fori_loop(1, k, body, (c, d2))
    return c


def balance(key: jax.Array, a: jax.Array, valid: jax.Array, k: int, balance_factor: float) -> jax.Array:
    """Move rows of any cluster above ``balance_factor / k`` of the valid rows to the smallest cluster."""
    n_rows = a.shape[0]
    limit = balance_factor * valid.sum() / k
    shift = jax.random.randint(key, (), 0, n_rows)  # the rows are in random order; a random start varies the subset

    def body(state):
        i, a, _ = state
        counts = jnp.zeros(k, jnp.int32).at[a].add(valid.astype(jnp.int32))
        big, small = jnp.argmax(counts), jnp.argmin(counts)
        n_move = jnp.where(counts[big] > limit, (counts[big] - counts[small]) // 2, 0)
        member = (a == big) & valid
        rank = jnp.roll(jnp.cumsum(jnp.roll(member, -shift)), shift) - 1  # rank among members from `shift` on
        return i + 1, jnp.where(member & (rank < n_move), small, a), n_move == 0

    def cond(state):
        i, _, done = state
        return (i < 2 * k) & ~done

    _, a, _ = jax.lax.while_loop(cond, body, (0, a, False))
    return a


def fit_node(key: jax.Array, pool: jax.Array, pool_len: jax.Array, parent: jax.Array, *, k: int, steps: int,
             batch: int, balance_factor: float) -> jax.Array:
    """k centroids ``[k, d]`` of one node from its pool ``[P, d]`` (first ``pool_len`` rows valid)."""
    rows = min(batch, pool.shape[0])
    n_batch = jnp.minimum(rows, pool_len)
    valid = jnp.arange(rows) < n_batch
    key_init, key_steps = jax.random.split(key)
    c = kmeans_pp(key_init, pool[:rows], valid, k)

    def step(t, c):
        idx = (t * n_batch + jnp.arange(rows)) % jnp.maximum(pool_len, 1)
        x = pool[idx]
        a = balance(jax.random.fold_in(key_steps, t), assign(x, c), valid, k, balance_factor)
        onehot = jax.nn.one_hot(a, k, dtype=x.dtype) * valid[:, None]
        counts = onehot.sum(0)
        sums = onehot.T @ x
        return jnp.where(counts[:, None] > 0, sums / jnp.maximum(counts, 1.0)[:, None], c)

    c = jax.lax.fori_loop(0, steps, step, c)
    return jnp.where(pool_len > 0, c, jnp.broadcast_to(parent, c.shape))


@functools.partial(jax.jit, static_argnames=("k", "steps", "batch", "balance_factor"))
def fit_nodes(seed: jax.Array, level: jax.Array, nodes: jax.Array, pools: jax.Array, pool_lens: jax.Array,
              parents: jax.Array, *, k: int, steps: int, batch: int, balance_factor: float) -> jax.Array:
    """Centroids ``[G, k, d]`` of G nodes of one level (global ids ``nodes``), vmapped."""
    root = jax.random.fold_in(jax.random.key(seed), level)
    keys = jax.vmap(lambda n: jax.random.fold_in(root, n))(nodes)
    fit = functools.partial(fit_node, k=k, steps=steps, batch=batch, balance_factor=balance_factor)
    return jax.vmap(fit)(keys, pools, pool_lens, parents)
