"""The explicit bank exchange between data-parallel shards: fetch rows, push gradient rows back.

These functions run *inside* ``shard_map`` on one shard's values; ``axis`` names the
data-parallel mesh axes (``("data", "fsdp")``). A level is placed as ``LevelPlacement`` says:
shard ``d`` owns nodes ``[d * per_shard, (d + 1) * per_shard)``, or every shard holds the whole
level (replicated, an explicit choice for small levels).

Fetch (per level, per micro-step). A shard dedups the node ids its sequences need (``unique_ids``),
serves the ones it owns from its own rows, and asks the owners of the rest. Requests travel in
rounds of ``all_to_all``: in a round every shard sends each other shard at most ``capacity`` ids
and gets back that many rows (cast to the compute dtype by the owner, so a bfloat16 bank moves
bfloat16 rows). The number of rounds is the agreed maximum (``pmax``) over shards of
``ceil(requests to one owner / capacity)``, so the buffers stay ``shards x capacity`` rows
whatever the skew, and a batch whose rows are all local runs no round at all. Nothing ever
gathers a level, and the traffic is the rows actually requested from other shards.

Push (per micro-step). The gradient rows of the fetched slots go back to their owners the same
way, and each owner adds them into an accumulator over the nodes *it owns* that the step's
global batch touches (``owned_touched``, from an all-gather of the batch's node ids: integers,
not rows). After the last micro-step each owner holds the full per-node gradient of its nodes
and applies the row-wise AdamW to its own rows (``memlm.bank.optimizer``). A replicated level
accumulates each shard's share locally, and the step all-reduces that accumulator once.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from memlm.bank.device import LevelPlacement

_BIG = jnp.iinfo(jnp.int32).max


def unique_ids(ids: jax.Array, size: int) -> tuple[jax.Array, jax.Array]:
    """Sorted unique ids among ``ids`` (``-1`` = no request), padded with ``-1`` to ``size``, and the
    slot of every input (inputs that are ``-1`` point at a ``-1`` slot when one exists).

    ``size`` must be at least the number of distinct values (``min(len(ids), nodes + 1)`` is).
    """
    key = jnp.where(ids >= 0, ids, _BIG)
    uniq, inverse = jnp.unique(key, size=size, fill_value=_BIG, return_inverse=True)
    return jnp.where(uniq == _BIG, -1, uniq).astype(jnp.int32), inverse.reshape(ids.shape).astype(jnp.int32)


class Route(NamedTuple):
    """Where each of a shard's requested ids is served: locally, or by which owner in which round."""

    owner: jax.Array  # [m] owning shard (0 for no request)
    local: jax.Array  # [m] bool: a real request this shard serves itself
    remote: jax.Array  # [m] bool: a real request another shard serves
    rank: jax.Array  # [m] position among this shard's requests to the same owner
    rounds: jax.Array  # int32 scalar, the same on every shard
    remote_count: jax.Array  # int32 scalar: this shard's remote requests


