"""The training step: micro-batches, the explicit bank exchange, a chunked loss, clipping, updates.

One jitted function with explicit shardings and donated state serves every mode:

- ``anchor``:  dense anchor pretraining (no memory).
- ``frozen``:  memory training with the anchor frozen (no anchor gradient is computed).
- ``cotrain``: anchor and memory together, from a pretrained anchor.
- ``scratch``: anchor and memory together, from random init.

A step takes the global batch (``train.batch_size`` sequences) and scans it in micro-batches of
``train.microbatch_size`` sequences. Each micro-step:

1. fetches, per level, the blocks its sequences' paths name: every data-parallel shard dedups its
   node ids and gets the rows from the shards that own them (``memlm.bank.sharded.ShardedBank``,
   explicit ``all_to_all`` rounds inside ``shard_map``; GSPMD is never asked to gather from the bank);
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

from memlm.bank.device import (
    BankState,
    LevelPlacement,
    abstract_bank,
    bank_shardings,
    dp_size,
    init_state,
    level_placement,
)
from memlm.bank.layout import BankLayout
from memlm.bank.placement import check_device_budget, tier_placement
from memlm.bank.sharded import ShardedBank
from memlm.config import ConfigError
from memlm.data.loader import uses_sibling_paths
from memlm.memspec import uses_memory
from memlm.model.anchor import BIASES
from memlm.model.functional import AnchorFunctional
from memlm.sharding import DP_AXES
from memlm.train.accumulate import accumulate_gradients, split_micro
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


class _Step:
    """The pieces of one config's step on one mesh: state shardings, init, the step itself.

    A step: accumulate the micro-batches' gradients (``memlm.train.accumulate``, the bank's
    exchange through ``memlm.bank.sharded.ShardedBank``), clip anchor and memory gradients by one
    global norm, update the anchor (optax AdamW) and commit the bank (row-wise AdamW per owner).
    """

    def __init__(self, cfg: ml_collections.ConfigDict, mesh: Mesh):
        t = cfg.train
        self.cfg, self.mesh = cfg, mesh
        self.fn = fn = AnchorFunctional(cfg)
        self.tx = tx = anchor_optimizer(cfg, fn)
        self.memory = memory = uses_memory(cfg)
        self.bank_layout = BankLayout.from_config(cfg) if memory else None
        self.generic_layout = BankLayout.generic_from_config(cfg) if memory and cfg.memory.generic else None
        self.train_anchor = t.mode != "frozen"
        self.anchor_lr = cosine_with_warmup(t.lr, t.min_lr, t.warmup_steps, t.steps)
        self.mem_lr = cosine_with_warmup(t.memory_lr, t.memory_min_lr, t.memory_warmup_steps, t.steps)
        self.plan = plan = plan_step(cfg, mesh, self.bank_layout)
        self.gen_plan = level_placement(self.generic_layout, mesh, replicate_levels=1) if self.generic_layout else {}
        self.bank = (ShardedBank(mesh, self.bank_layout, self.generic_layout, plan.levels, plan.requests, plan.owned,
                                 plan.capacity) if memory else None)
        self.replicated = replicated = NamedSharding(mesh, P())
        self.param_sh = fn.shardings(mesh)
        self.opt_abstract = jax.eval_shape(tx.init, fn.shapes)
        self.opt_sh = optax.tree_map_params(tx, lambda _, s: s, self.opt_abstract, self.param_sh,
                                            transform_non_params=lambda _: replicated)
        self.tier_slots = {k: pl.slots for k, pl in plan.off_device.items()}
        replicate = cfg.bank.replicate_levels
        bank_sh = (bank_shardings(self.bank_layout, mesh, replicate_levels=replicate, slots=self.tier_slots)
                   if memory else None)
        gen_sh = bank_shardings(self.generic_layout, mesh, replicate_levels=1) if self.generic_layout else None
        self.state_sh = TrainState(step=replicated, params=self.param_sh, opt_state=self.opt_sh, bank=bank_sh,
                                   generic=gen_sh)
        self.batch_sh = {k: NamedSharding(mesh, P(DP_AXES) if k in FLAG_KEYS else P(DP_AXES, None))
                         for k in batch_keys(cfg)}
        if plan.off_device:  # per step: each shard's slot ids (the owned nodes the batch touches), [shards, slots]
            self.batch_sh["slots"] = {k: NamedSharding(mesh, P(DP_AXES, None)) for k in plan.off_device}

    def init(self, seed: int, with_banks: bool = True) -> TrainState:
        """Fresh state; ``with_banks=False`` leaves the banks to the caller (e.g. a bank store)."""
        mesh, replicate = self.mesh, self.cfg.bank.replicate_levels
        key = jax.random.key(seed)
        params = self.fn.init(key, mesh)
        opt_state = jax.jit(self.tx.init, out_shardings=self.opt_sh)(params)
        if self.memory and with_banks and self.tier_slots:
            raise ConfigError("config key 'bank.device_levels': levels off device come from a bank store "
                              "(memlm.bank.tiers), not from init")
        bank = (init_state(self.bank_layout, seed + 1, mesh, replicate_levels=replicate)
                if self.memory and with_banks else None)
        generic = init_state(self.generic_layout, seed + 2, mesh) if self.generic_layout and with_banks else None
        step = jax.device_put(jnp.zeros((), jnp.int32), self.replicated)
        return TrainState(step=step, params=params, opt_state=opt_state, bank=bank, generic=generic)

    def abstract_state(self) -> TrainState:
        """The state as ShapeDtypeStructs in their shardings (nothing allocated: for AOT compiles)."""
        mesh, replicate = self.mesh, self.cfg.bank.replicate_levels
        shapes = TrainState(
            step=jax.ShapeDtypeStruct((), jnp.int32), params=self.fn.shapes, opt_state=self.opt_abstract,
            bank=abstract_bank(self.bank_layout, mesh, replicate, self.tier_slots) if self.memory else None,
            generic=abstract_bank(self.generic_layout, mesh, 1) if self.generic_layout else None)
        return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, self.state_sh)

    def loss_terms(self, params, mb, mem):
        fn = self.fn
        hidden = fn.apply(params, mb["tokens"], mb["segment_ids"], mb["positions"], memory=mem, return_hidden=True)
        return chunked_nll(lambda h: fn.project(params, h), hidden, mb["tokens"], mb["segment_ids"],
                           self.plan.loss_chunk)

    def __call__(self, state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        # Logical-axis constraints inside the model and the loss resolve against this mesh.
        with jax.sharding.use_abstract_mesh(self.mesh.abstract_mesh):
            return self._step(state, batch)

    def _step(self, state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        plan, bank = self.plan, self.bank
        batch = dict(batch)
        slot_ids = batch.pop("slots", {})
        micro = split_micro(self.mesh, batch, plan.micro_steps)
        zeros_like_params = jax.tree.map(lambda s, sh: jax.lax.with_sharding_constraint(
            jnp.zeros(s.shape, jnp.float32), sh), self.fn.shapes, self.param_sh)
        if self.memory:
            # A sibling-path sequence reads its blocks but touches none of them (no gradient, no update).
            untouched = batch["generic"] | batch["sibling"] if "sibling" in batch else batch["generic"]
            acc_ids, any_generic = bank.plan(batch["paths"], untouched, batch["generic"])
            if self.cfg.train.memory_levels:  # levels that do not learn: no node is accumulated or updated
                trained = {f"level{lv}" for lv in self.cfg.train.memory_levels}
                acc_ids = {k: v if k in trained else jnp.full_like(v, -1) for k, v in acc_ids.items()}
            acc0, gen0 = bank.zero_accumulators(plan.shards)
        else:
            acc_ids, any_generic, acc0, gen0 = {}, None, {}, None
        carry0 = dict(anchor=zeros_like_params if self.train_anchor else None, bank=acc0, generic=gen0,
                      nll=jnp.zeros((), jnp.float32), tokens=jnp.zeros((), jnp.int32),
                      remote=jnp.zeros((), jnp.int32))
        carry = accumulate_gradients(state, micro, self.loss_terms, bank, self.train_anchor, carry0, acc_ids,
                                     slot_ids, plan.micro_steps)
        return self._apply(state, batch, carry, acc_ids, any_generic, slot_ids)

    def _apply(self, state: TrainState, batch: dict, carry: dict, acc_ids: dict, any_generic,
               slot_ids: dict) -> tuple[TrainState, dict]:
        """Clip by the joint global norm, update the anchor, commit the bank and the generic memory."""
        t, plan, metrics = self.cfg.train, self.plan, {}
        n_tok = carry["tokens"]
        inv = 1.0 / jnp.maximum(n_tok, 1).astype(jnp.float32)
        sq = jnp.zeros((), jnp.float32)
        if self.train_anchor:
            anchor_sq = optax.tree_utils.tree_norm(carry["anchor"], squared=True) * inv**2
            metrics["grad_norm_anchor"] = jnp.sqrt(anchor_sq)
            sq = sq + anchor_sq
        if self.memory:
            bank_acc, gen_acc, bank_sq, gen_sq = self.bank.finish(carry["bank"], carry["generic"])
            metrics["grad_norm_bank"] = jnp.sqrt(bank_sq) * inv
            sq = sq + bank_sq * inv**2
            if self.generic_layout is not None:
                metrics["grad_norm_generic"] = jnp.sqrt(gen_sq) * inv
                sq = sq + gen_sq * inv**2
        norm = jnp.sqrt(sq)
        scale = jnp.minimum(1.0, t.clip_norm / (norm + 1e-6))
        metrics["grad_norm"] = norm

        params, opt_state = state.params, state.opt_state
        if self.train_anchor:
            g = jax.tree.map(lambda a: a * (inv * scale), carry["anchor"])
            updates, opt_state = self.tx.update(g, opt_state, params)
            params = optax.apply_updates(params, updates)
            metrics["lr_anchor"] = self.anchor_lr(state.step)
        bank, generic = state.bank, state.generic
        if self.memory:
            lr = self.mem_lr(state.step)
            hp = dict(b1=t.b1, b2=t.b2, eps=t.eps, weight_decay=jnp.asarray(t.memory_weight_decay, jnp.float32))
            bank = self.bank.commit(bank, bank_acc, acc_ids, plan.levels, inv * scale, dict(hp, lr=lr), slot_ids)
            if self.generic_layout is not None:
                gen_ids = {"level1": jnp.broadcast_to(jnp.where(any_generic, 0, -1).astype(jnp.int32),
                                                      (plan.shards, 1))}
                gacc = {"level1": {n: a[:, None] for n, a in gen_acc.items()}}
                generic = self.bank.commit(generic, gacc, gen_ids, self.gen_plan, inv * scale, dict(hp, lr=lr))
            metrics["lr_memory"] = lr
            metrics["generic_fraction"] = jnp.mean(batch["generic"].astype(jnp.float32))
            if "sibling" in batch:
                metrics["sibling_fraction"] = jnp.mean(batch["sibling"].astype(jnp.float32))
            metrics["bank/remote_rows"] = carry["remote"]
        metrics["loss"] = carry["nll"] * inv
        metrics["tokens"] = n_tok
        new = TrainState(step=state.step + 1, params=params, opt_state=opt_state, bank=bank, generic=generic)
        return new, metrics


def build(cfg: ml_collections.ConfigDict, mesh: Mesh) -> StepFns:
    """Jitted ``init(seed) -> TrainState`` and ``step(state, batch) -> (state, metrics)`` for ``cfg``."""
    s = _Step(cfg, mesh)
    step = jax.jit(s.__call__, in_shardings=(s.state_sh, s.batch_sh), out_shardings=(s.state_sh, s.replicated),
                   donate_argnums=(0,))
    return StepFns(init=s.init, step=step, state_shardings=s.state_sh, batch_shardings=s.batch_sh, fn=s.fn,
                   bank_layout=s.bank_layout, generic_layout=s.generic_layout, plan=s.plan,
                   abstract_state=s.abstract_state)


def device_batch(batch: dict, shardings: dict) -> dict:
    """A host batch (this process's rows) as global device arrays in the step's shardings; with levels
    off device, ``batch["slots"]`` holds every shard's slot ids (the same on every process)."""
    out = {k: jax.make_array_from_process_local_data(shardings[k], batch[k]) for k in shardings if k != "slots"}
    if "slots" in shardings:
        out["slots"] = {k: jax.make_array_from_callback(v.shape, shardings["slots"][k], lambda idx, v=v: v[idx])
                        for k, v in batch["slots"].items()}
    return out
