"""Long-tail probes: greedy answers scored as the paper, accuracy per frequency bucket and condition.

A probe file is JSONL, one ``{"prompt", "answer", "bucket"?, "context"?, "documents"?, "entity"?}``
a line (docs/design.md §6). ``context`` is the retrieval key (default: the prompt, as the paper's
atomic-number probe whose prompt contains the element name). ``bucket`` is a free label (the
built-in probes use ``"0"`` for the rarest bucket up to ``"4"``); probes without one count only in
the overall accuracy. ``documents`` (training document ids: positions among the training
documents in corpus order, held-out ones skipped) or ``entity`` (a value of the documents'
``data.entity_field`` field) say which training documents the probe is about: ``memlm eval``
then reports whether the probe routes to where those documents went (``agreement.py``).

Scoring (:func:`is_correct`), from the paper's atomic-number probe (docs/paper.md §5.2):

- **Numeric answers** (an optionally signed integer, e.g. ``"26"``): the integers in the output
  are parsed and the probe is correct if any equals the answer. An integer is a maximal run of
  digits (also after a letter: ``"Z26"`` holds 26), with ``,`` thousands groups allowed
  (``"1,000"`` is 1000) and a leading ``-`` taken as a sign only when it does not follow a letter
  or digit (``"Fe-26"`` holds 26, ``" -3"`` holds -3). A number with a
  decimal fraction (``"26.5"``) is not an integer and never matches.
- **Other answers**: normalised exact match. Normalising (as SQuAD's) lowercases, deletes
  punctuation characters (``"U.S."`` becomes ``"us"``), drops the articles a / an / the, and
  collapses whitespace. The probe is correct if the normalised answer
  equals the normalised first line of the output, or the normalised output starts with the
  normalised answer followed by the end or a space (so ``"Paris"`` matches ``" Paris, France."``
  but not ``" Parisian"``).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import unicodedata
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from memlm.infer.conditions import MemoryProvider, documents_for, pad_to, parse_conditions
from memlm.infer.generate import TextTokenizer, generate
from memlm.infer.rag import splice, template_prefix

__all__ = ["Probe", "ProbeFileError", "evaluate_probes", "is_correct", "load_probes", "normalize", "parse_integers",
           "read_jsonl"]

_INTEGER = re.compile(r"^[+-]?\d+$")
_NUMBER = re.compile(r"(?<![\d.])(\d{1,3}(?:,\d{3})+|\d+)(\.\d+)?(?!\d)")
_ARTICLES = re.compile(r"\b(a|an|the)\b")


class ProbeFileError(ValueError):
    """A probe or task file cannot be read; the message names the file and line."""


@dataclasses.dataclass(frozen=True)
class Probe:
    """One probe: the prompt to continue, the expected answer, its bucket label and retrieval text."""

    prompt: str
    answer: str
    bucket: str | None = None
    context: str | None = None
    documents: tuple[int, ...] | None = None
    entity: str | None = None

    @property
    def key(self) -> str:
        """The retrieval text: ``context`` if given, else the prompt."""
        return self.prompt if self.context is None else self.context


def read_jsonl(path: str | os.PathLike) -> Iterator[tuple[int, dict]]:
    """(line number, object) for each non-blank line; bad JSON or a non-object names file and line."""
    path = Path(path)
    if not path.is_file():
        raise ProbeFileError(f"{path}: file does not exist")
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ProbeFileError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
            if not isinstance(obj, dict):
                raise ProbeFileError(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
            yield lineno, obj


def field(obj: dict, name: str, where: str, kinds: tuple[type, ...], required: bool = True) -> Any:
    """``obj[name]`` checked for type (bool is never a number); errors name ``where`` (file:line)."""
    if name not in obj or obj[name] is None:
        if required:
            raise ProbeFileError(f"{where}: missing field {name!r}")
        return None
    value = obj[name]
    if isinstance(value, bool) or not isinstance(value, kinds):
        expected = " or ".join(k.__name__ for k in kinds)
        raise ProbeFileError(f"{where}: field {name!r} must be {expected}, got {value!r}")
    return value


def load_probes(path: str | os.PathLike) -> list[Probe]:
    """Read a probe JSONL file; every bad line fails with the file, line and field."""
    probes = []
    for lineno, obj in read_jsonl(path):
        where = f"{path}:{lineno}"
        prompt = field(obj, "prompt", where, (str,))
        answer = str(field(obj, "answer", where, (str, int)))
        bucket = field(obj, "bucket", where, (str, int), required=False)
        context = field(obj, "context", where, (str,), required=False)
        documents = field(obj, "documents", where, (list,), required=False)
        entity = field(obj, "entity", where, (str, int), required=False)
        if not prompt.strip():
            raise ProbeFileError(f"{where}: field 'prompt' is empty")
        if not _INTEGER.match(answer.strip()) and not normalize(answer):
            raise ProbeFileError(f"{where}: answer {answer!r} is empty after normalisation (it would match anything)")
        if documents is not None:
            if not documents or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in documents):
                raise ProbeFileError(f"{where}: field 'documents' must be a non-empty list of training document ids "
                                     f"(integers >= 0), got {documents!r}")
            documents = tuple(documents)
        probes.append(Probe(prompt, answer, None if bucket is None else str(bucket), context, documents,
                            None if entity is None else str(entity)))
    if not probes:
        raise ProbeFileError(f"{path}: no probes in file")
    return probes


def normalize(text: str) -> str:
    """Lowercase, punctuation and articles removed, whitespace collapsed."""
    text = "".join(c for c in text.lower() if not unicodedata.category(c).startswith("P"))
    return " ".join(_ARTICLES.sub(" ", text).split())


def parse_integers(text: str) -> list[int]:
    """The integers written in ``text`` (see the module docstring for what counts)."""
    out = []
    for m in _NUMBER.finditer(text):
        if m.group(2):  # a decimal fraction: not an integer
            continue
        start = m.start()
        negative = start > 0 and text[start - 1] == "-" and (start == 1 or not text[start - 2].isalnum())
        value = int(m.group(1).replace(",", ""))
        out.append(-value if negative else value)
    return out


def is_correct(answer: str, output: str) -> bool:
    """The paper's scoring: integer match for numeric answers, else normalised exact match."""
    answer = answer.strip()
    if _INTEGER.match(answer):
        return int(answer) in parse_integers(output)
    want = normalize(answer)
    lines = output.strip().splitlines()
    if lines and normalize(lines[0]) == want:
        return True
    got = normalize(output)
    return got.startswith(want) and (len(got) == len(want) or got[len(want)] == " ")


