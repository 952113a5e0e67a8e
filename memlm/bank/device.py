"""Device tier of the bank: its state on device, split by node over the data-parallel mesh axes.

Placement (:func:`level_placement`). The node axis of a level (logical axis ``bank_nodes``) is
split over the data-parallel shards, the mesh axes ``data`` x ``fsdp`` taken together: shard d
owns the contiguous nodes ``[d * per_shard, (d + 1) * per_shard)``. A level whose node count
does not divide the shard count is padded with zero rows up to the next multiple (never silently
replicated); levels up to ``bank.replicate_levels`` are replicated on every device, an explicit
choice for small shallow levels. The training step moves rows between shards explicitly
(``memlm.bank.exchange``); :func:`gather` here is the plain gather for inference and tests.

Parameters are stored in ``layout.master_dtype`` (float32 by default) and cast to the compute
dtype ``layout.dtype`` when a block is fetched, so Adam steps smaller than a bfloat16 ulp still
accumulate.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
from flax import struct
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from memlm.bank.init import init_blocks
from memlm.bank.layout import NODE_AXIS, BankLayout
from memlm.memspec import FetchedMemory
from memlm.sharding import DP_AXES, logical_to_spec

DEFAULT_RULES: dict[str, tuple[str, ...]] = {NODE_AXIS: DP_AXES}  # a level's node axis is split over both


@dataclasses.dataclass(frozen=True)
class LevelPlacement:
    """Where one level's rows live: ``shards`` data-parallel shards of ``per_shard`` rows each
    (``shards == 1``: every device holds the whole level). ``padded - nodes`` zero rows pad the
    node axis to a multiple of the shard count."""

    key: str
    nodes: int
    padded: int
    shards: int
    slots: int = 0  # > 0: the level lives off device; each shard holds this many rows of it per step

    @property
    def replicated(self) -> bool:
        return self.shards == 1

    @property
    def per_shard(self) -> int:
        """Nodes each shard owns (of the whole level, wherever its rows live)."""
        return self.padded // self.shards

    @property
    def device_rows(self) -> int:
        """Rows of the level on device: the whole (padded) level, or ``shards x slots`` off device."""
        return self.shards * self.slots if self.slots else self.padded


def row_state_bytes(layout: BankLayout, lv) -> int:
    """Training-state bytes of one node on device: master parameters, two float32 moments, the
    int32 update counter and the dirty flag (the compute copy is cast on fetch, never stored)."""
    return layout.block_params(lv) * (layout.master_itemsize + 8) + 4 + 1


def tier_bytes(layout: BankLayout, placement: Mapping[str, LevelPlacement], cache_bytes: int = 0) -> list[dict]:
    """Per level: its tier (``device``, ``host`` memory, or ``store`` streamed through a bounded
    cache), the training-state bytes it needs on each device, and off device per shard."""
    out = []
    for lv in layout.levels:
        pl = placement[lv.key]
        row = row_state_bytes(layout, lv)
        tier = "device" if not pl.slots else ("store" if cache_bytes else "host")
        rows = pl.slots if pl.slots else pl.per_shard
        out.append(dict(level=lv.level, key=lv.key, tier=tier, device_rows=rows, device_bytes=rows * row,
                        off_device_bytes=pl.per_shard * row if pl.slots else 0))
    return out


def dp_size(mesh: Mesh) -> int:
    """The number of data-parallel shards of a (data, fsdp, tensor) mesh."""
    return int(mesh.shape.get("data", 1)) * int(mesh.shape.get("fsdp", 1))


def level_placement(layout: BankLayout, mesh: Mesh | None, replicate_levels: int = 1,
                    slots: Mapping[str, int] | None = None) -> dict[str, LevelPlacement]:
    """Placement of every level of ``layout`` on ``mesh`` (None: one device); ``slots`` gives the
    per-shard device rows of the levels that live off device (``memlm.bank.tiers``)."""
    shards = 1 if mesh is None else dp_size(mesh)
    out = {}
    for lv in layout.levels:
        n = 1 if lv.level <= replicate_levels else shards
        out[lv.key] = LevelPlacement(lv.key, lv.nodes, -(-lv.nodes // n) * n, n, int((slots or {}).get(lv.key, 0)))
    return out


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
                   rules: Mapping[str, Sequence[str]] | None = None,
                   slots: Mapping[str, int] | None = None) -> BankState:
    """A BankState whose leaves are the NamedShardings of each state array (for in/out_shardings).

    ``rules`` maps logical axes to mesh axes (``memlm.sharding.logical_to_spec`` semantics; default:
    ``bank_nodes`` over ``data``/``fsdp``, the block axes replicated; pass ``memlm.sharding.RULES``
    to also split e.g. ``mem_rank`` over ``tensor``); levels ``<= replicate_levels`` keep their
    node axis replicated.
    """
    rules = dict(DEFAULT_RULES if rules is None else rules)
    rules.pop(NODE_AXIS, None)  # the node axis follows the level's placement
    placement = level_placement(layout, mesh, replicate_levels, slots)
    params, nodes = {}, {}
    for lv in layout.levels:
        pl = placement[lv.key]
        node_spec = None if pl.replicated else DP_AXES
        params[lv.key] = {}
        for a in layout.arrays:
            block = logical_to_spec(a.logical_axes, a.shape(lv.rank), mesh, rules)
            params[lv.key][a.name] = NamedSharding(mesh, P(node_spec, *block))
        nodes[lv.key] = NamedSharding(mesh, P(node_spec))
    return BankState(params=params, mu=params, nu=params, count=nodes, dirty=nodes, layout=layout)


def _init(layout: BankLayout, seed: int, placement: Mapping[str, LevelPlacement]) -> BankState:
    params, mu, count, dirty = {}, {}, {}, {}
    for lv in layout.levels:
        rows = placement[lv.key].device_rows
        ids = jnp.arange(rows, dtype=jnp.int32)
        real = ids < lv.nodes
        params[lv.key] = {}
        for a in layout.arrays:
            block = init_blocks(layout, seed, lv, a, ids)
            params[lv.key][a.name] = jnp.where(real.reshape((-1,) + (1,) * (block.ndim - 1)), block, 0)
        mu[lv.key] = {a.name: jnp.zeros((rows, *a.shape(lv.rank)), jnp.float32) for a in layout.arrays}
        count[lv.key] = jnp.zeros((rows,), jnp.int32)
        dirty[lv.key] = jnp.zeros((rows,), jnp.bool_)
    nu = jax.tree.map(jnp.zeros_like, mu)
    return BankState(params=params, mu=mu, nu=nu, count=count, dirty=dirty, layout=layout)


def init_state(layout: BankLayout, seed: int, mesh: Mesh | None = None, *, replicate_levels: int = 1,
               rules: Mapping[str, Sequence[str]] | None = None) -> BankState:
    """A freshly initialised bank, created by a jitted init straight into its shards (padding rows zero).

    Values equal the store's lazy init (``BankStore.create``) bit for bit on the same backend; to
    resume training exactly on an accelerator, start from ``BankStore.load`` instead, which
    computes the init on the host like every later read of an untrained block.
    """
    placement = level_placement(layout, mesh, replicate_levels)
    shardings = None if mesh is None else bank_shardings(layout, mesh, replicate_levels=replicate_levels, rules=rules)
    return jax.jit(lambda: _init(layout, seed, placement), out_shardings=shardings)()


def abstract_bank(layout: BankLayout, mesh: Mesh | None, replicate_levels: int = 1,
                  slots: Mapping[str, int] | None = None) -> BankState:
    """The shapes and dtypes of a bank's state on ``mesh`` (padded node axes; off-device levels as
    their per-step slots), allocating nothing."""
    return jax.eval_shape(lambda: _init(layout, 0, level_placement(layout, mesh, replicate_levels, slots)))


def gather(state: BankState, paths: jax.Array) -> FetchedMemory:
    """FetchedMemory ``{name: [B, *shape(R)]}`` for paths ``[B, depth]`` (int32), levels
    concatenated along the rank axis in level order. Keeps the stored dtype; usable inside jit."""
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
