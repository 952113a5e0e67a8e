"""The training step: micro-batches, the explicit bank exchange, a chunked loss, clipping, updates.

One jitted function with explicit shardings and donated state serves every mode:

- ``anchor``:  dense anchor pretraining (no memory).
- ``frozen``:  memory training with the anchor frozen (no anchor gradient is computed).
- ``cotrain``: anchor and memory together, from a pretrained anchor.
- ``scratch``: anchor and memory together, from random init.

A step takes the global batch (``train.batch_size`` sequences) and scans it in micro-batches of
``train.microbatch_size`` sequences. Each micro-step:

1. fetches, per level, the blocks its sequences' paths name: every data-parallel shard dedups its
   node ids and gets the rows from the shards that own them (``memlm.bank.exchange``: explicit
   ``all_to_all`` rounds inside ``shard_map``; GSPMD is never asked to gather from the bank);
2. runs the anchor on a :class:`~memlm.memspec.SlotMemory` (each block once, gathered per layer
   inside the layer scan) and a chunked cross-entropy (never ``[B, T, vocab]`` logits), and takes
   the gradient of the *summed* NLL w.r.t. the anchor and the fetched slots (never the bank);
3. adds the anchor gradient into a float32 accumulator in the parameters' shardings and pushes
   the slot gradients back to their owners, which accumulate them per node in float32.

After the last micro-step the gradients are divided by the batch's token count, so an accumulated
step equals the whole-batch step. A sequence flagged ``generic`` (probability 1/(k+1), drawn by
the loader) reads the generic memory instead of its path and touches no bank node.

Clipping (global norm, ``train.clip_norm``): the norm is taken over the anchor gradient plus the
per-node *summed* bank and generic gradients (the gradient the bank as a parameter would have),
so it equals the dense-bank global norm; anchor and memory gradients are scaled by one factor.
Each owner then applies the row-wise AdamW (``memlm.bank.optimizer``) to the nodes of its own
rows that the batch touched, with per-node step counters.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import struct
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from memlm.bank import exchange
from memlm.bank.device import (
    DP_AXES,
    BankState,
    LevelPlacement,
    abstract_bank,
    bank_shardings,
    dp_size,
    init_state,
    level_placement,
    tier_bytes,
)
from memlm.bank.layout import BankLayout
from memlm.bank.optimizer import update_owned_rows
from memlm.config import ConfigError
from memlm.data.loader import uses_sibling_paths
from memlm.memspec import SlotMemory
from memlm.model.anchor import BIASES
from memlm.model.functional import AnchorFunctional
from memlm.train.loss import chunk_length, chunked_nll
from memlm.train.schedule import cosine_with_warmup

BATCH_KEYS = ("tokens", "segment_ids", "positions", "paths", "generic")
FLAG_KEYS = ("generic", "sibling")  # [B] bool per sequence; "sibling" only with sibling paths on


def batch_keys(cfg: ml_collections.ConfigDict) -> tuple[str, ...]:
    """The keys of a step's batch: ``sibling`` joins them when the run trains with sibling paths."""
    return BATCH_KEYS + (("sibling",) if uses_sibling_paths(cfg) else ())


@struct.dataclass
class TrainState:
    step: jax.Array
    params: dict
    opt_state: Any
    bank: BankState | None
    generic: BankState | None


def next_token_loss(logits: jax.Array, tokens: jax.Array, segment_ids: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Mean next-token cross-entropy over real tokens: position t predicts t+1 within the same document.

    Returns (mean loss, number of predicted tokens). Padding (segment 0) and document boundaries
    are excluded; the EOT that ends a document belongs to it and is predicted.
    """
    nll, n = per_sequence_nll(logits, tokens, segment_ids)
    n = jnp.sum(n)
    return jnp.sum(nll) / jnp.maximum(n, 1), n


def per_sequence_nll(logits: jax.Array, tokens: jax.Array, segment_ids: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(summed NLL, predicted-token count) per sequence, for evaluation."""
    seg = segment_ids
    mask = (seg[:, 1:] == seg[:, :-1]) & (seg[:, :-1] != 0)
    logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]
    return jnp.sum(jnp.where(mask, nll, 0.0), axis=1), jnp.sum(mask, axis=1)


