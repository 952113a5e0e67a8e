"""Perplexity on held-out documents, each routed by its own text, per memory condition.

As the paper's Wiki-En perplexity (docs/paper.md §5.1): a document's memory is fetched with the
full document text. Its tokens are scored in chunks of ``seq_len`` inputs, each chunk its own
context (positions restart at 0, as packed continuation chunks in training), so every token but
the document's first is predicted exactly once. The result is the token-weighted mean NLL over
all documents and its exponential.

Tokens are scored by ``memlm.infer.scoring.target_logprobs``, the kernel multiple-choice scoring
and likelihood routing share.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import numpy as np

from memlm.infer.conditions import MemoryProvider, documents_for, memory_rows, pad_to, parse_conditions, row_index
from memlm.infer.scoring import chunk_arrays, target_logprobs

__all__ = ["evaluate_perplexity"]


def _chunks(tokens: np.ndarray, seq_len: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(inputs, targets) of each chunk: up to ``seq_len`` inputs, each predicting the next token."""
    n = len(tokens)
    for s in range(0, n - 1, seq_len):
        inputs = tokens[s: min(s + seq_len, n - 1)]
        yield inputs, tokens[s + 1: s + 1 + len(inputs)]


def _batches(documents: Iterable[tuple[Sequence[int], str]], seq_len: int, batch_size: int):
    """Batches of (texts of the docs involved, chunk rows as (text index, inputs, targets))."""
    texts: list[str] = []
    rows: list[tuple[int, np.ndarray, np.ndarray]] = []
    for tokens, text in documents:
        tokens = np.asarray(tokens, np.int32)
        if tokens.ndim != 1:
            raise ValueError(f"a document's tokens must be a flat list, got shape {tokens.shape}")
        for inputs, targets in _chunks(tokens, seq_len):
            if not texts or texts[-1] != text:
                texts.append(text)
            rows.append((len(texts) - 1, inputs, targets))
            if len(rows) == batch_size:
                yield texts, rows
                texts, rows = [], []
    if rows:
        yield texts, rows


def evaluate_perplexity(fn: Any, params: Any, documents: Iterable[Sequence[int]], texts: Iterable[str],
                        memory_for: MemoryProvider, conditions: str | Iterable[str], seq_len: int,
                        batch_size: int, template: Sequence[int] = ()) -> dict:
    """Perplexity of ``documents`` (token lists) under each memory condition.

    ``texts[i]`` is document i's retrieval text (its full text, as the paper). Streams: documents
    are read once, in batches of ``batch_size`` chunks, and each batch asks ``memory_for`` once per
    condition. ``template``: the ids the tokenizer puts before a text, after which a rag condition's
    documents go. Returns ``{"conditions": {cond: {"perplexity", "nll", "tokens", "documents"}}}``
    (``nll``: mean per scored token in nats).
    """
    conds = parse_conditions(conditions)
    if seq_len < 1 or batch_size < 1:
        raise ValueError(f"seq_len and batch_size must be positive, got {seq_len} and {batch_size}")
    total = {c: 0.0 for c in conds}
    count = 0
    n_docs = 0

    def counted(pairs):
        nonlocal n_docs
        for pair in pairs:
            n_docs += 1
            yield pair

    for batch_texts, rows in _batches(counted(zip(documents, texts, strict=True)), seq_len, batch_size):
        count += sum(len(r[2]) for r in rows)
        # Texts padded to the batch size (repeating the last) give the memory one shape for every batch.
        keys = pad_to(batch_texts, batch_size)
        for c in conds:
            memory = memory_for(keys, c)
            idx = row_index([r[0] for r in rows], memory_rows(memory, len(keys), c), batch_size)
            docs = documents_for(memory_for, keys, c)
            arrays = chunk_arrays([(x, y, np.ones(len(y), np.float32)) for _, x, y in rows],
                                  None if docs is None else [docs[r[0]] for r in rows], template, seq_len, batch_size)
            total[c] -= float(target_logprobs(fn, params, *arrays, memory, idx).sum())
    result = {}
    for c in conds:
        nll = total[c] / count if count else float("nan")
        result[c] = {"perplexity": math.exp(nll) if count else float("nan"), "nll": nll, "tokens": count,
                     "documents": n_docs}
    return {"conditions": result}
