"""Batched greedy decoding with the KV cache and fetched memory.

One batch holds prompts of different lengths: they are right-padded to a bucketed length and
prefilled in one call (segment id 0 marks padding, which the cache does not count), then every
row decodes from its own position (``cache["lengths"]``), overwriting its padding. The memory is
fetched once per query (the paper's Fig. 5: one fetch per query, on the prompt) and stays fixed
while decoding.

Two jitted functions per model: the prefill, and the decode loop (a ``lax.while_loop`` over the
one-token decode step that ends when every row has produced EOT or ``max_new_tokens``). Shapes
are bucketed (batch rows, prompt length and new-token count to powers of two) so a stream of
calls compiles a handful of times, not once per call.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import numpy as np

from memlm.memspec import FetchedMemory
from memlm.model.anchor import init_cache

__all__ = ["TextTokenizer", "bucket", "decode_step", "gather_rows", "generate", "generate_text", "prefill"]

MIN_PROMPT_BUCKET = 16
MIN_NEW_BUCKET = 8


class TextTokenizer(Protocol):
    """What generation and evaluation need from a tokenizer (``memlm.data.tokenizer.Tokenizer`` fits)."""

    eot_id: int

    def encode(self, text: str) -> Sequence[int]: ...

    def encode_plain(self, text: str) -> Sequence[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...


def bucket(n: int, minimum: int = 1) -> int:
    """The smallest power of two >= ``max(n, minimum)``: a fixed shape for a range of sizes."""
    n = max(int(n), int(minimum), 1)
    return 1 << (n - 1).bit_length()


def gather_rows(memory: FetchedMemory | None, rows: jax.Array) -> FetchedMemory | None:
    """The memory of each batch row (``rows[i]`` indexes the provider's rows); traced inside jit."""
    if memory is None:
        return None
    return {name: jnp.take(a, rows, axis=0) for name, a in memory.items()}


def prefill(fn: Any, params: Any, tokens: jax.Array, lengths: jax.Array, memory: FetchedMemory | None,
            max_len: int) -> tuple[jax.Array, dict]:
    """Run right-padded prompts ``tokens [B, T]`` (``lengths [B]`` real tokens) into a fresh cache.

    Returns each row's greedy next token (read at its last real position) and the cache.
    """
    b, t = tokens.shape
    segment_ids = (jnp.arange(t)[None, :] < lengths[:, None]).astype(jnp.int32)
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    cache = init_cache(fn.spec, b, max_len)
    logits, cache = fn.apply(params, tokens, segment_ids, positions, memory=memory, cache=cache)
    last = jnp.take_along_axis(logits, (lengths - 1)[:, None, None], axis=1)[:, 0]
    return jnp.argmax(last, axis=-1).astype(jnp.int32), cache


def decode_step(fn: Any, params: Any, tokens: jax.Array, cache: dict,
                memory: FetchedMemory | None) -> tuple[jax.Array, dict]:
    """Append one token per row (``tokens [B]``) at the row's own position; the greedy next token."""
    b = tokens.shape[0]
    positions = cache["lengths"][:, None]
    logits, cache = fn.apply(params, tokens[:, None], jnp.ones((b, 1), jnp.int32), positions, memory=memory,
                             cache=cache)
    return jnp.argmax(logits[:, 0], axis=-1).astype(jnp.int32), cache


def _prefill(fn, params, tokens, lengths, memory, rows, *, max_len):
    return prefill(fn, params, tokens, lengths, gather_rows(memory, rows), max_len)


def _decode(fn, params, first, cache, memory, rows, active, max_new_tokens, eot_id, *, n_out):
    """Greedy tokens ``[B, n_out]`` after ``first``; -1 marks positions after a row stopped."""
    memory = gather_rows(memory, rows)
    b = first.shape[0]
    out = jnp.full((b, n_out), -1, jnp.int32).at[:, 0].set(jnp.where(active, first, -1))
    done = ~active | (first == eot_id)

    def cond(state):
        i, _, _, done, _ = state
        return (i < max_new_tokens) & ~jnp.all(done)

    def body(state):
        i, tok, cache, done, out = state
        nxt, cache = decode_step(fn, params, tok, cache, memory)
        out = out.at[:, i].set(jnp.where(done, -1, nxt))
        return i + 1, nxt, cache, done | (nxt == eot_id), out

    state = (jnp.int32(1), first, cache, done, out)
    return jax.lax.while_loop(cond, body, state)[4]


@functools.lru_cache(maxsize=16)
def _compiled(fn: Any) -> tuple[Callable, Callable]:
    """The jitted prefill and decode loop of one model (kept while the model object lives in the cache)."""
    pre = jax.jit(functools.partial(_prefill, fn), static_argnames=("max_len",))
    dec = jax.jit(functools.partial(_decode, fn), static_argnames=("n_out",))
    return pre, dec


def generate(fn: Any, params: Any, prompts: Sequence[Sequence[int]], memory: FetchedMemory | None,
             max_new_tokens: int, eot_id: int) -> list[list[int]]:
    """Greedy continuations of ``prompts`` (token ids), without the EOT that stops a row.

    ``fn`` is an :class:`~memlm.model.functional.AnchorFunctional` (anything with ``spec`` and
    ``apply(params, tokens, segment_ids, positions, memory=, cache=)``). ``memory`` is the
    FetchedMemory of the batch with one row per prompt, or a single row shared by all prompts,
    or None (the anchor alone). A row stops at EOT or after ``max_new_tokens`` tokens. Callers
    streaming batches keep the batch size fixed (padding the last batch) to reuse compiled shapes.
    """
    n = len(prompts)
    if n == 0:
        return []
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    lengths = [len(p) for p in prompts]
    if min(lengths) == 0:
        raise ValueError(f"prompt {lengths.index(0)} is empty: generation needs at least one token")
    b = bucket(n)
    t = bucket(max(lengths), MIN_PROMPT_BUCKET)
    n_out = bucket(max_new_tokens, MIN_NEW_BUCKET)
    tokens = np.zeros((b, t), np.int32)
    for i, p in enumerate(prompts):
        tokens[i, : len(p)] = np.asarray(p, np.int32)
    lens = np.ones(b, np.int32)
    lens[:n] = lengths
    active = np.arange(b) < n
    rows = np.minimum(np.arange(b), n - 1).astype(np.int32)
    if memory is not None:
        counts = {name: int(np.shape(a)[0]) for name, a in memory.items()}
        if set(counts.values()) == {1}:
            rows[:] = 0
        elif set(counts.values()) != {n}:
            raise ValueError(f"memory rows {counts} do not match {n} prompts (one row per prompt, or 1 shared)")
    pre, dec = _compiled(fn)
    first, cache = pre(params, tokens, lens, memory, rows, max_len=t + n_out)
    out = dec(params, first, cache, memory, rows, active, np.int32(max_new_tokens), np.int32(eot_id), n_out=n_out)
    out = np.asarray(out)
    result = []
    for i in range(n):
        row = out[i, :max_new_tokens]
        stop = np.flatnonzero((row == eot_id) | (row < 0))
        result.append(row[: stop[0] if stop.size else max_new_tokens].tolist())
    return result


def generate_text(fn: Any, params: Any, tokenizer: TextTokenizer, prompts: Sequence[str],
                  memory: FetchedMemory | None, max_new_tokens: int, chat: bool = False) -> list[str]:
    """:func:`generate` on text: encode the prompts (the tokenizer's template included, or as one user
    message through its chat template with ``chat``), decode the continuations (EOT excluded)."""
    if chat:
        ids = [[int(i) for i in tokenizer.encode_chat([{"role": "user", "content": p}])] for p in prompts]
    else:
        ids = [[int(i) for i in tokenizer.encode(p)] for p in prompts]
    out = generate(fn, params, ids, memory, max_new_tokens, tokenizer.eot_id)
    return [tokenizer.decode(o) for o in out]