def uses_memory(cfg: ml_collections.ConfigDict) -> bool:
    return cfg.train.mode != "anchor" and cfg.memory.type != "none"


def decay_mask(axes: dict) -> dict:
    """Weight decay on matrices only: every parameter but the norm gains (logical axis ``norm``,
    stacked ``[layers, d]`` included) and the q/k/v biases."""
    return {name: "norm" not in ax and name not in BIASES for name, ax in axes.items()}


def anchor_optimizer(cfg: ml_collections.ConfigDict,
                     fn: AnchorFunctional | None = None) -> optax.GradientTransformation:
    t = cfg.train
    fn = fn or AnchorFunctional(cfg)
    lr = cosine_with_warmup(t.lr, t.min_lr, t.warmup_steps, t.steps)
    return optax.adamw(lr, b1=t.b1, b2=t.b2, eps=t.eps, weight_decay=t.weight_decay, mask=decay_mask(fn.axes))


@dataclasses.dataclass(frozen=True)
class StepPlan:
    """The static shapes of one config's step on one mesh (what ``memlm compile`` reports too)."""

    batch: int  # global sequences per step
    microbatch: int  # global sequences per micro-step
    shards: int  # data-parallel shards
    loss_chunk: int  # positions per loss chunk
    levels: dict[str, LevelPlacement]  # the bank's placement (empty without memory; slots > 0: off device)
    requests: dict[str, int]  # per level: distinct nodes one shard fetches per micro-step (padded)
    owned: dict[str, int]  # per level: rows of one owner's per-step gradient accumulator
    capacity: dict[str, int]  # per level: rows per destination per exchange round

    @property
    def micro_steps(self) -> int:
        return self.batch // self.microbatch

    @property
    def off_device(self) -> dict[str, LevelPlacement]:
        """The levels whose rows are brought to the device per step (``memlm.bank.tiers``)."""
        return {k: pl for k, pl in self.levels.items() if pl.slots}


def plan_step(cfg: ml_collections.ConfigDict, mesh: Mesh, bank_layout: BankLayout | None) -> StepPlan:
    """Micro-batch, slot and accumulator sizes for ``cfg`` on ``mesh``; fails naming the bad key."""
    t = cfg.train
    shards = dp_size(mesh)
    batch, micro = t.batch_size, t.microbatch_size or t.batch_size
    if batch % micro:
        raise ConfigError(f"config key 'train.microbatch_size' = {micro}: must divide train.batch_size = {batch}")
    if micro % shards:
        raise ConfigError(f"config key 'train.microbatch_size' = {micro}: not divisible by the data-parallel size "
                          f"{shards} (mesh data={mesh.shape['data']} x fsdp={mesh.shape['fsdp']})")
    per_device = micro // shards
    chunk = chunk_length(cfg.data.seq_len, per_device, t.loss_chunk)
    levels = (tier_placement(bank_layout, mesh, cfg.bank.replicate_levels, cfg.bank.device_levels, batch)
              if bank_layout is not None else {})
    if bank_layout is not None and cfg.bank.device_bytes:
        check_device_budget(cfg, bank_layout, mesh, levels)
    requests, owned, capacity = {}, {}, {}
    for key, pl in levels.items():
        requests[key] = min(per_device, pl.nodes + 1)
        owned[key] = min(batch, pl.nodes if pl.replicated else pl.per_shard)
        auto = max(1, math.ceil(requests[key] / pl.shards))
        capacity[key] = min(requests[key], cfg.bank.exchange_rows or auto)
    return StepPlan(batch, micro, shards, chunk, levels, requests, owned, capacity)


def tier_placement(layout: BankLayout, mesh: Mesh, replicate_levels: int, device_levels: int,
                   batch: int) -> dict[str, LevelPlacement]:
    """The bank's placement with levels deeper than ``device_levels`` (>= 0) off device: each
    shard then holds, per step, the rows of the nodes it owns that the batch touches."""
    levels = level_placement(layout, mesh, replicate_levels)
    off = {k: pl for k, pl in levels.items() if 0 <= device_levels < int(k[5:])}
    if not off:
        return levels
    return level_placement(layout, mesh, replicate_levels, {k: min(batch, pl.per_shard) for k, pl in off.items()})


