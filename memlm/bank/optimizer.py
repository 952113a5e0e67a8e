"""Sparse row-wise AdamW for the bank: only the blocks a batch fetched are read, updated and written.

Semantics (per level, per step; B sequences, sequence b fetched node ``paths[b, l-1]``):

1. Touching. A sequence with ``touched[b] = False`` (e.g. one that used the generic memory)
   contributes nothing and does not count as touching its node. The touched set T is the set
   of nodes fetched by at least one touched sequence.
2. Gradient. For node n in T, ``g_n = sum_{b touched, path[b] = n} dL/dfetched_b`` restricted
   to that level's slice of the rank axis: duplicates in a batch add up, exactly as the
   gradient of a dense bank would.
3. Update, for n in T only, with the node's own step counter ``c_n``:
   ``c_n += 1; mu_n = b1 mu_n + (1-b1) g_n; nu_n = b2 nu_n + (1-b2) g_n^2;
   p_n -= lr * (mu_n / (1-b1^c_n) / (sqrt(nu_n / (1-b2^c_n)) + eps) + wd * p_n)``
   (decoupled weight decay, applied only when touched, with the pre-update p_n; as optax.adamw).
4. Nodes outside T are untouched: no weight decay, no moment decay, no counter step.

So when every node is touched on every step this is ``optax.adamw`` on the dense bank; with
partial touches it is "lazy" AdamW whose bias correction follows each node's own history.
The update is computed in float32 and cast to the parameter dtype (bf16 banks work).

Shapes are fixed for jit: per level the touched node ids are made unique with
``size = min(B, nodes + 1)``; padding and untouched sequences map to the fill index ``nodes``,
whose rows are dropped on scatter. Work and memory are O(B x block), never O(bank): no dense gradient, no dense pass.

Clipping jointly with the anchor: the norm is that of the per-node summed gradients (what the
bank would see as its gradient), not of the per-sequence fetched gradients.

The training step applies these semantics shard by shard (``update_owned_rows``, called by
``memlm.bank.sharded.ShardedBank.commit``). A single-device whole-batch form of the same update,
the tests' reference, is ``tests/oracles.py``.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp


def adamw_rows(p: jax.Array, m: jax.Array, v: jax.Array, g: jax.Array, count: jax.Array, *, lr: jax.Array,
               b1: float, b2: float, eps: float, weight_decay: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """AdamW on gathered rows (the semantics of the module docstring, step 3), in float32.

    ``p`` (any float dtype), ``m``, ``v``, ``g``: ``[n, *block]``; ``count``: ``[n]``, each row's
    step counter *after* this update (its bias correction). Returns float32 (p, m, v); the
    caller casts ``p`` to the stored dtype.
    """
    shape = (-1,) + (1,) * (g.ndim - 1)
    cf = count.astype(jnp.float32).reshape(shape)
    g = g.astype(jnp.float32)
    m = b1 * m + (1.0 - b1) * g
    v = b2 * v + (1.0 - b2) * jnp.square(g)
    p = p.astype(jnp.float32)
    step = (m / (1.0 - b1**cf)) / (jnp.sqrt(v / (1.0 - b2**cf)) + eps) + weight_decay * p
    return p - lr * step, m, v


UPDATE_CHUNK_BYTES = 1 << 28  # float32 bytes of gradient rows updated at once: bounds the update's temporaries


def update_owned_rows(params: dict[str, jax.Array], mu: dict[str, jax.Array], nu: dict[str, jax.Array],
                      count: jax.Array, dirty: jax.Array, grads: dict[str, jax.Array], ids: jax.Array, base: jax.Array,
                      *, factor: jax.Array, lr: jax.Array, b1: float, b2: float, eps: float,
                      weight_decay: jax.Array, slot_ids: jax.Array | None = None) -> tuple[dict, dict, dict, jax.Array,
                                                                                            jax.Array]:
    """Row-wise AdamW, on one shard, of the rows ``ids - base`` (``ids``: sorted node ids, ``-1`` =
    padding; with ``slot_ids``, the rows where those ids sit among the step's slots) with gradients
    ``grads * factor`` (``{name: [len(ids), *block]}``).

    The rows are updated a chunk at a time in a loop whose carry is the (donated) shard itself, so
    the update holds one chunk of gathered rows, not a copy of every touched row.
    """
    n = ids.shape[0]
    per_row = max(1, sum(int(math.prod(g.shape[1:])) for g in grads.values()) * 4)
    target = max(1, UPDATE_CHUNK_BYTES // per_row)
    chunk = max(c for c in range(1, min(n, target) + 1) if n % c == 0)
    rows_in_shard = count.shape[0]

    def body(i, carry):
        p_all, m_all, v_all, c_all, d_all = carry
        sel = jax.lax.dynamic_slice_in_dim(ids, i * chunk, chunk)
        valid = sel >= 0
        if slot_ids is None:
            local = sel - base
        else:
            key = jnp.where(slot_ids >= 0, slot_ids, jnp.iinfo(jnp.int32).max)
            local = jnp.clip(jnp.searchsorted(key, sel), 0, rows_in_shard - 1).astype(jnp.int32)
        rows = jnp.where(valid, local, 0)
        at = jnp.where(valid, local, rows_in_shard)  # out of bounds: dropped
        c = c_all[rows] + 1
        c_all = c_all.at[at].set(c, mode="drop")
        d_all = d_all.at[at].set(True, mode="drop")
        p_new, m_new, v_new = {}, {}, {}
        for name in p_all:
            g = jax.lax.dynamic_slice_in_dim(grads[name], i * chunk, chunk) * factor
            p, m, v = adamw_rows(p_all[name][rows], m_all[name][rows], v_all[name][rows], g, c, lr=lr, b1=b1, b2=b2,
                                 eps=eps, weight_decay=weight_decay)
            p_new[name] = p_all[name].at[at].set(p.astype(p_all[name].dtype), mode="drop")
            m_new[name] = m_all[name].at[at].set(m, mode="drop")
            v_new[name] = v_all[name].at[at].set(v, mode="drop")
        return p_new, m_new, v_new, c_all, d_all

    return jax.lax.fori_loop(0, n // chunk, body, (params, mu, nu, count, dirty))
