"""The training step: gather fetched memory, forward, loss, gradients, clipping, updates.

One jitted function with explicit shardings and donated state serves every mode:

- ``anchor``:  dense anchor pretraining (no memory).
- ``frozen``:  memory training with the anchor frozen (no anchor gradient is computed).
- ``cotrain``: anchor and memory together, from a pretrained anchor.
- ``scratch``: anchor and memory together, from random init.

Memory sequences fetch the blocks on their path; a sequence flagged ``generic`` (probability
1/(k+1), drawn by the loader) uses the generic memory instead and does not touch the bank.
Gradients are taken w.r.t. the fetched per-sequence arrays, never w.r.t. the bank; the bank's
row-wise AdamW segment-sums them per node and updates only touched nodes.

Clipping (global norm, ``train.clip_norm``): the norm is taken over the anchor gradient plus
the per-node *summed* bank and generic gradients (the gradient the bank as a parameter would
have), so it equals the dense-bank global norm; anchor and memory gradients are scaled by one
common factor.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import struct
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from memlm.bank.device import BankState, bank_shardings, gather, init_state
from memlm.bank.layout import BankLayout
from memlm.bank.optimizer import fetched_grad_sq_norm, sparse_adamw
from memlm.model.functional import AnchorFunctional
from memlm.train.schedule import cosine_with_warmup

BATCH_KEYS = ("tokens", "segment_ids", "positions", "paths", "generic")


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
    seg = segment_ids
    mask = (seg[:, 1:] == seg[:, :-1]) & (seg[:, :-1] != 0)
    logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]
    n = jnp.sum(mask)
    return jnp.sum(jnp.where(mask, nll, 0.0)) / jnp.maximum(n, 1), n


def per_sequence_nll(logits: jax.Array, tokens: jax.Array, segment_ids: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(summed NLL, predicted-token count) per sequence, for evaluation."""
    seg = segment_ids
    mask = (seg[:, 1:] == seg[:, :-1]) & (seg[:, :-1] != 0)
    logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]
    return jnp.sum(jnp.where(mask, nll, 0.0), axis=1), jnp.sum(mask, axis=1)


def uses_memory(cfg: ml_collections.ConfigDict) -> bool:
    return cfg.train.mode != "anchor" and cfg.memory.type != "none"


def _decay_mask(params: dict) -> dict:
    """Weight decay on matrices only (norm gains are not decayed)."""
    return jax.tree.map(lambda p: p.ndim >= 2, params)


def anchor_optimizer(cfg: ml_collections.ConfigDict) -> optax.GradientTransformation:
    t = cfg.train
    lr = cosine_with_warmup(t.lr, t.min_lr, t.warmup_steps, t.steps)
    return optax.adamw(lr, b1=t.b1, b2=t.b2, eps=t.eps, weight_decay=t.weight_decay, mask=_decay_mask)


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


