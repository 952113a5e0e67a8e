"""Next-token cross-entropy that never holds the logits of the whole batch.

The final hidden states ``[B, T, d]`` are cut along the sequence axis into chunks of ``t_c``
positions; each chunk's logits ``[B, t_c, vocab]`` (float32) are computed, reduced to the
summed NLL and dropped, and recomputed in the backward pass (``jax.checkpoint``), so the peak
is one chunk (a batch of one chunk keeps its logits for the backward pass instead). Chunks run along
the sequence axis, not the batch axis, so every chunk keeps the
batch's data-parallel sharding. The sum and the token count are returned separately, so that
micro-batches add up to exactly the whole batch's mean.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from memlm.sharding import constrain


def target_mask(tokens: jax.Array, segment_ids: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Targets ``[B, T]`` (position t predicts token t+1) and the mask of real predictions:
    same document, not padding; the last position predicts nothing."""
    seg = segment_ids
    nxt = jnp.concatenate([tokens[:, 1:], jnp.zeros_like(tokens[:, :1])], axis=1)
    same = jnp.concatenate([(seg[:, 1:] == seg[:, :-1]) & (seg[:, :-1] != 0), jnp.zeros_like(seg[:, :1], bool)],
                           axis=1)
    return nxt, same


def chunk_length(seq_len: int, rows_per_device: int, chunk_tokens: int) -> int:
    """The largest divisor of ``seq_len`` whose chunk (``rows_per_device x t_c`` tokens) fits ``chunk_tokens``."""
    best = 1
    for t_c in range(1, seq_len + 1):
        if seq_len % t_c == 0 and rows_per_device * t_c <= chunk_tokens:
            best = t_c
    return best


def chunked_nll(project: Callable[[jax.Array], jax.Array], hidden: jax.Array, tokens: jax.Array,
                segment_ids: jax.Array, chunk: int) -> tuple[jax.Array, jax.Array]:
    """(summed NLL, predicted-token count) of a batch from its final hidden states.

    ``project(h [B, t, d]) -> float32 logits [B, t, vocab]``; ``chunk`` divides T. Equal to
    ``log_softmax`` over the full logits (tested), at one chunk's memory.
    """
    b, t, d = hidden.shape
    if t % chunk:
        raise ValueError(f"loss chunk {chunk} does not divide the sequence length {t}")
    targets, mask = target_mask(tokens, segment_ids)
    n = t // chunk

    def split(x):
        return jnp.moveaxis(x.reshape(b, n, chunk, *x.shape[2:]), 1, 0)

    def one(h, y, keep):
        logits = constrain(project(constrain(h, ("batch", "seq", None))), ("batch", "seq", "vocab"))
        lse = jax.nn.logsumexp(logits, axis=-1)
        picked = jnp.take_along_axis(logits, y[..., None], axis=-1)[..., 0]
        return jnp.sum(jnp.where(keep, lse - picked, 0.0))

    if n == 1:  # one chunk: the logits are the peak anyway, so keep them rather than recompute
        return one(hidden, targets, mask), jnp.sum(mask)
    one = jax.checkpoint(one)

    def body(total, xs):
        return total + one(*xs), None

    total, _ = jax.lax.scan(body, jnp.zeros((), jnp.float32), (split(hidden), split(targets), split(mask)))
    return total, jnp.sum(mask)