def check_device_budget(cfg: ml_collections.ConfigDict, layout: BankLayout, mesh: Mesh,
                        levels: dict[str, LevelPlacement]) -> None:
    """Fail naming the levels to move off device when the bank state on one device exceeds
    ``bank.device_bytes`` (replicated levels must stay on device)."""
    budget, b = cfg.bank.device_bytes, cfg.bank
    need = sum(t["device_bytes"] for t in tier_bytes(layout, levels, b.host_cache_bytes))
    if need <= budget:
        return
    per_level = ", ".join(f"level {t['level']} {t['device_bytes'] / 1e9:.3g} GB ({t['tier']})"
                          for t in tier_bytes(layout, levels, b.host_cache_bytes))
    fits = None
    deepest = layout.levels[-1].level
    for n in range(deepest, b.replicate_levels - 1, -1):
        trial = tier_placement(layout, mesh, b.replicate_levels, n, cfg.train.batch_size)
        if sum(t["device_bytes"] for t in tier_bytes(layout, trial, b.host_cache_bytes)) <= budget:
            fits = n
            break
    if fits is not None:
        moved = f"level {deepest}" if fits + 1 == deepest else f"levels {fits + 1}-{deepest}"
        advice = f"set bank.device_levels={fits} ({moved} off device)"
    else:
        advice = "no split fits: use more devices, replicate fewer levels or a smaller batch"
    raise ConfigError(f"config key 'bank.device_bytes' = {budget}: the bank state needs {need / 1e9:.3g} GB per "
                      f"device ({per_level}); {advice}")


def tier_report(cfg: ml_collections.ConfigDict, mesh: Mesh) -> list[dict]:
    """Per bank level on ``mesh``: tier, training-state bytes per device and off device per shard
    (what ``memlm info`` and ``memlm compile`` print); empty without memory."""
    if not uses_memory(cfg):
        return []
    layout = BankLayout.from_config(cfg)
    return tier_bytes(layout, plan_step(cfg, mesh, layout).levels, cfg.bank.host_cache_bytes)


@dataclasses.dataclass
class StepFns:
    """The jitted init and step of a config on a mesh, with the shardings they use."""

    init: Callable[..., TrainState]
    step: Callable[[TrainState, dict], tuple[TrainState, dict]]
    state_shardings: TrainState
    batch_shardings: dict
    fn: AnchorFunctional
    bank_layout: BankLayout | None
    generic_layout: BankLayout | None
    plan: StepPlan
    abstract_state: Callable[[], TrainState]


def _shard_map(mesh: Mesh, f: Callable, in_specs, out_specs) -> Callable:
    return jax.shard_map(f, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)


