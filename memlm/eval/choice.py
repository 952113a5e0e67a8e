"""Multiple-choice tasks by log-likelihood, with the question text as the retrieval key.

A task file is JSONL, one ``{"question", "choices": [...], "gold": int, "context"?}`` a line
(``context`` overrides the retrieval key, e.g. the part of a schema task shared by all choices;
the paper retrieves with the question text, docs/paper.md §3.1). Each choice is scored as a
continuation of the question: ``sum log p(choice tokens | question)``. A single space joins
question and choice when neither side has one at the seam.

Two accuracies, both reported: ``accuracy`` picks the highest summed log-likelihood;
``accuracy_norm`` the highest mean log-likelihood per choice token (the length normalisation of
LLM-Foundry, the paper's harness). Questions longer than ``max_len`` minus the choice are cut
from the left, so the choice is always scored whole.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from memlm.eval.probes import ProbeFileError, field, read_jsonl
from memlm.infer.conditions import MemoryProvider, memory_rows, pad_to, parse_conditions, row_index
from memlm.infer.generate import MIN_PROMPT_BUCKET, TextTokenizer, bucket
from memlm.infer.scoring import target_logprobs

__all__ = ["ChoiceItem", "evaluate_choice", "load_choice_items"]


@dataclasses.dataclass(frozen=True)
class ChoiceItem:
    """One question, its candidate continuations, the index of the right one and the retrieval text."""

    question: str
    choices: tuple[str, ...]
    gold: int
    context: str | None = None

    @property
    def key(self) -> str:
        return self.question if self.context is None else self.context


def load_choice_items(path: str | os.PathLike) -> list[ChoiceItem]:
    """Read a multiple-choice JSONL file; every bad line fails with the file, line and field."""
    items = []
    for lineno, obj in read_jsonl(path):
        where = f"{path}:{lineno}"
        question = field(obj, "question", where, (str,))
        choices = field(obj, "choices", where, (list,))
        gold = field(obj, "gold", where, (int,))
        context = field(obj, "context", where, (str,), required=False)
        if not question.strip():
            raise ProbeFileError(f"{where}: field 'question' is empty")
        if len(choices) < 2 or not all(isinstance(c, str) and c.strip() for c in choices):
            raise ProbeFileError(f"{where}: field 'choices' must be a list of two or more non-empty strings")
        if not 0 <= gold < len(choices):
            raise ProbeFileError(f"{where}: field 'gold' = {gold} is not an index into {len(choices)} choices")
        items.append(ChoiceItem(question, tuple(choices), gold, context))
    if not items:
        raise ProbeFileError(f"{path}: no items in file")
    return items


def _continuation(question: str, choice: str) -> str:
    return choice if question[-1:].isspace() or choice[:1].isspace() else " " + choice


def _rows(tokenizer: TextTokenizer, items: Sequence[ChoiceItem], max_len: int | None):
    """Per (item, choice): (item index, context ids, choice ids), the context cut from the left to fit."""
    rows = []
    plain = getattr(tokenizer, "encode_plain", tokenizer.encode)  # a choice continues the question: no BOS
    for i, item in enumerate(items):
        question = [int(t) for t in tokenizer.encode(item.question)]
        for choice in item.choices:
            c = [int(t) for t in plain(_continuation(item.question, choice))]
            if not question or not c:
                raise ValueError(f"question {item.question!r} or choice {choice!r} encodes to no tokens")
            q = question
            if max_len is not None:
                if len(c) >= max_len:
                    raise ValueError(f"choice {choice!r} has {len(c)} tokens, more than max_len - 1 = {max_len - 1}")
                q = question[max(0, len(question) + len(c) - max_len):]
            rows.append((i, q, c))
    return rows


def evaluate_choice(fn: Any, params: Any, tokenizer: TextTokenizer, items: Sequence[ChoiceItem],
                    memory_for: MemoryProvider, conditions: str | Iterable[str], batch_size: int,
                    max_len: int | None = None, return_scores: bool = False) -> dict:
    """Accuracy of log-likelihood choice on ``items`` under each memory condition.

    ``batch_size`` counts items; their (question, choice) rows go through one forward. Returns
    ``{"conditions": {cond: {"accuracy", "accuracy_norm", "n"}}}`` and, with ``return_scores``,
    ``"scores": {cond: [[summed log-likelihood per choice], ...]}`` and ``"tokens"`` (choice token
    counts per item).
    """
    conds = parse_conditions(conditions)
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if not items:
        raise ValueError("no multiple-choice items to evaluate")
    scores: dict[str, list[list[float]]] = {c: [] for c in conds}
    tokens: list[list[int]] = []
    for start in range(0, len(items), batch_size):
        batch = items[start: start + batch_size]
        rows = _rows(tokenizer, batch, max_len)
        b = bucket(batch_size * max(len(item.choices) for item in batch))  # the last batch keeps the shape
        t = bucket(max(len(q) + len(c) - 1 for _, q, c in rows), MIN_PROMPT_BUCKET)
        inputs = np.zeros((b, t), np.int32)
        targets = np.zeros((b, t), np.int32)
        weights = np.zeros((b, t), np.float32)
        lengths = np.ones(b, np.int32)
        for r, (_, q, c) in enumerate(rows):
            seq = q + c
            n = len(seq) - 1
            inputs[r, :n] = seq[:-1]
            targets[r, :n] = seq[1:]
            weights[r, len(q) - 1: n] = 1.0
            lengths[r] = n
        per_item = np.cumsum([0] + [len(item.choices) for item in batch])
        tokens.extend([len(c) for _, _, c in rows[per_item[k]: per_item[k + 1]]] for k in range(len(batch)))
        keys = pad_to([item.key for item in batch], batch_size)  # a fixed memory shape for every batch
        for cond in conds:
            memory = memory_for(keys, cond)
            idx = row_index([r[0] for r in rows], memory_rows(memory, len(keys), cond), b)
            ll = target_logprobs(fn, params, inputs, targets, weights, lengths, memory, idx)
            scores[cond].extend(ll[per_item[k]: per_item[k + 1]].tolist() for k in range(len(batch)))
    result: dict[str, Any] = {"conditions": {}}
    gold = np.array([item.gold for item in items])
    for cond in conds:
        hit = [int(np.argmax(s)) for s in scores[cond]]
        hit_norm = [int(np.argmax(np.asarray(s) / np.asarray(n))) for s, n in zip(scores[cond], tokens, strict=True)]
        result["conditions"][cond] = {"accuracy": float(np.mean(np.array(hit) == gold)),
                                      "accuracy_norm": float(np.mean(np.array(hit_norm) == gold)), "n": len(items)}
    if return_scores:
        result["scores"] = scores
        result["tokens"] = tokens
    return result
