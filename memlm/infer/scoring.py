"""Scoring: the summed log-probability of chosen target tokens under a memory, one jitted forward.

The shared kernel of every likelihood in memlm: held-out perplexity, multiple-choice scoring,
and routing by the anchor's likelihood (beam, descent). Rows are right-padded; each row picks
its memory row from the provider's batch (``rows``), so one call scores many texts under the
memory of several paths.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from memlm.infer.generate import MIN_PROMPT_BUCKET, bucket, gather_rows
from memlm.infer.rag import spliced_targets
from memlm.memspec import FetchedMemory

__all__ = ["chunk_arrays", "target_logprobs", "token_rows"]


def _logprob_kernel(fn, params, inputs, targets, weights, lengths, memory, rows):
    b, t = inputs.shape
    segment_ids = (jnp.arange(t)[None, :] < lengths[:, None]).astype(jnp.int32)
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    logits = fn.apply(params, inputs, segment_ids, positions, memory=gather_rows(memory, rows))
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    picked = jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    return jnp.sum(jnp.where(weights > 0, picked * weights, 0.0), axis=1)


@functools.lru_cache(maxsize=16)
def _compiled(fn: Any) -> Callable:
    return jax.jit(functools.partial(_logprob_kernel, fn))


def target_logprobs(fn: Any, params: Any, inputs: np.ndarray, targets: np.ndarray, weights: np.ndarray,
                    lengths: np.ndarray, memory: FetchedMemory | None, rows: np.ndarray) -> np.ndarray:
    """``sum_t weights[b, t] * log p(targets[b, t] | inputs[b, :t+1])`` per row, as float64.

    ``inputs``, ``targets``, ``weights``: ``[B, T]``, right-padded; ``lengths [B]``: real input
    tokens (the rest is padding, segment id 0). ``memory`` holds the provider's rows and
    ``rows [B]`` picks each batch row's memory row.
    """
    out = _compiled(fn)(params, np.asarray(inputs, np.int32), np.asarray(targets, np.int32),
                        np.asarray(weights, np.float32), np.asarray(lengths, np.int32), memory,
                        np.asarray(rows, np.int32))
    return np.asarray(out, np.float64)


def chunk_arrays(rows: Sequence[tuple[Sequence[int], Sequence[int], np.ndarray]],
                 documents: Sequence[Sequence[int]] | None, template: Sequence[int], seq_len: int,
                 batch_size: int) -> tuple[np.ndarray, ...]:
    """``(inputs, targets, weights, lengths)`` of ``(inputs, targets, weight per target)`` rows, right-padded
    to a bucketed length (at most ``seq_len`` unless a row is longer).

    With ``documents`` (a rag condition) row i gets ``documents[i]`` put in after the template
    (``rag.spliced_targets``) and keeps the weights of its own targets; the documents are not scored.
    """
    seqs = []
    for i, (x, y, w) in enumerate(rows):
        if documents is None:
            seqs.append((list(x), list(y), list(range(len(y))), w))
        else:
            seqs.append((*spliced_targets([*x, y[-1]], documents[i], template), w))
    longest = max(len(s[0]) for s in seqs)
    t = max(longest, min(bucket(longest, MIN_PROMPT_BUCKET), seq_len))
    inputs, targets = np.zeros((batch_size, t), np.int32), np.zeros((batch_size, t), np.int32)
    weights, lengths = np.zeros((batch_size, t), np.float32), np.ones(batch_size, np.int32)
    for i, (x, y, scored, w) in enumerate(seqs):
        inputs[i, : len(x)], targets[i, : len(y)], lengths[i] = x, y, len(x)
        weights[i, scored] = w
    return inputs, targets, weights, lengths


def token_rows(ids: list[list[int]], first: list[int]) -> tuple[np.ndarray, ...]:
    """Right-padded (inputs, targets, weights, lengths) of token rows ``ids``, each predicting its
    next token; ``first[r]``: row r's first target scored (the weights start there)."""
    t = bucket(max(max(len(x) - 1 for x in ids), 1), MIN_PROMPT_BUCKET)
    b = len(ids)
    inputs, targets = np.zeros((b, t), np.int32), np.zeros((b, t), np.int32)
    weights, lengths = np.zeros((b, t), np.float32), np.ones(b, np.int32)
    for r, x in enumerate(ids):
        n = len(x) - 1
        if n > 0:
            inputs[r, :n], targets[r, :n], weights[r, first[r]:n], lengths[r] = x[:-1], x[1:], 1.0, n
    return inputs, targets, weights, lengths