def build(cfg: ml_collections.ConfigDict, mesh: Mesh) -> StepFns:
    """Jitted ``init(seed) -> TrainState`` and ``step(state, batch) -> (state, metrics)`` for ``cfg``."""
    t = cfg.train
    fn = AnchorFunctional(cfg)
    tx = anchor_optimizer(cfg)
    memory = uses_memory(cfg)
    bank_layout = BankLayout.from_config(cfg) if memory else None
    generic_layout = BankLayout.generic_from_config(cfg) if memory and cfg.memory.generic else None
    train_anchor = t.mode != "frozen"
    mem_lr = cosine_with_warmup(t.memory_lr, t.memory_min_lr, t.memory_warmup_steps, t.steps)

    replicated = NamedSharding(mesh, P())
    param_sh = fn.shardings(mesh)
    opt_abstract = jax.eval_shape(tx.init, fn.shapes)
    opt_sh = optax.tree_map_params(tx, lambda _, s: s, opt_abstract, param_sh,
                                   transform_non_params=lambda _: replicated)
    bank_sh = bank_shardings(bank_layout, mesh, replicate_levels=cfg.memory.replicate_levels) if memory else None
    gen_sh = bank_shardings(generic_layout, mesh, replicate_levels=1) if generic_layout else None
    state_sh = TrainState(step=replicated, params=param_sh, opt_state=opt_sh, bank=bank_sh, generic=gen_sh)
    data = ("data", "fsdp")
    batch_sh = {k: NamedSharding(mesh, P(data, None) if k != "generic" else P(data)) for k in BATCH_KEYS}

    def init(seed: int, with_banks: bool = True) -> TrainState:
        """Fresh state; ``with_banks=False`` leaves the banks to the caller (e.g. a bank store)."""
        key = jax.random.key(seed)
        params = fn.init(key, mesh)
        opt_state = jax.jit(tx.init, out_shardings=opt_sh)(params)
        bank = init_state(bank_layout, seed + 1, mesh, replicate_levels=cfg.memory.replicate_levels) \
            if memory and with_banks else None
        generic = init_state(generic_layout, seed + 2, mesh) if generic_layout and with_banks else None
        step = jax.device_put(jnp.zeros((), jnp.int32), replicated)
        return TrainState(step=step, params=params, opt_state=opt_state, bank=bank, generic=generic)

    def step_fn(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        tokens, seg, pos = batch["tokens"], batch["segment_ids"], batch["positions"]
        b = tokens.shape[0]
        metrics = {}
        if not memory:
            def loss_anchor(params):
                logits = fn.apply(params, tokens, seg, pos)
                return next_token_loss(logits, tokens, seg)

            (loss, n_tok), g_params = jax.value_and_grad(loss_anchor, has_aux=True)(state.params)
            g_mem = None
        else:
            paths = batch["paths"]
            use_generic = batch["generic"] if generic_layout is not None else jnp.zeros((b,), jnp.bool_)
            fetched = gather(state.bank, paths)
            if generic_layout is not None:
                gen = gather(state.generic, jnp.zeros((b, 1), jnp.int32))
                fetched = {n: jnp.where(use_generic.reshape((b,) + (1,) * (v.ndim - 1)), gen[n], v)
                           for n, v in fetched.items()}

            def loss_memory(params, mem):
                logits = fn.apply(params, tokens, seg, pos, memory=mem)
                return next_token_loss(logits, tokens, seg)

            argnums = (0, 1) if train_anchor else 1
            (loss, n_tok), grads = jax.value_and_grad(loss_memory, argnums=argnums, has_aux=True)(
                state.params, fetched)
            g_params, g_mem = grads if train_anchor else (None, grads)

        sq = jnp.zeros((), jnp.float32)
        if g_params is not None:
            anchor_sq = optax.tree_utils.tree_norm(g_params, squared=True)
            metrics["grad_norm_anchor"] = jnp.sqrt(anchor_sq)
            sq = sq + anchor_sq
        if g_mem is not None:
            bank_sq = fetched_grad_sq_norm(bank_layout, paths, g_mem, ~use_generic)
            metrics["grad_norm_bank"] = jnp.sqrt(bank_sq)
            sq = sq + bank_sq
            if generic_layout is not None:
                gen_sq = fetched_grad_sq_norm(generic_layout, jnp.zeros((b, 1), jnp.int32), g_mem, use_generic)
                metrics["grad_norm_generic"] = jnp.sqrt(gen_sq)
                sq = sq + gen_sq
        norm = jnp.sqrt(sq)
        scale = jnp.minimum(1.0, t.clip_norm / (norm + 1e-6))
        metrics["grad_norm"] = norm

        params, opt_state = state.params, state.opt_state
        if g_params is not None:
            g_params = jax.tree.map(lambda g: g * scale, g_params)
            updates, opt_state = tx.update(g_params, opt_state, params)
            params = optax.apply_updates(params, updates)
        bank, generic = state.bank, state.generic
        if g_mem is not None:
            g_mem = jax.tree.map(lambda g: g * scale.astype(g.dtype), g_mem)
            lr = mem_lr(state.step)
            kw = dict(lr=lr, b1=t.b1, b2=t.b2, eps=t.eps, weight_decay=t.memory_weight_decay)
            bank = sparse_adamw(bank, paths, g_mem, ~use_generic, **kw)
            if generic_layout is not None:
                generic = sparse_adamw(generic, jnp.zeros((b, 1), jnp.int32), g_mem, use_generic, **kw)
            metrics["lr_memory"] = lr
            metrics["generic_fraction"] = jnp.mean(use_generic.astype(jnp.float32))
        metrics["loss"] = loss
        metrics["tokens"] = n_tok
        if g_params is not None:
            metrics["lr_anchor"] = cosine_with_warmup(t.lr, t.min_lr, t.warmup_steps, t.steps)(state.step)
        new = TrainState(step=state.step + 1, params=params, opt_state=opt_state, bank=bank, generic=generic)
        return new, metrics

    step = jax.jit(step_fn, in_shardings=(state_sh, batch_sh), out_shardings=(state_sh, replicated),
                   donate_argnums=(0,))
    return StepFns(init=init, step=step, state_shardings=state_sh, batch_shardings=batch_sh, fn=fn,
                   bank_layout=bank_layout, generic_layout=generic_layout)


def device_batch(batch: dict, shardings: dict) -> dict:
    """A host batch (this process's rows) as global device arrays in the step's shardings."""
    return {k: jax.make_array_from_process_local_data(shardings[k], batch[k]) for k in BATCH_KEYS}
