"""Single-device references of the bank's sparse row-wise AdamW (the semantics of
``memlm.bank.optimizer``'s module docstring): the whole batch on one device, gathering and
scattering rows with plain ``jnp`` ops. The sharded step (``memlm.bank.sharded``) is tested
against these, and these against numpy and optax (tests/test_bank_optimizer.py).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from memlm.bank.device import BankState, split_fetched
from memlm.bank.layout import BankLayout, LevelLayout
from memlm.bank.optimizer import adamw_rows
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
