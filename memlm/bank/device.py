"""Device tier of the bank: its state on device, sharded over the data-parallel mesh axes,
and the gather that turns a batch of paths into a FetchedMemory inside the jitted step.

The node axis of every level (logical axis ``bank_nodes``) is split over the mesh axes
``data`` and ``fsdp`` when the node count divides; levels up to ``replicate_levels`` (and levels
too small to split) are replicated, so their gathers need no communication. Under GSPMD a
gather from a node-sharded level becomes a masked local gather plus an all-reduce of the
fetched rows (never an all-gather of the bank), and the optimizer's scatter stays local.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
from flax import struct
from jax.sharding import Mesh, NamedSharding

from memlm.bank.init import init_blocks
from memlm.bank.layout import NODE_AXIS, BankLayout
from memlm.memspec import FetchedMemory
from memlm.sharding import logical_to_spec

DEFAULT_RULES: dict[str, tuple[str, ...]] = {NODE_AXIS: ("data", "fsdp")}


@struct.dataclass
class BankState:
    """Bank parameters and their row-wise AdamW state, per level key (``"level2"``) and array name.

    ``params[level][name]``: ``[nodes, *shape(r_l)]`` in the bank dtype; ``mu``/``nu``: the same
    in float32; ``count[level]``: ``[nodes]`` int32, the times each node was updated (its own
    bias-correction step); ``dirty[level]``: ``[nodes]`` bool, updated since the last save.
    """

    params: dict[str, dict[str, jax.Array]]
    mu: dict[str, dict[str, jax.Array]]
    nu: dict[str, dict[str, jax.Array]]
    count: dict[str, jax.Array]
    dirty: dict[str, jax.Array]
    layout: BankLayout = struct.field(pytree_node=False)


def bank_shardings(layout: BankLayout, mesh: Mesh, *, replicate_levels: int = 1,
                   rules: Mapping[str, Sequence[str]] | None = None) -> BankState:
    """A BankState whose leaves are the NamedShardings of each state array (for in/out_shardings).

    ``rules`` maps logical axes to mesh axes (``memlm.sharding.logical_to_spec`` semantics; default:
    ``bank_nodes`` over ``data``/``fsdp``, the block axes replicated; pass ``memlm.sharding.RULES``
    to also split e.g. ``mem_rank`` over ``tensor``); levels ``<= replicate_levels`` keep their
    node axis replicated.
    """
    rules = dict(DEFAULT_RULES if rules is None else rules)
    params, nodes = {}, {}
    for lv in layout.levels:
        lv_rules = dict(rules)
        if lv.level <= replicate_levels:
            lv_rules[NODE_AXIS] = ()
        params[lv.key] = {a.name: NamedSharding(mesh, logical_to_spec(layout.logical_axes(a), layout.array_shape(lv, a),
                                                                       mesh, lv_rules)) for a in layout.arrays}
        nodes[lv.key] = NamedSharding(mesh, logical_to_spec((NODE_AXIS,), (lv.nodes,), mesh, lv_rules))
    return BankState(params=params, mu=params, nu=params, count=nodes, dirty=nodes, layout=layout)


def _init(layout: BankLayout, seed: int) -> BankState:
    params, mu, count, dirty = {}, {}, {}, {}
    for lv in layout.levels:
        ids = jnp.arange(lv.nodes, dtype=jnp.int32)
        params[lv.key] = {a.name: init_blocks(layout, seed, lv, a, ids) for a in layout.arrays}
        mu[lv.key] = {a.name: jnp.zeros(layout.array_shape(lv, a), jnp.float32) for a in layout.arrays}
        count[lv.key] = jnp.zeros((lv.nodes,), jnp.int32)
        dirty[lv.key] = jnp.zeros((lv.nodes,), jnp.bool_)
    nu = jax.tree.map(jnp.zeros_like, mu)
    return BankState(params=params, mu=mu, nu=nu, count=count, dirty=dirty, layout=layout)


def init_state(layout: BankLayout, seed: int, mesh: Mesh | None = None, *, replicate_levels: int = 1,
               rules: Mapping[str, Sequence[str]] | None = None) -> BankState:
    """A freshly initialised bank, created by a jitted init straight into its shards.

    Values equal the store's lazy init (``BankStore.create``) bit for bit on the same backend; to
    resume training exactly on an accelerator, start from ``BankStore.load`` instead, which
    computes the init on the host like every later read of an untrained block.
    """
    shardings = None if mesh is None else bank_shardings(layout, mesh, replicate_levels=replicate_levels, rules=rules)
    return jax.jit(lambda: _init(layout, seed), out_shardings=shardings)()


def gather(state: BankState, paths: jax.Array) -> FetchedMemory:
    """FetchedMemory ``{name: [B, *shape(R)]}`` for paths ``[B, depth]`` (int32), levels
    concatenated along the rank axis in level order. Keeps the bank dtype; usable inside jit."""
    layout = state.layout
    out = {}
    for a in layout.arrays:
        parts = [jnp.take(state.params[lv.key][a.name], paths[:, lv.level - 1], axis=0) for lv in layout.levels]
        out[a.name] = parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=a.rank_axis + 1)
    return out


def split_fetched(layout: BankLayout, fetched: FetchedMemory) -> dict[str, dict[str, jax.Array]]:
    """Split a FetchedMemory-shaped tree (e.g. its gradient) into per-level pieces ``[B, *shape(r_l)]``."""
    offsets = layout.rank_offsets()
    out: dict[str, dict[str, jax.Array]] = {lv.key: {} for lv in layout.levels}
    for a in layout.arrays:
        x = fetched[a.name]
        if x.shape[a.rank_axis + 1] != layout.fetched_rank:
            raise ValueError(f"fetched array {a.name!r}: rank axis {a.rank_axis + 1} has size "
                             f"{x.shape[a.rank_axis + 1]}, expected R = {layout.fetched_rank}")
        for lv in layout.levels:
            start, end = offsets[lv.key]
            out[lv.key][a.name] = jax.lax.slice_in_dim(x, start, end, axis=a.rank_axis + 1)
    return out


def clear_dirty(state: BankState) -> BankState:
    """The same state with every dirty flag cleared (after a save); keeps the flags' sharding."""
    return state.replace(dirty=jax.tree.map(lambda d: jnp.logical_and(d, False), state.dirty))


def state_bytes(state: BankState) -> int:
    """Bytes held by a BankState (parameters, moments, counters, flags)."""
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state))
