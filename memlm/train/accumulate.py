"""Micro-batch accumulation: the step's batch in micro-batches, gradients summed in float32.

The global batch ``[B, ...]`` is split into ``micro_steps`` micro-batches (micro-step j takes rows
``j*m .. (j+1)*m`` of every data-parallel shard, so no row moves between shards). Each micro-step
runs the anchor on the fetched slots (``ShardedBank.prepare``), takes the gradient of the *summed*
NLL with respect to the anchor and the slots, adds the anchor gradient into a float32
accumulator in the parameters' shardings and pushes the slot gradients to their owners
(``ShardedBank.push``). The caller divides by the batch's token count, so an accumulated step
equals the whole-batch step.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from memlm.bank.sharded import ShardedBank, shard_map
from memlm.memspec import SlotMemory
from memlm.sharding import DP_AXES

__all__ = ["accumulate_gradients", "split_micro"]


def split_micro(mesh: Mesh, batch: dict, micro_steps: int) -> dict:
    """``[B, ...] -> [micro_steps, microbatch, ...]``, each shard splitting its own rows."""
    def local(*xs):
        return tuple(x.reshape(micro_steps, -1, *x.shape[1:]) for x in xs)

    names = list(batch)
    specs = tuple(P(DP_AXES) for _ in names)
    out = shard_map(mesh, local, specs, tuple(P(None, DP_AXES) for _ in names))(*[batch[n] for n in names])
    return dict(zip(names, out, strict=True))


def accumulate_gradients(state: Any, micro: dict, loss_terms: Callable, bank: ShardedBank | None,
                         train_anchor: bool, carry0: dict, acc_ids: dict, slot_ids: dict,
                         micro_steps: int) -> dict:
    """Run every micro-step of ``micro`` and return the summed carry: ``anchor`` (the float32 anchor
    gradient, or None when frozen), ``bank`` / ``generic`` (the owners' accumulators), ``nll``,
    ``tokens`` and ``remote`` (rows fetched from other shards).

    ``loss_terms(params, microbatch, memory) -> (summed nll, tokens)``; ``state`` is the step's
    TrainState (its ``params``, ``bank`` and ``generic`` are read, never written).
    """
    memory = bank is not None
    generic = memory and bank.generic_layout is not None

    def body(carry, mb):
        carry = dict(carry)
        if not memory:
            (nll, n), g = jax.value_and_grad(lambda p: loss_terms(p, mb, None), has_aux=True)(state.params)
            carry["anchor"] = jax.tree.map(lambda a, x: a + x.astype(jnp.float32), carry["anchor"], g)
        else:
            gen_params = state.generic.params if generic else None
            slots, index, uniq, gen, remote = bank.prepare(state.bank.params, gen_params, mb["paths"],
                                                           mb["generic"], slot_ids)

            def loss_memory(params, slots, gen):
                mem = SlotMemory(levels=tuple(slots[k] for k in bank.keys), index=tuple(index[k] for k in bank.keys),
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
            carry["bank"] = bank.push(carry["bank"], acc_ids, uniq, g_slots)
            if g_gen is not None:
                carry["generic"] = jax.tree.map(jnp.add, carry["generic"], g_gen)
            carry["remote"] = carry["remote"] + remote
        carry["nll"] = carry["nll"] + nll
        carry["tokens"] = carry["tokens"] + n.astype(jnp.int32)
        return carry, None

    if micro_steps == 1:  # no loop around a single micro-step (XLA keeps a one-trip while)
        carry, _ = body(carry0, jax.tree.map(lambda x: x[0], micro))
    else:
        carry, _ = jax.lax.scan(body, carry0, micro)
    return carry
