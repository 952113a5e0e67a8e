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

Clipping jointly with the anchor: ``fetched_grad_sq_norm`` returns ``sum_l sum_{n in T} |g_n|^2``,
the squared norm of the per-node summed gradients (what the bank would see as its gradient),
not of the per-sequence fetched gradients; scale the fetched gradients by the clip factor
before calling ``sparse_adamw`` (the segment sum is linear).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from memlm.bank.device import BankState, split_fetched
from memlm.bank.layout import BankLayout, LevelLayout
from memlm.memspec import FetchedMemory


def _segments(lv: LevelLayout, paths: jax.Array, touched: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Unique touched node ids of a level (sorted, padded with the fill id ``nodes``) and the
    segment of every sequence (untouched sequences land in the fill segment)."""
    batch = paths.shape[0]
    ids = jnp.where(touched, paths[:, lv.level - 1].astype(jnp.int32), lv.nodes)
    size = min(batch, lv.nodes + 1)  # ids lie in [0, nodes]: a small level needs no more rows than that
    uniq, inverse = jnp.unique(ids, size=size, fill_value=lv.nodes, return_inverse=True)
    return uniq, inverse.reshape(batch)


def _node_sums(g: jax.Array, touched: jax.Array, inverse: jax.Array, segments: int) -> jax.Array:
    """Per-segment sum of the touched sequences' gradients, in float32."""
    mask = touched.reshape((-1,) + (1,) * (g.ndim - 1))
    g = jnp.where(mask, g.astype(jnp.float32), 0.0)
    return jax.ops.segment_sum(g, inverse, num_segments=segments)


def fetched_grad_sq_norm(layout: BankLayout, paths: jax.Array, grads: FetchedMemory, touched: jax.Array) -> jax.Array:
    """Squared global norm of the bank's gradient: the per-node sums of the fetched gradients."""
    per_level = split_fetched(layout, grads)
    total = jnp.zeros((), jnp.float32)
    for lv in layout.levels:
        uniq, inverse = _segments(lv, paths, touched)
        for g in per_level[lv.key].values():
            total = total + jnp.sum(jnp.square(_node_sums(g, touched, inverse, uniq.shape[0])))
    return total


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


def sparse_adamw(state: BankState, paths: jax.Array, grads: FetchedMemory, touched: jax.Array, *,
                 lr: float | jax.Array, b1: float = 0.9, b2: float = 0.95, eps: float = 1e-8,
                 weight_decay: float | jax.Array = 0.0) -> BankState:
    """One row-wise AdamW step on the nodes touched by the batch (semantics: module docstring).

    ``paths`` ``[B, depth]`` int32, ``grads`` the gradient w.r.t. the FetchedMemory
    (``{name: [B, *shape(R)]}``), ``touched`` ``[B]`` bool. Returns the new state with the
    touched nodes' dirty flags set. Donate ``state`` in the enclosing jit to update in place.
    """
    layout = state.layout
    if paths.ndim != 2 or paths.shape[1] != layout.depth:
        raise ValueError(f"paths must have shape [B, {layout.depth}], got {list(paths.shape)}")
    per_level = split_fetched(layout, grads)
    lr = jnp.asarray(lr, jnp.float32)
    wd = jnp.asarray(weight_decay, jnp.float32)
    params, mu, nu, count, dirty = {}, {}, {}, {}, {}
    for lv in layout.levels:
        key = lv.key
        uniq, inverse = _segments(lv, paths, touched)
        rows = jnp.minimum(uniq, lv.nodes - 1)  # fill ids read a real row; their results are dropped
        c = state.count[key][rows] + 1
        count[key] = state.count[key].at[uniq].set(c, mode="drop", indices_are_sorted=True)
        dirty[key] = state.dirty[key].at[uniq].set(True, mode="drop", indices_are_sorted=True)
        params[key], mu[key], nu[key] = {}, {}, {}
        for a in layout.arrays:
            g = _node_sums(per_level[key][a.name], touched, inverse, uniq.shape[0])
            p_arr, m_arr, v_arr = state.params[key][a.name], state.mu[key][a.name], state.nu[key][a.name]
            p, m, v = adamw_rows(p_arr[rows], m_arr[rows], v_arr[rows], g, c, lr=lr, b1=b1, b2=b2, eps=eps,
                                 weight_decay=wd)
            p = p.astype(p_arr.dtype)
            params[key][a.name] = p_arr.at[uniq].set(p, mode="drop", indices_are_sorted=True)
            mu[key][a.name] = m_arr.at[uniq].set(m, mode="drop", indices_are_sorted=True)
            nu[key][a.name] = v_arr.at[uniq].set(v, mode="drop", indices_are_sorted=True)
    return state.replace(params=params, mu=mu, nu=nu, count=count, dirty=dirty)


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
