"""The bank as the training step sees it: one object that plans, fetches, pushes, finishes and commits.

The step never touches a bank row itself. Per step it asks :class:`ShardedBank`:

- ``plan(paths, untouched, use_generic)``: per level, the nodes each owner's gradient accumulator
  covers this step (those of the sequences that touch the bank), and whether any row is generic;
- ``prepare(bank, generic, paths, use_generic, slot_ids)``: per micro-step, the fetched slots
  (each shard's unique blocks per level, ``[shards, slots, *block]`` float32 from compute-dtype
  rows), each sequence's slot index, the requested ids and the generic block;
- ``push(acc, acc_ids, uniq, grads)``: the micro-step's slot gradients, sent to their owners'
  accumulators;
- ``finish(acc, generic_acc)``: after the last micro-step, the replicated levels' shares summed
  and the squared norm of the per-node gradients (each node counted once);
- ``commit(state, acc, acc_ids, placement, factor, hp, slot_ids)``: each owner's row-wise AdamW
  on the touched nodes of its own rows (gradient = ``acc * factor``).

Every method is a ``shard_map`` over the data-parallel axes whose body runs the primitives of
``memlm.bank.exchange`` on one shard's values (see that module for the rounds of ``all_to_all``);
GSPMD is never asked to gather from the bank.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from memlm.bank import exchange
from memlm.bank.device import DP_AXES, BankState, LevelPlacement
from memlm.bank.layout import BankLayout
from memlm.bank.optimizer import update_owned_rows

__all__ = ["ShardedBank", "level_spec", "shard_map"]


def shard_map(mesh: Mesh, f: Callable, in_specs, out_specs) -> Callable:
    """``jax.shard_map`` without the varying-manual-axes check (the bodies mix collectives freely)."""
    return jax.shard_map(f, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)


def level_spec(pl: LevelPlacement) -> P:
    """How a level's rows (and its per-node counters) are split: over the data-parallel axes, or
    whole on every shard for a replicated level."""
    return P() if pl.replicated else P(DP_AXES)


class ShardedBank:
    """The bank exchange of one step plan on one mesh (see the module docstring)."""

    def __init__(self, mesh: Mesh, layout: BankLayout, generic_layout: BankLayout | None,
                 levels: Mapping[str, LevelPlacement], requests: Mapping[str, int], owned: Mapping[str, int],
                 capacity: Mapping[str, int]):
        self.mesh, self.layout, self.generic_layout = mesh, layout, generic_layout
        self.levels, self.requests, self.owned, self.capacity = dict(levels), requests, owned, capacity
        self.keys = list(levels)
        self.by_key = {lv.key: lv for lv in layout.levels}

    def _tree(self, keys=None) -> dict:
        dp = P(DP_AXES)
        return {k: {a.name: dp for a in self.layout.arrays} for k in (self.keys if keys is None else keys)}

    def level_ids(self, paths: jax.Array, skip: jax.Array) -> dict[str, jax.Array]:
        """Per level, each sequence's node (-1 for the sequences ``skip`` marks)."""
        return {k: jnp.where(skip, -1, paths[:, self.by_key[k].level - 1]).astype(jnp.int32) for k in self.keys}

    def zero_accumulators(self, shards: int) -> tuple[dict, dict | None]:
        """Float32 per-owner accumulators of the bank and of the generic memory."""
        acc = {k: {a.name: jnp.zeros((shards, self.owned[k], *a.shape(self.by_key[k].rank)), jnp.float32)
                   for a in self.layout.arrays} for k in self.keys}
        gen = None
        if self.generic_layout is not None:
            gen = {a.name: jnp.zeros((shards, *a.shape(self.generic_layout.fetched_rank)), jnp.float32)
                   for a in self.generic_layout.arrays}
        return acc, gen

    def plan(self, paths: jax.Array, untouched: jax.Array, use_generic: jax.Array) -> tuple[dict, jax.Array]:
        """Per level, the nodes each owner accumulates this step; whether any sequence is generic."""
        dp = P(DP_AXES)

        def local(paths, untouched, use_generic):
            me = jax.lax.axis_index(DP_AXES)
            out = {}
            for k, ids in self.level_ids(paths, untouched).items():
                all_ids = jax.lax.all_gather(ids, DP_AXES, tiled=True)
                out[k] = exchange.owned_touched(all_ids, self.levels[k], me, self.owned[k])[None]
            any_generic = jax.lax.psum(jnp.sum(use_generic.astype(jnp.int32)), DP_AXES) > 0
            return out, any_generic

        specs = ({k: dp for k in self.keys}, P())
        return shard_map(self.mesh, local, (dp, dp, dp), specs)(paths, untouched, use_generic)

    def prepare(self, bank_params: dict, gen_params: dict | None, paths: jax.Array, use_generic: jax.Array,
                slot_ids: dict):
        """One micro-batch's slots, slot index per sequence, requested ids, generic block, remote rows."""
        dtype, dp = self.layout.dtype, P(DP_AXES)

        def local(bank_params, gen_params, paths, use_generic, slot_ids):
            me = jax.lax.axis_index(DP_AXES)
            slots, index, uniq, remote = {}, {}, {}, jnp.zeros((), jnp.int32)
            for k, ids in self.level_ids(paths, use_generic).items():
                pl, cap = self.levels[k], self.capacity[k]
                u, inv = exchange.unique_ids(ids, self.requests[k])
                rt = exchange.route(u, pl, me, cap, DP_AXES)
                rows = exchange.fetch(bank_params[k], u, rt, pl, me, cap, DP_AXES, dtype,
                                      slot_ids[k][0] if k in slot_ids else None)
                slots[k] = {n: r.astype(jnp.float32)[None] for n, r in rows.items()}
                index[k], uniq[k] = inv[None], u[None]
                remote = remote + rt.remote_count
            gen = None
            if gen_params is not None:
                gen = {n: a[0].astype(dtype).astype(jnp.float32)[None] for n, a in gen_params["level1"].items()}
            return slots, index, uniq, gen, jax.lax.psum(remote, DP_AXES)

        arrays = self.layout.arrays
        bank_specs = {k: {a.name: level_spec(self.levels[k]) for a in arrays} for k in self.keys}
        gen_spec = {"level1": {a.name: P() for a in self.generic_layout.arrays}} if self.generic_layout else None
        out_specs = (self._tree(), {k: dp for k in self.keys}, {k: dp for k in self.keys},
                     {a.name: dp for a in arrays} if self.generic_layout else None, P())
        slot_specs = {k: dp for k in slot_ids}
        return shard_map(self.mesh, local, (bank_specs, gen_spec, dp, dp, slot_specs), out_specs)(
            bank_params, gen_params, paths, use_generic, slot_ids)

    def push(self, acc: dict, acc_ids: dict, uniq: dict, grads: dict) -> dict:
        """Send one micro-step's slot gradients to their owners' accumulators."""
        def local(acc, acc_ids, uniq, grads):
            me = jax.lax.axis_index(DP_AXES)
            out = {}
            for k in self.keys:
                pl, cap = self.levels[k], self.capacity[k]
                rt = exchange.route(uniq[k][0], pl, me, cap, DP_AXES)
                got = exchange.push({n: a[0] for n, a in acc[k].items()}, acc_ids[k][0], uniq[k][0],
                                    {n: g[0] for n, g in grads[k].items()}, rt, pl, cap, DP_AXES)
                out[k] = {n: a[None] for n, a in got.items()}
            return out

        tree, ids = self._tree(), {k: P(DP_AXES) for k in self.keys}
        return shard_map(self.mesh, local, (tree, ids, ids, tree), tree)(acc, acc_ids, uniq, grads)

    def finish(self, acc: dict, gen_acc: dict | None) -> tuple[dict, dict | None, jax.Array, jax.Array]:
        """All-reduce the replicated levels' (and the generic memory's) shares; the squared norms of
        the per-node bank and generic gradients (each node counted once)."""
        def local(acc, gen_acc):
            sq = jnp.zeros((), jnp.float32)
            out = {}
            for k in self.keys:
                if self.levels[k].replicated:
                    out[k] = {n: jax.lax.psum(a, DP_AXES) for n, a in acc[k].items()}
                    sq = sq + sum(jnp.sum(jnp.square(a)) for a in out[k].values())
                else:
                    out[k] = acc[k]
                    sq = sq + jax.lax.psum(sum(jnp.sum(jnp.square(a)) for a in acc[k].values()), DP_AXES)
            gen_sq = jnp.zeros((), jnp.float32)
            if gen_acc is not None:
                gen_acc = {n: jax.lax.psum(a, DP_AXES) for n, a in gen_acc.items()}
                gen_sq = sum(jnp.sum(jnp.square(a)) for a in gen_acc.values())
            return out, gen_acc, sq, gen_sq

        tree = self._tree()
        gtree = {a.name: P(DP_AXES) for a in self.layout.arrays} if gen_acc is not None else None
        return shard_map(self.mesh, local, (tree, gtree), (tree, gtree, P(), P()))(acc, gen_acc)

    def commit(self, state: BankState, acc: dict, acc_ids: dict, placement: Mapping[str, LevelPlacement],
               factor: jax.Array, hp: dict[str, Any], slot_ids: dict | None = None) -> BankState:
        """Each owner's row-wise AdamW on the touched nodes of its own rows (gradient = acc * factor);
        ``placement`` is the bank's levels, or the generic memory's."""
        level_keys = list(placement)
        slot_ids = slot_ids or {}
        dp = P(DP_AXES)

        def local(params, mu, nu, count, dirty, acc, acc_ids, factor, lr, slot_ids):
            me = jax.lax.axis_index(DP_AXES)
            new = ({}, {}, {}, {}, {})
            for k in level_keys:
                pl = placement[k]
                base = 0 if pl.replicated else me * pl.per_shard
                grads = {n: a[0] for n, a in acc[k].items()}
                out = update_owned_rows(params[k], mu[k], nu[k], count[k], dirty[k], grads, acc_ids[k][0], base,
                                        factor=factor, lr=lr, slot_ids=slot_ids[k][0] if k in slot_ids else None,
                                        **hp)
                for d, x in zip(new, out, strict=True):
                    d[k] = x
            return new

        lay = state.layout
        arr = {k: {a.name: level_spec(placement[k]) for a in lay.arrays} for k in level_keys}
        node = {k: level_spec(placement[k]) for k in level_keys}
        tree = {k: {a.name: dp for a in lay.arrays} for k in level_keys}
        ids = {k: dp for k in level_keys}
        hp = dict(hp)
        lr = hp.pop("lr")
        sids = {k: dp for k in slot_ids}
        out = shard_map(self.mesh, local, (arr, arr, arr, node, node, tree, ids, P(), P(), sids),
                        (arr, arr, arr, node, node))(state.params, state.mu, state.nu, state.count, state.dirty, acc,
                                                     acc_ids, factor, lr, slot_ids)
        return state.replace(params=out[0], mu=out[1], nu=out[2], count=out[3], dirty=out[4])
