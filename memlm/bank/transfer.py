"""Moving rows between the store and the devices: the streamed load and host copies for a save.

Loading fills every addressable device shard of a level chunk by chunk of nodes (at most
``batch_bytes`` of host memory per chunk), never through one host array of a whole level.
Saving copies to the host only the rows this process owns (:func:`memlm.bank.sync.owned_ranges`),
gathered on their device with a jitted take.

Why a module of its own: this is the only part of the store that touches ``jax.Array`` data;
the rows it moves come from, or go to, a reader of the view (``read(lv, field, nodes)``), so it
knows nothing of versions or the write-ahead log.
"""

from __future__ import annotations

import collections
import functools
import math
from collections.abc import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from memlm.bank.device import BankState, bank_shardings, level_placement
from memlm.bank.init import bucket
from memlm.bank.layout import BankLayout, LevelLayout
from memlm.bank.rows import KINDS, Field
from memlm.bank.sync import owned_ranges

PlanFn = Callable[[LevelLayout, Field, np.ndarray], Callable[[], np.ndarray]]  # VersionView.plan


@jax.jit
def _take_rows(x: jax.Array, idx: jax.Array) -> jax.Array:
    return jnp.take(x, idx, axis=0)


@functools.partial(jax.jit, donate_argnums=0)
def _set_rows(buf: jax.Array, rows: jax.Array, start: jax.Array) -> jax.Array:
    """Write rows into a device buffer in place (the buffer is donated)."""
    return jax.lax.dynamic_update_slice_in_dim(buf, rows, start, axis=0)


def local_rows(x: jax.Array, nodes: np.ndarray) -> np.ndarray:
    """Host copy of rows ``nodes`` (all in this process's owned ranges, sorted) of a sharded array."""
    out = np.empty((nodes.size, *x.shape[1:]), x.dtype)
    shards = {s.device: s for s in x.addressable_shards}
    for start, stop, device in owned_ranges(x):
        lo, hi = np.searchsorted(nodes, [start, stop])
        if hi == lo:
            continue
        data = shards[device].data
        idx = np.full(bucket(hi - lo), nodes[hi - 1] - start, np.int32)
        idx[:hi - lo] = nodes[lo:hi] - start
        out[lo:hi] = np.asarray(_take_rows(data, jnp.asarray(idx)))[:hi - lo]
    return out


def state_rows(layout: BankLayout, state: BankState, lv: LevelLayout, nodes: np.ndarray) -> dict[str, np.ndarray]:
    """All fields of ``nodes`` (sorted, owned by this process) read from this process's devices."""
    rows = {}
    for a in layout.arrays:
        for kind, tree in (("params", state.params), ("mu", state.mu), ("nu", state.nu)):
            rows[f"{a.name}/{kind}"] = local_rows(tree[lv.key][a.name], nodes)
    rows["count"] = local_rows(state.count[lv.key], nodes)
    rows["written"] = np.ones(nodes.size, np.uint8)
    return rows


def load_state(layout: BankLayout, plan: PlanFn, batch_bytes: int, mesh: Mesh, *, replicate_levels: int,
               rules: Mapping[str, Sequence[str]] | None, inference: bool,
               slots: Mapping[str, int] | None) -> BankState:
    """The rows ``plan`` reads, on device with the bank's placement (``BankStore.load``)."""
    sh = bank_shardings(layout, mesh, replicate_levels=replicate_levels, rules=rules, slots=slots)
    placement = level_placement(layout, mesh, replicate_levels, slots)
    params, mu, nu, count, dirty = {}, {}, {}, {}, {}
    for lv in layout.levels:
        key, rows = lv.key, placement[lv.key].padded
        if placement[key].slots:  # off device: empty slot buffers, filled per step by memlm.bank.tiers
            shape = lambda a, key=key, r=lv.rank: (placement[key].device_rows, *a.shape(r))  # noqa: E731
            params[key] = {a.name: jax.device_put(np.zeros(shape(a), layout.master_dtype),
                                                  sh.params[key][a.name]) for a in layout.arrays}
            mu[key] = {a.name: jax.device_put(np.zeros(shape(a), np.float32), sh.mu[key][a.name])
                       for a in layout.arrays}
            nu[key] = {a.name: jax.device_put(np.zeros(shape(a), np.float32), sh.nu[key][a.name])
                       for a in layout.arrays}
            count[key] = jax.device_put(np.zeros(placement[key].device_rows, np.int32), sh.count[key])
            dirty[key] = jax.device_put(np.zeros(placement[key].device_rows, bool), sh.dirty[key])
            continue
        kinds = ("params",) if inference else KINDS
        trees = {"params": params, "mu": mu, "nu": nu}
        for kind in kinds:
            cast = layout.dtype if inference else None
            trees[kind][key] = {a.name: load_field(layout, plan, batch_bytes, lv, Field(a.name, kind),
                                                   sh.params[key][a.name], rows, cast) for a in layout.arrays}
        if inference:
            empty = jnp.zeros((0,), jnp.float32)
            mu[key] = {a.name: empty for a in layout.arrays}
            nu[key] = {a.name: empty for a in layout.arrays}
            count[key] = jnp.zeros((0,), jnp.int32)
            dirty[key] = jnp.zeros((0,), jnp.bool_)
            continue
        count[key] = load_field(layout, plan, batch_bytes, lv, Field(None, "count"), sh.count[key], rows)
        dirty[key] = jax.device_put(np.zeros(rows, bool), sh.dirty[key])
    return BankState(params=params, mu=mu, nu=nu, count=count, dirty=dirty, layout=layout)


def load_field(layout: BankLayout, plan: PlanFn, batch_bytes: int, lv: LevelLayout, field: Field,
               sharding: jax.sharding.Sharding, rows: int, cast: str | None = None) -> jax.Array:
    """One field as a global array of ``rows`` (>= nodes; padding rows are zero) in ``sharding``,
    each addressable shard read from the store chunk by chunk."""
    dtype = cast or field.dtype(layout)
    shape = (rows, *field.row_shape(layout, lv))
    by_rows: dict[tuple[int, int], list] = collections.defaultdict(list)
    for device, index in sharding.addressable_devices_indices_map(shape).items():
        start, stop, _ = index[0].indices(rows)
        by_rows[(start, stop)].append((device, index[1:]))
    chunk = max(1, batch_bytes // max(1, math.prod(shape[1:]) * np.dtype(jnp.dtype(dtype)).itemsize))

    def read(a: int, b: int) -> np.ndarray:
        out = np.zeros((b - a, *shape[1:]), jnp.dtype(dtype))
        real = min(b, lv.nodes)
        if real > a:
            out[:real - a] = plan(lv, field, np.arange(a, real))()
        return out

    buffers = {}
    for (start, stop), targets in by_rows.items():
        if stop - start <= chunk:
            block = read(start, stop)
            for device, rest in targets:
                buffers[device] = jax.device_put(block[(slice(None), *rest)], device)
            continue
        for device, rest in targets:
            local = (stop - start, *(len(range(*s.indices(n))) for s, n in zip(rest, shape[1:], strict=True)))
            buffers[device] = jnp.zeros(local, dtype, device=device)
        for a in range(start, stop, chunk):
            block = read(a, min(a + chunk, stop))
            for device, rest in targets:
                part = jax.device_put(block[(slice(None), *rest)], device)
                buffers[device] = _set_rows(buffers[device], part, np.int32(a - start))
    arrays = [buffers[d] for d in sharding.addressable_devices_indices_map(shape)]
    return jax.make_array_from_single_device_arrays(shape, sharding, arrays)
