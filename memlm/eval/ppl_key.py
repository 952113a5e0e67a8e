"""Perplexity whose memory is fetched with the document's first N tokens only (``eval.perplexity_key``).

The paper's Wiki-En perplexity fetches a document's memory with the whole document (docs/paper.md
§5.1): the key holds every token it then scores. ``prefix:N`` is the honest variant: the memory is
fetched with the text of the document's first N tokens (after the tokenizer's template), and only
the tokens after them are scored, so the key never contains what is scored. The same tokens are
also scored with the whole document as key, so the two keys are compared on equal tokens.
Documents of N tokens or fewer have nothing to score and are left out.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from memlm.infer.conditions import MemoryProvider, documents_for, memory_rows, pad_to, row_index
from memlm.infer.rag import template_prefix
from memlm.infer.scoring import chunk_arrays, target_logprobs

__all__ = ["format_key_table", "keyed_perplexity", "parse_perplexity_key", "prefix_perplexity"]


def parse_perplexity_key(value: str) -> int | None:
    """``"document"`` -> None; ``"prefix:N"`` -> N (N >= 1); anything else fails naming the value."""
    value = str(value).strip()
    if value == "document":
        return None
    head, _, n = value.partition(":")
    if head == "prefix" and n.isdigit() and int(n) >= 1:
        return int(n)
    raise ValueError(f"perplexity key {value!r}: choose 'document' or 'prefix:N' with N >= 1 tokens")


def _rows(documents: Sequence[Sequence[int]], first: Sequence[int], seq_len: int):
    """(document index, inputs, targets, weights) of each chunk of ``seq_len`` inputs holding a scored target."""
    for d, (tokens, f) in enumerate(zip(documents, first, strict=True)):
        tokens = np.asarray(tokens, np.int32)
        for s in range(0, len(tokens) - 1, seq_len):
            inputs = tokens[s: min(s + seq_len, len(tokens) - 1)]
            targets = tokens[s + 1: s + 1 + len(inputs)]
            weights = (np.arange(s + 1, s + 1 + len(inputs)) >= f).astype(np.float32)
            if weights.any():
                yield d, inputs, targets, weights


def keyed_perplexity(fn: Any, params: Any, documents: Sequence[Sequence[int]], keys: Sequence[str],
                     first: Sequence[int], provider: MemoryProvider, conditions: Iterable[str], seq_len: int,
                     batch_size: int, template: Sequence[int] = ()) -> dict[str, dict[str, float]]:
    """Per condition: perplexity of each document's tokens from index ``first[i]`` on, memory keyed by ``keys[i]``.

    Chunks of ``seq_len`` inputs as ``perplexity.py`` (positions restart per chunk; a rag condition's
    documents, retrieved with the key, go after ``template``). Returns
    ``{cond: {"perplexity", "nll", "tokens"}}``.
    """
    rows = list(_rows(documents, first, seq_len))
    total = {c: 0.0 for c in conditions}
    count = 0
    for a in range(0, len(rows), batch_size):
        batch = rows[a: a + batch_size]
        docs = list(dict.fromkeys(r[0] for r in batch))
        count += int(sum(r[3].sum() for r in batch))
        texts = pad_to([keys[d] for d in docs], batch_size)
        for c in total:
            memory = provider(texts, c)
            idx = row_index([docs.index(r[0]) for r in batch], memory_rows(memory, len(texts), c), batch_size)
            retrieved = documents_for(provider, texts, c)
            arrays = chunk_arrays([r[1:] for r in batch], None if retrieved is None else
                                  [retrieved[docs.index(r[0])] for r in batch], template, seq_len, batch_size)
            total[c] -= float(target_logprobs(fn, params, *arrays, memory, idx).sum())
    return {c: {"perplexity": math.exp(v / count) if count else float("nan"),
                "nll": v / count if count else float("nan"), "tokens": count} for c, v in total.items()}


def prefix_perplexity(fn: Any, params: Any, tokenizer: Any, documents: Sequence[Sequence[int]],
                      texts: Sequence[str], provider: MemoryProvider, conditions: Iterable[str], n: int,
                      seq_len: int, batch_size: int) -> dict[str, Any]:
    """Perplexity after each document's first ``n`` tokens, keyed by those tokens' text and by the whole document.

    ``documents`` are token ids as ``memlm eval`` scores them (template, text, EOT); ``texts`` their text.
    """
    start = len(tokenizer.template["prefix"])
    kept = [i for i, d in enumerate(documents) if len(d) > start + n]
    docs = [documents[i] for i in kept]
    first = [start + n] * len(docs)
    keys = [tokenizer.decode([int(t) for t in documents[i][start: start + n]]) for i in kept]
    conds = tuple(conditions)
    tpl = template_prefix(tokenizer)
    prefix = keyed_perplexity(fn, params, docs, keys, first, provider, conds, seq_len, batch_size, tpl)
    whole = keyed_perplexity(fn, params, docs, [texts[i] for i in kept], first, provider, conds, seq_len, batch_size,
                             tpl)
    return {"key": f"prefix:{n}", "documents": len(docs), "tokens": prefix[conds[0]]["tokens"] if conds else 0,
            "conditions": {c: {"perplexity": prefix[c]["perplexity"], "nll": prefix[c]["nll"],
                               "document_key_perplexity": whole[c]["perplexity"]} for c in conds}}


def format_key_table(document: dict[str, Any], prefix: dict[str, Any]) -> str:
    """A plain-text table: per condition, perplexity keyed by the document (all tokens, and the tokens after
    the first N) and keyed by the first N tokens."""
    head = f"after {prefix['key'].split(':')[1]}"
    lines = [f"perplexity by retrieval key ({prefix['documents']} documents, {prefix['tokens']} tokens scored "
             f"{head})",
             f"{'condition':<10} {'document, all':>14} {'document, ' + head:>18} {prefix['key'] + ' key':>16}"]
    for c, r in prefix["conditions"].items():
        full = document.get(c, {}).get("perplexity", float("nan"))
        lines.append(f"{c:<10} {full:>14.3f} {r['document_key_perplexity']:>18.3f} {r['perplexity']:>16.3f}")
    return "\n".join(lines)
