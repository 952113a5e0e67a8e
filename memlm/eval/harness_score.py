"""Scoring and generating many requests under one memory condition, batched by the memory they fetch.

The lm-evaluation-harness model (``harness.py``) hands over flat lists of requests, each with its
retrieval key (docs/paper.md App. B: the context, the document, the prompt). Keys are grouped by
the memory they fetch (their routed path, and whether a gate sends them to the fallback), requests
are sorted by group, and a batch holds at most ``batch_size`` groups: one provider call per batch,
with one representative key per group, so a batch fetches each path's blocks once and every row
picks its group's memory row (``target_logprobs``' ``rows``). Nothing here imports lm-eval.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from memlm.infer.conditions import MemoryProvider, memory_condition, memory_rows, pad_to, row_index
from memlm.infer.generate import MIN_PROMPT_BUCKET, bucket, gather_rows, generate

__all__ = ["memory_groups", "generate_rows", "score_rows"]


def memory_groups(provider: MemoryProvider, keys: Sequence[str], condition: str) -> tuple[list[int], list[str]]:
    """(group of each key, one representative key per group): keys whose memory is the same share a group.

    ``none`` and ``generic`` give every key one memory; ``fetched`` / ``blocked`` group by routed path
    (and, for ``fetched``, by whether the provider's gate sends the key to the fallback). A provider
    that cannot report paths groups by key.
    """
    distinct = list(dict.fromkeys(keys))
    condition = memory_condition(condition)  # a rag condition's documents are inputs, not memory
    if condition in ("none", "generic"):
        ident = [()] * len(distinct)
    elif hasattr(provider, "paths"):
        paths = np.asarray(provider.paths(distinct, condition))
        fallback = np.zeros(len(distinct), bool)
        if condition == "fetched" and hasattr(provider, "gated"):
            fallback = np.asarray(provider.gated(distinct, paths), bool)
        ident = [(tuple(int(x) for x in p), bool(f)) for p, f in zip(paths, fallback, strict=True)]
    else:
        ident = [(k,) for k in distinct]
    group_of_ident: dict[tuple, int] = {}
    reps: list[str] = []
    group_of_key: dict[str, int] = {}
    for key, i in zip(distinct, ident, strict=True):
        if i not in group_of_ident:
            group_of_ident[i] = len(reps)
            reps.append(key)
        group_of_key[key] = group_of_ident[i]
    return [group_of_key[k] for k in keys], reps


def _batches(groups: Sequence[int], sizes: Sequence[int], batch_size: int) -> list[list[int]]:
    """Request indices in batches of at most ``batch_size`` rows and groups, sorted by group, longest first."""
    order = sorted(range(len(groups)), key=lambda i: (groups[i], -sizes[i], i))
    batches: list[list[int]] = []
    for i in order:
        if not batches or len(batches[-1]) == batch_size:
            batches.append([])
        batches[-1].append(i)
    return batches


def _kernel(fn, params, inputs, targets, weights, lengths, memory, rows):
    """Per row: the summed log-probability of the weighted targets, and whether each is the argmax."""
    b, t = inputs.shape
    segment_ids = (jnp.arange(t)[None, :] < lengths[:, None]).astype(jnp.int32)
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    logits = fn.apply(params, inputs, segment_ids, positions, memory=gather_rows(memory, rows))
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    picked = jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    greedy = jnp.argmax(logp, axis=-1) == targets
    scored = weights > 0
    return jnp.sum(jnp.where(scored, picked, 0.0), axis=1), jnp.all(greedy | ~scored, axis=1)


@functools.lru_cache(maxsize=16)
def _compiled(fn: Any) -> Callable:
    return jax.jit(functools.partial(_kernel, fn))


def score_rows(fn: Any, params: Any, provider: MemoryProvider, condition: str,
               rows: Sequence[tuple[str, Sequence[int], Sequence[int]]], batch_size: int,
               max_len: int) -> list[tuple[float, bool]]:
    """``(log p(continuation | context), greedy?)`` of each ``(key, context ids, continuation ids)``.

    The memory is the key's under ``condition``; a row longer than ``max_len`` inputs loses context
    tokens from the left (the continuation is always scored whole, so it must fit).
    """
    seqs, first = [], []
    for key, ctx, cont in rows:
        if not cont:
            raise ValueError(f"an empty continuation to score (key {key[:60]!r})")
        if len(cont) > max_len:
            raise ValueError(f"a continuation of {len(cont)} tokens does not fit in {max_len} inputs")
        seq = (list(ctx) + list(cont))[-(max_len + 1):]
        seqs.append(seq)
        first.append(len(seq) - len(cont) - 1)  # the first scored target's index
    groups, reps = memory_groups(provider, [r[0] for r in rows], condition)
    out: list[tuple[float, bool]] = [(0.0, False)] * len(rows)
    for batch in _batches(groups, [len(s) for s in seqs], batch_size):
        local = list(dict.fromkeys(groups[i] for i in batch))  # this batch's groups, in order
        keys = pad_to([reps[g] for g in local], batch_size)
        memory = provider(keys, condition)
        t = bucket(max(len(seqs[i]) - 1 for i in batch), MIN_PROMPT_BUCKET)
        inputs, targets = np.zeros((batch_size, t), np.int32), np.zeros((batch_size, t), np.int32)
        weights, lengths = np.zeros((batch_size, t), np.float32), np.ones(batch_size, np.int32)
        for r, i in enumerate(batch):
            s, n = seqs[i], len(seqs[i]) - 1
            inputs[r, :n], targets[r, :n], weights[r, first[i]:n], lengths[r] = s[:-1], s[1:], 1.0, n
        index = row_index([local.index(groups[i]) for i in batch], memory_rows(memory, len(keys), condition),
                          batch_size)
        logp, greedy = _compiled(fn)(params, inputs, targets, weights, lengths, memory, index)
        for r, i in enumerate(batch):
            out[i] = (float(logp[r]), bool(greedy[r]))
    return out


def generate_rows(fn: Any, params: Any, provider: MemoryProvider, condition: str,
                  rows: Sequence[tuple[str, Sequence[int], int]], batch_size: int, eot_id: int) -> list[list[int]]:
    """Greedy continuations of ``(key, prompt ids, max new tokens)``, each under its key's memory."""
    groups, reps = memory_groups(provider, [r[0] for r in rows], condition)
    out: list[list[int]] = [[] for _ in rows]
    for batch in _batches(groups, [len(r[1]) for r in rows], batch_size):
        local = list(dict.fromkeys(groups[i] for i in batch))
        keys = pad_to([reps[g] for g in local], batch_size)
        memory = provider(keys, condition)
        if memory is not None and memory_rows(memory, len(keys), condition) > 1:
            memory = gather_rows(memory, jnp.asarray([local.index(groups[i]) for i in batch], jnp.int32))
        new = max(rows[i][2] for i in batch)
        for i, tokens in zip(batch, generate(fn, params, [rows[i][1] for i in batch], memory, new, eot_id),
                             strict=True):
            out[i] = tokens[: rows[i][2]]
    return out