def route(ids: jax.Array, pl: LevelPlacement, me: jax.Array, capacity: int, axis) -> Route:
    """Plan the requests ``ids`` ([m], ``-1`` = none) of shard ``me`` for a level placed as ``pl``."""
    m = ids.shape[0]
    valid = ids >= 0
    zeros = jnp.zeros((m,), jnp.int32)
    if pl.replicated:
        return Route(zeros, valid, jnp.zeros((m,), bool), zeros, jnp.zeros((), jnp.int32), jnp.zeros((), jnp.int32))
    shards = pl.shards
    owner = jnp.where(valid, ids // pl.per_shard, 0).astype(jnp.int32)
    local = valid & (owner == me)
    remote = valid & ~local
    key = jnp.where(remote, owner, shards)
    order = jnp.argsort(key, stable=True)
    sorted_key = key[order]
    start = jnp.searchsorted(sorted_key, jnp.arange(shards + 1), side="left").astype(jnp.int32)
    rank = zeros.at[order].set(jnp.arange(m, dtype=jnp.int32) - start[sorted_key])
    count = start[1:] - start[:-1]
    need = (jnp.max(count) + capacity - 1) // capacity
    return Route(owner, local, remote, rank, jax.lax.pmax(need.astype(jnp.int32), axis),
                 jnp.sum(remote).astype(jnp.int32))


def _mask(x: jax.Array, flag: jax.Array) -> jax.Array:
    return flag.reshape(flag.shape + (1,) * (x.ndim - flag.ndim))


def local_index(ids: jax.Array, pl: LevelPlacement, me: jax.Array, slot_ids: jax.Array | None = None) -> jax.Array:
    """Row of each owned node id in this shard's arrays: ``id - first owned node`` for a level on
    device, its position among the step's ``slot_ids`` (sorted, ``-1``-padded) for a level whose
    rows are brought to the device per step (``memlm.bank.tiers``)."""
    if slot_ids is not None:
        key = jnp.where(slot_ids >= 0, slot_ids, _BIG)
        return jnp.clip(jnp.searchsorted(key, ids), 0, slot_ids.shape[0] - 1).astype(jnp.int32)
    base = 0 if pl.replicated else me * pl.per_shard
    return jnp.clip(ids - base, 0, pl.per_shard - 1)


def fetch(shard: dict[str, jax.Array], ids: jax.Array, rt: Route, pl: LevelPlacement, me: jax.Array,
          capacity: int, axis, dtype, slot_ids: jax.Array | None = None) -> dict[str, jax.Array]:
    """Rows ``{name: [m, *block]}`` (in ``dtype``) of the nodes ``ids`` from this shard's ``shard``
    (``{name: [per_shard or slots, *block]}``) and the other shards'; ``-1`` ids give zero rows."""
    rows = local_index(ids, pl, me, slot_ids)
    out = {n: jnp.where(_mask(a[rows], rt.local), a[rows].astype(dtype), jnp.zeros((), dtype))
           for n, a in shard.items()}
    if pl.replicated:
        return out
    shards = pl.shards

    def one_round(r, out):
        sel = rt.remote & (rt.rank // capacity == r)
        dest = jnp.where(sel, rt.owner, shards)  # row ``shards`` is out of bounds: dropped
        col = rt.rank % capacity
        send = jnp.full((shards, capacity), -1, jnp.int32).at[dest, col].set(ids, mode="drop")
        asked = jax.lax.all_to_all(send, axis, 0, 0, tiled=True)  # [shards, capacity]: what each shard asks me
        ok = asked >= 0
        mine = local_index(asked, pl, me, slot_ids)
        new = {}
        for n, a in shard.items():
            answer = jnp.where(_mask(a[mine], ok), a[mine].astype(dtype), jnp.zeros((), dtype))
            back = jax.lax.all_to_all(answer, axis, 0, 0, tiled=True)  # [shards, capacity, *block], by owner
            got = back[jnp.clip(dest, 0, shards - 1), col]
            new[n] = jnp.where(_mask(got, sel), got, out[n])
        return new

    return jax.lax.fori_loop(0, rt.rounds, one_round, out)


def owned_touched(all_ids: jax.Array, pl: LevelPlacement, me: jax.Array, size: int) -> jax.Array:
    """The sorted ids (``-1``-padded to ``size``) of the nodes this shard owns that ``all_ids`` (the
    whole step's requests, ``-1`` = none) touch (every node of a replicated level is "owned").
    ``size`` = min(len(all_ids), owned nodes) always fits: the ``-1`` filler sorts last and is the
    one value truncation may drop."""
    mine = all_ids >= 0
    if not pl.replicated:
        mine = mine & (all_ids // pl.per_shard == me)
    return unique_ids(jnp.where(mine, all_ids, -1), size)[0]


def _accumulate(acc: dict[str, jax.Array], acc_ids: jax.Array, ids: jax.Array, rows: dict[str, jax.Array],
                ok: jax.Array) -> dict[str, jax.Array]:
    """acc[position of id] += row for every ``ok`` id (ids missing from ``acc_ids`` are dropped)."""
    size = acc_ids.shape[0]
    key = jnp.where(acc_ids >= 0, acc_ids, _BIG)
    pos = jnp.clip(jnp.searchsorted(key, ids), 0, size - 1)
    hit = ok & (key[pos] == ids)
    at = jnp.where(hit, pos, size)
    return {n: a.at[at].add(rows[n].astype(a.dtype), mode="drop") for n, a in acc.items()}


def push(acc: dict[str, jax.Array], acc_ids: jax.Array, ids: jax.Array, grads: dict[str, jax.Array], rt: Route,
         pl: LevelPlacement, capacity: int, axis) -> dict[str, jax.Array]:
    """Add the gradient rows ``grads`` ([m, *block]) of the requested ``ids`` into their owners'
    accumulators ``acc`` ([size, *block], rows for ``acc_ids``)."""
    acc = _accumulate(acc, acc_ids, ids, grads, rt.local)
    if pl.replicated:
        return acc
    shards = pl.shards

    def one_round(r, acc):
        sel = rt.remote & (rt.rank // capacity == r)
        dest = jnp.where(sel, rt.owner, shards)
        col = rt.rank % capacity
        send = jnp.full((shards, capacity), -1, jnp.int32).at[dest, col].set(ids, mode="drop")
        got_ids = jax.lax.all_to_all(send, axis, 0, 0, tiled=True).reshape(-1)
        got = {}
        for n, g in grads.items():
            rows = jnp.zeros((shards, capacity, *g.shape[1:]), g.dtype).at[dest, col].set(g, mode="drop")
            got[n] = jax.lax.all_to_all(rows, axis, 0, 0, tiled=True).reshape(-1, *g.shape[1:])
        return _accumulate(acc, acc_ids, got_ids, got, got_ids >= 0)

    return jax.lax.fori_loop(0, rt.rounds, one_round, acc)
