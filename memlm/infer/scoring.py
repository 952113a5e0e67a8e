"""Scoring: the summed log-probability of chosen target tokens under a memory, one jitted forward.

The shared kernel of every likelihood in memlm: held-out perplexity, multiple-choice scoring,
and routing by the anchor's likelihood (beam, descent). Rows are right-padded; each row picks
its memory row from the provider's batch (``rows``), so one call scores many texts under the
memory of several paths.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from memlm.infer.generate import gather_rows
from memlm.memspec import FetchedMemory

__all__ = ["target_logprobs"]


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
