"""Memory conditions for evaluation, and the provider protocol that supplies memory per text.

The paper compares one anchor under several memories (docs/paper.md §4.5, §5.3):

- ``none``: the anchor alone (no memory);
- ``generic``: the context-independent generic memory, the same for every text;
- ``fetched``: the blocks on the path the text routes to;
- ``blocked``: the text's own subtree at a chosen level is blocked and the next-best sibling's
  path used instead (the paper's Fig. 6b proxy for unlearning);
- ``rag`` / ``rag+fetched``: the RAG baseline, the nearest training documents put before the
  context, with the anchor alone or with the ``fetched`` memory (``rag.py``).

Scoring code never routes or touches the bank: it asks a :class:`MemoryProvider` for the
memory of a batch of retrieval texts under a condition, and gathers rows from it inside the
jitted kernels (:func:`row_index`), so memories are fetched once per batch and never copied
to the host.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Protocol

import numpy as np

from memlm.config import CONDITIONS, ConditionError
from memlm.memspec import FetchedMemory

__all__ = [
    "CONDITIONS", "ConditionError", "MemoryProvider", "RAG_CONDITIONS", "documents_for", "memory_condition",
    "memory_rows", "pad_to", "parse_conditions", "row_index",
]

# the RAG conditions and the memory each adds to the retrieved documents
RAG_CONDITIONS = {"rag": "none", "rag+fetched": "fetched"}


class MemoryProvider(Protocol):
    """``memory_for(texts, condition)``: the FetchedMemory for these retrieval texts.

    Returns None for ``none`` (the anchor alone). Otherwise a dict name -> array whose leading
    axis has ``len(texts)`` rows (row i is text i's memory) or a single row shared by all texts
    (the natural shape of the generic memory: no copies per text).
    """

    def __call__(self, texts: list[str], condition: str) -> FetchedMemory | None: ...


def memory_condition(condition: str) -> str:
    """The memory a condition uses: itself, or for a RAG condition the memory beside its documents."""
    return RAG_CONDITIONS.get(condition, condition)


def documents_for(provider: MemoryProvider, texts: list[str], condition: str) -> list[list[int]] | None:
    """The token ids a RAG condition puts before each text's context (None for the other conditions)."""
    if condition not in RAG_CONDITIONS:
        return None
    if not hasattr(provider, "documents"):
        raise ConditionError(f"condition {condition!r} needs a provider that retrieves documents")
    return provider.documents(texts)


def parse_conditions(conditions: str | Iterable[str]) -> tuple[str, ...]:
    """Condition names from ``"none,fetched"`` or a list, checked against :data:`CONDITIONS`."""
    names = [c.strip() for c in conditions.split(",")] if isinstance(conditions, str) else list(conditions)
    names = [c for c in names if c]
    if not names:
        raise ConditionError(f"no memory condition given; choose from {', '.join(CONDITIONS)}")
    for c in names:
        if c not in CONDITIONS:
            raise ConditionError(f"unknown memory condition {c!r}; choose from {', '.join(CONDITIONS)}")
    if len(set(names)) != len(names):
        raise ConditionError(f"memory conditions repeat: {names}")
    return tuple(names)


def memory_rows(memory: FetchedMemory | None, n_texts: int, condition: str) -> int:
    """Rows of a provider's answer (``n_texts`` or 1), after checking that every array agrees."""
    if memory is None:
        return 0
    if not memory:
        raise ConditionError(f"memory for condition {condition!r} is an empty dict; return None for no memory")
    rows = {name: int(np.shape(a)[0]) if np.ndim(a) else -1 for name, a in memory.items()}
    for name, r in rows.items():
        if r not in (n_texts, 1):
            raise ConditionError(f"memory array {name!r} for condition {condition!r} has {r} rows for {n_texts} "
                                 f"texts; expected {n_texts} (one per text) or 1 (shared)")
    if len(set(rows.values())) != 1:
        raise ConditionError(f"memory arrays for condition {condition!r} disagree on rows: {rows}")
    return next(iter(rows.values()))


def row_index(text_of_row: Sequence[int], memory_rows: int, pad_to: int) -> np.ndarray:
    """For each batch row, the memory row to gather: the row's text, or 0 when memory is shared.

    Padding rows (past ``len(text_of_row)`` up to ``pad_to``) repeat the last row's memory.
    """
    idx = np.asarray(text_of_row, np.int32)
    if memory_rows == 1:
        idx = np.zeros_like(idx)
    pad = pad_to - len(idx)
    if pad < 0:
        raise ValueError(f"{len(idx)} rows do not fit in a batch of {pad_to}")
    return np.concatenate([idx, np.full(pad, idx[-1] if len(idx) else 0, np.int32)])


def pad_to(items: list, size: int) -> list:
    """``items`` extended to ``size`` by repeating the last one: fixed batch shapes for jitted kernels."""
    if not items or len(items) > size:
        raise ValueError(f"cannot pad {len(items)} items to {size}")
    return items + [items[-1]] * (size - len(items))