def build(cfg: ml_collections.ConfigDict, mesh: Mesh) -> StepFns:
    """Jitted ``init(seed) -> TrainState`` and ``step(state, batch) -> (state, metrics)`` for ``cfg``."""
    t = cfg.train
    fn = AnchorFunctional(cfg)
    tx = anchor_optimizer(cfg, fn)
    memory = uses_memory(cfg)
    bank_layout = BankLayout.from_config(cfg) if memory else None
    generic_layout = BankLayout.generic_from_config(cfg) if memory and cfg.memory.generic else None
    train_anchor = t.mode != "frozen"
    anchor_lr = cosine_with_warmup(t.lr, t.min_lr, t.warmup_steps, t.steps)
    mem_lr = cosine_with_warmup(t.memory_lr, t.memory_min_lr, t.memory_warmup_steps, t.steps)
    plan = plan_step(cfg, mesh, bank_layout)
    gen_plan = level_placement(generic_layout, mesh, replicate_levels=1) if generic_layout else {}
    replicate = cfg.bank.replicate_levels

    replicated = NamedSharding(mesh, P())
    param_sh = fn.shardings(mesh)
    opt_abstract = jax.eval_shape(tx.init, fn.shapes)
    opt_sh = optax.tree_map_params(tx, lambda _, s: s, opt_abstract, param_sh,
                                   transform_non_params=lambda _: replicated)
    tier_slots = {k: pl.slots for k, pl in plan.off_device.items()}
    bank_sh = bank_shardings(bank_layout, mesh, replicate_levels=replicate, slots=tier_slots) if memory else None
    gen_sh = bank_shardings(generic_layout, mesh, replicate_levels=1) if generic_layout else None
    state_sh = TrainState(step=replicated, params=param_sh, opt_state=opt_sh, bank=bank_sh, generic=gen_sh)
    batch_sh = {k: NamedSharding(mesh, P(DP_AXES) if k in FLAG_KEYS else P(DP_AXES, None)) for k in batch_keys(cfg)}
    if plan.off_device:  # per step: each shard's slot ids (the owned nodes the batch touches), [shards, slots]
        batch_sh["slots"] = {k: NamedSharding(mesh, P(DP_AXES, None)) for k in plan.off_device}

    def init(seed: int, with_banks: bool = True) -> TrainState:
        """Fresh state; ``with_banks=False`` leaves the banks to the caller (e.g. a bank store)."""
        key = jax.random.key(seed)
        params = fn.init(key, mesh)
        opt_state = jax.jit(tx.init, out_shardings=opt_sh)(params)
        if memory and with_banks and tier_slots:
            raise ConfigError("config key 'bank.device_levels': levels off device come from a bank store "
                              "(memlm.bank.tiers), not from init")
        bank = init_state(bank_layout, seed + 1, mesh, replicate_levels=replicate) if memory and with_banks else None
        generic = init_state(generic_layout, seed + 2, mesh) if generic_layout and with_banks else None
        step = jax.device_put(jnp.zeros((), jnp.int32), replicated)
        return TrainState(step=step, params=params, opt_state=opt_state, bank=bank, generic=generic)

    def abstract_state() -> TrainState:
        """The state as ShapeDtypeStructs in their shardings (nothing allocated: for AOT compiles)."""
        shapes = TrainState(
            step=jax.ShapeDtypeStruct((), jnp.int32), params=fn.shapes, opt_state=opt_abstract,
            bank=abstract_bank(bank_layout, mesh, replicate, tier_slots) if memory else None,
            generic=abstract_bank(generic_layout, mesh, 1) if generic_layout else None)
        return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, state_sh)

    keys = list(plan.levels)
    lvs = {lv.key: lv for lv in bank_layout.levels} if memory else {}
    dp = P(DP_AXES)

    # ---- shard_map pieces: every function below sees one data-parallel shard's values ----------
    def split_micro(batch: dict) -> dict:
        """[B, ...] -> [micro_steps, microbatch, ...]: micro-step j takes rows j*m..(j+1)*m of every shard."""
        def local(*xs):
            return tuple(x.reshape(plan.micro_steps, -1, *x.shape[1:]) for x in xs)

        names = list(batch)
        specs = tuple(P(DP_AXES) for _ in names)
        out = _shard_map(mesh, local, specs, tuple(P(None, DP_AXES) for _ in names))(*[batch[n] for n in names])
        return dict(zip(names, out, strict=True))

    def level_ids(paths: jax.Array, use_generic: jax.Array) -> dict[str, jax.Array]:
        """Per level, each sequence's node (-1 for sequences that read the generic memory)."""
        return {k: jnp.where(use_generic, -1, paths[:, lvs[k].level - 1]).astype(jnp.int32) for k in keys}

    def owners_plan(paths: jax.Array, untouched: jax.Array, use_generic: jax.Array) -> tuple[dict, jax.Array]:
        """Per level, the nodes each owner's accumulator covers this step (those of the sequences not
        ``untouched``); whether any row is generic."""
        def local(paths, untouched, use_generic):
            me = jax.lax.axis_index(DP_AXES)
            out = {}
            for k, ids in level_ids(paths, untouched).items():
                all_ids = jax.lax.all_gather(ids, DP_AXES, tiled=True)
                out[k] = exchange.owned_touched(all_ids, plan.levels[k], me, plan.owned[k])[None]
            any_generic = jax.lax.psum(jnp.sum(use_generic.astype(jnp.int32)), DP_AXES) > 0
            return out, any_generic

        return _shard_map(mesh, local, (dp, dp, dp), ({k: dp for k in keys}, P()))(paths, untouched, use_generic)

    def fetch_micro(bank_params: dict, gen_params: dict | None, paths: jax.Array, use_generic: jax.Array,
                    slot_ids: dict):
        """Slots of one micro-batch: per level ``[shards, slots, *block]`` (float32 from compute-dtype
        rows), the per-sequence slot index, the requested ids, the generic block per shard."""
        dtype = bank_layout.dtype

        def local(bank_params, gen_params, paths, use_generic, slot_ids):
            me = jax.lax.axis_index(DP_AXES)
            slots, index, uniq, remote = {}, {}, {}, jnp.zeros((), jnp.int32)
            for k, ids in level_ids(paths, use_generic).items():
                u, inv = exchange.unique_ids(ids, plan.requests[k])
                rt = exchange.route(u, plan.levels[k], me, plan.capacity[k], DP_AXES)
                rows = exchange.fetch(bank_params[k], u, rt, plan.levels[k], me, plan.capacity[k], DP_AXES, dtype,
                                      slot_ids[k][0] if k in slot_ids else None)
                slots[k] = {n: r.astype(jnp.float32)[None] for n, r in rows.items()}
                index[k], uniq[k] = inv[None], u[None]
                remote = remote + rt.remote_count
            gen = None
            if gen_params is not None:
                gen = {n: a[0].astype(dtype).astype(jnp.float32)[None] for n, a in gen_params["level1"].items()}
            return slots, index, uniq, gen, jax.lax.psum(remote, DP_AXES)

        bank_specs = {k: {a.name: _level_spec(plan.levels[k]) for a in bank_layout.arrays} for k in keys}
        gen_spec = {"level1": {a.name: P() for a in generic_layout.arrays}} if generic_layout else None
        out_specs = ({k: {a.name: dp for a in bank_layout.arrays} for k in keys}, {k: dp for k in keys},
                     {k: dp for k in keys}, {a.name: dp for a in bank_layout.arrays} if generic_layout else None, P())
        slot_specs = {k: dp for k in slot_ids}
        return _shard_map(mesh, local, (bank_specs, gen_spec, dp, dp, slot_specs), out_specs)(
            bank_params, gen_params, paths, use_generic, slot_ids)

    def push_micro(acc: dict, acc_ids: dict, uniq: dict, grads: dict) -> dict:
        """Send one micro-step's slot gradients to their owners' accumulators."""
        def local(acc, acc_ids, uniq, grads):
            me = jax.lax.axis_index(DP_AXES)
            out = {}
            for k in keys:
                pl, cap = plan.levels[k], plan.capacity[k]
                rt = exchange.route(uniq[k][0], pl, me, cap, DP_AXES)
                got = exchange.push({n: a[0] for n, a in acc[k].items()}, acc_ids[k][0], uniq[k][0],
                                    {n: g[0] for n, g in grads[k].items()}, rt, pl, cap, DP_AXES)
                out[k] = {n: a[None] for n, a in got.items()}
            return out

        tree = {k: {a.name: dp for a in bank_layout.arrays} for k in keys}
        ids = {k: dp for k in keys}
        return _shard_map(mesh, local, (tree, ids, ids, tree), tree)(acc, acc_ids, uniq, grads)

    def finish_bank(acc: dict, gen_acc: dict | None) -> tuple[dict, dict | None, jax.Array]:
        """All-reduce the replicated levels' (and the generic memory's) shares; the squared norm of
        the per-node gradients (each node counted once)."""
        def local(acc, gen_acc):
            sq = jnp.zeros((), jnp.float32)
            out = {}
            for k in keys:
                if plan.levels[k].replicated:
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

        tree = {k: {a.name: dp for a in bank_layout.arrays} for k in keys}
        gtree = {a.name: dp for a in bank_layout.arrays} if gen_acc is not None else None
        return _shard_map(mesh, local, (tree, gtree), (tree, gtree, P(), P()))(acc, gen_acc)

    def update_bank(state: BankState, acc: dict, acc_ids: dict, placement: dict, factor: jax.Array,
                    hp: dict, slot_ids: dict | None = None) -> BankState:
        """Each owner's row-wise AdamW on the touched nodes of its own rows (gradient = acc * factor)."""
        level_keys = list(placement)

        slot_ids = slot_ids or {}

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
        arr = {k: {a.name: _level_spec(placement[k]) for a in lay.arrays} for k in level_keys}
        node = {k: _node_spec(placement[k]) for k in level_keys}
        tree = {k: {a.name: dp for a in lay.arrays} for k in level_keys}
        ids = {k: dp for k in level_keys}
        lr = hp.pop("lr")
        sids = {k: dp for k in slot_ids}
        out = _shard_map(mesh, local, (arr, arr, arr, node, node, tree, ids, P(), P(), sids),
                         (arr, arr, arr, node, node))(state.params, state.mu, state.nu, state.count, state.dirty, acc,
                                                      acc_ids, factor, lr, slot_ids)
        return state.replace(params=out[0], mu=out[1], nu=out[2], count=out[3], dirty=out[4])

    # ---- the step --------------------------------------------------------------------------------
    def loss_terms(params, mb, mem):
        hidden = fn.apply(params, mb["tokens"], mb["segment_ids"], mb["positions"], memory=mem, return_hidden=True)
        return chunked_nll(lambda h: fn.project(params, h), hidden, mb["tokens"], mb["segment_ids"], plan.loss_chunk)

    def step_fn(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        # Logical-axis constraints inside the model and the loss resolve against this mesh.
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
            return _step(state, batch)

    def _step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        metrics = {}
        batch = dict(batch)
        slot_ids = batch.pop("slots", {})
        micro = split_micro(batch)
        zeros_like_params = jax.tree.map(lambda s, sh: jax.lax.with_sharding_constraint(
            jnp.zeros(s.shape, jnp.float32), sh), fn.shapes, param_sh)
        if memory:
            # A sibling-path sequence reads its blocks but touches none of them (no gradient, no update).
            untouched = batch["generic"] | batch["sibling"] if "sibling" in batch else batch["generic"]
            acc_ids, any_generic = owners_plan(batch["paths"], untouched, batch["generic"])
            acc0 = {k: {a.name: jnp.zeros((plan.shards, plan.owned[k], *a.shape(lvs[k].rank)), jnp.float32)
                        for a in bank_layout.arrays} for k in keys}
            gen0 = {a.name: jnp.zeros((plan.shards, *a.shape(generic_layout.fetched_rank)), jnp.float32)
                    for a in generic_layout.arrays} if generic_layout else None
        else:
            acc_ids, any_generic, acc0, gen0 = {}, None, {}, None
        carry0 = dict(anchor=zeros_like_params if train_anchor else None, bank=acc0, generic=gen0,
                      nll=jnp.zeros((), jnp.float32), tokens=jnp.zeros((), jnp.int32),
                      remote=jnp.zeros((), jnp.int32))

        def body(carry, mb):
            carry = dict(carry)
            if not memory:
                (nll, n), g = jax.value_and_grad(lambda p: loss_terms(p, mb, None), has_aux=True)(state.params)
                carry["anchor"] = jax.tree.map(lambda a, x: a + x.astype(jnp.float32), carry["anchor"], g)
            else:
                gen_params = state.generic.params if generic_layout else None
                slots, index, uniq, gen, remote = fetch_micro(state.bank.params, gen_params, mb["paths"],
                                                              mb["generic"], slot_ids)

                def loss_memory(params, slots, gen):
                    mem = SlotMemory(levels=tuple(slots[k] for k in keys), index=tuple(index[k] for k in keys),
                                     generic=gen, use_generic=mb["generic"] if gen is not None else None,
                                     frozen=mb.get("sibling"))
                    return loss_terms(params, mb, mem)

                argnums = (0, 1, 2) if train_anchor else (1, 2)
                (nll, n), grads = jax.value_and_grad(loss_memory, argnums=argnums, has_aux=True)(
                    state.params, slots, gen)
                if train_anchor:
                    g_params, g_slots, g_gen = grads
                    carry["anchor"] = jax.tree.map(lambda a, x: a + x.astype(jnp.float32), carry["anchor"], g_params)
                else:
                    g_slots, g_gen = grads
                carry["bank"] = push_micro(carry["bank"], acc_ids, uniq, g_slots)
                if g_gen is not None:
                    carry["generic"] = jax.tree.map(jnp.add, carry["generic"], g_gen)
                carry["remote"] = carry["remote"] + remote
            carry["nll"] = carry["nll"] + nll
            carry["tokens"] = carry["tokens"] + n.astype(jnp.int32)
            return carry, None

        if plan.micro_steps == 1:  # no loop around a single micro-step (XLA keeps a one-trip while)
            carry, _ = body(carry0, jax.tree.map(lambda x: x[0], micro))
        else:
            carry, _ = jax.lax.scan(body, carry0, micro)
        n_tok = carry["tokens"]
        inv = 1.0 / jnp.maximum(n_tok, 1).astype(jnp.float32)
        sq = jnp.zeros((), jnp.float32)
        if train_anchor:
            anchor_sq = optax.tree_utils.tree_norm(carry["anchor"], squared=True) * inv**2
            metrics["grad_norm_anchor"] = jnp.sqrt(anchor_sq)
            sq = sq + anchor_sq
        if memory:
            bank_acc, gen_acc, bank_sq, gen_sq = finish_bank(carry["bank"], carry["generic"])
            metrics["grad_norm_bank"] = jnp.sqrt(bank_sq) * inv
            sq = sq + bank_sq * inv**2
            if generic_layout is not None:
                metrics["grad_norm_generic"] = jnp.sqrt(gen_sq) * inv
                sq = sq + gen_sq * inv**2
        norm = jnp.sqrt(sq)
        scale = jnp.minimum(1.0, t.clip_norm / (norm + 1e-6))
        metrics["grad_norm"] = norm

        params, opt_state = state.params, state.opt_state
        if train_anchor:
            g = jax.tree.map(lambda a: a * (inv * scale), carry["anchor"])
            updates, opt_state = tx.update(g, opt_state, params)
            params = optax.apply_updates(params, updates)
            metrics["lr_anchor"] = anchor_lr(state.step)
        bank, generic = state.bank, state.generic
        if memory:
            lr = mem_lr(state.step)
            hp = dict(b1=t.b1, b2=t.b2, eps=t.eps, weight_decay=jnp.asarray(t.memory_weight_decay, jnp.float32))
            bank = update_bank(bank, bank_acc, acc_ids, plan.levels, inv * scale, dict(hp, lr=lr), slot_ids)
            if generic_layout is not None:
                gen_ids = {"level1": jnp.broadcast_to(jnp.where(any_generic, 0, -1).astype(jnp.int32),
                                                      (plan.shards, 1))}
                gacc = {"level1": {n: a[:, None] for n, a in gen_acc.items()}}
                generic = update_bank(generic, gacc, gen_ids, gen_plan, inv * scale, dict(hp, lr=lr))
            metrics["lr_memory"] = lr
            metrics["generic_fraction"] = jnp.mean(batch["generic"].astype(jnp.float32))
            if "sibling" in batch:
                metrics["sibling_fraction"] = jnp.mean(batch["sibling"].astype(jnp.float32))
            metrics["bank/remote_rows"] = carry["remote"]
        metrics["loss"] = carry["nll"] * inv
        metrics["tokens"] = n_tok
        new = TrainState(step=state.step + 1, params=params, opt_state=opt_state, bank=bank, generic=generic)
        return new, metrics

    step = jax.jit(step_fn, in_shardings=(state_sh, batch_sh), out_shardings=(state_sh, replicated),
                   donate_argnums=(0,))
    return StepFns(init=init, step=step, state_shardings=state_sh, batch_shardings=batch_sh, fn=fn,
                   bank_layout=bank_layout, generic_layout=generic_layout, plan=plan, abstract_state=abstract_state)


def _level_spec(pl: LevelPlacement) -> P:
    return P() if pl.replicated else P(DP_AXES)


def _node_spec(pl: LevelPlacement) -> P:
    return P() if pl.replicated else P(DP_AXES)


def device_batch(batch: dict, shardings: dict) -> dict:
    """A host batch (this process's rows) as global device arrays in the step's shardings; with levels
    off device, ``batch["slots"]`` holds every shard's slot ids (the same on every process)."""
    out = {k: jax.make_array_from_process_local_data(shardings[k], batch[k]) for k in shardings if k != "slots"}
    if "slots" in shardings:
        out["slots"] = {k: jax.make_array_from_callback(v.shape, shardings["slots"][k], lambda idx, v=v: v[idx])
                        for k, v in batch["slots"].items()}
    return out