def bucket_order(labels: Iterable[str]) -> list[str]:
    """Labels in numeric order when all are numbers (``"0"`` rarest first), else first-seen order."""
    seen = list(dict.fromkeys(labels))
    try:
        return sorted(seen, key=float)
    except ValueError:
        return seen


def _batches(items: Sequence, size: int) -> Iterator[Sequence]:
    for i in range(0, len(items), size):
        yield items[i: i + size]


def evaluate_probes(fn: Any, params: Any, tokenizer: TextTokenizer, probes: Sequence[Probe],
                    memory_for: MemoryProvider, conditions: str | Iterable[str], max_new_tokens: int,
                    batch_size: int, return_outputs: bool = False) -> dict:
    """Greedy-answer every probe under each memory condition and score it (:func:`is_correct`).

    Memory is asked for once per batch and condition, keyed by each probe's retrieval text.
    Returns ``{"conditions": {cond: {"accuracy", "n", "by_bucket": {label: acc}, "n_by_bucket"}}}``
    and, with ``return_outputs``, ``"outputs": {cond: [{"prompt", "answer", "bucket", "output",
    "correct"}, ...]}`` in probe order.
    """
    conds = parse_conditions(conditions)
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if not probes:
        raise ValueError("no probes to evaluate")
    correct: dict[str, list[bool]] = {c: [] for c in conds}
    outputs: dict[str, list[str]] = {c: [] for c in conds}
    for batch in _batches(probes, batch_size):
        # The last batch is padded with copies of its last probe, so every batch has the same shapes.
        padded = pad_to(list(batch), batch_size)
        ids = [[int(i) for i in tokenizer.encode(p.prompt)] for p in padded]
        keys = [p.key for p in padded]
        for c in conds:
            memory = memory_for(keys, c)
            docs = documents_for(memory_for, keys, c)
            prompts = ids if docs is None else [splice(x, d, template_prefix(tokenizer))[0]
                                                for x, d in zip(ids, docs, strict=True)]
            gen = generate(fn, params, prompts, memory, max_new_tokens, tokenizer.eot_id)[: len(batch)]
            texts = [tokenizer.decode(g) for g in gen]
            outputs[c].extend(texts)
            correct[c].extend(is_correct(p.answer, t) for p, t in zip(batch, texts, strict=True))
    labels = bucket_order(p.bucket for p in probes if p.bucket is not None)
    result: dict[str, Any] = {"conditions": {}}
    for c in conds:
        by, n_by = {}, {}
        for label in labels:
            hits = [ok for p, ok in zip(probes, correct[c], strict=True) if p.bucket == label]
            by[label], n_by[label] = sum(hits) / len(hits), len(hits)
        result["conditions"][c] = {"accuracy": sum(correct[c]) / len(probes), "n": len(probes), "by_bucket": by,
                                   "n_by_bucket": n_by}
    if return_outputs:
        result["outputs"] = {
            c: [{"prompt": p.prompt, "answer": p.answer, "bucket": p.bucket, "output": o, "correct": ok}
                for p, o, ok in zip(probes, outputs[c], correct[c], strict=True)]
            for c in conds}
    return result
