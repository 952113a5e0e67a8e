"""Lineage: which training documents trained a memory block, and so which ones a text's memory holds.

A block (level l, node n) learns only from the sequences packed for the leaves under n: the
training documents whose units ``memlm prepare`` routed through n. The data directory already holds
what that takes, bounded by the corpus and not by its tokens: each unit's path (``paths.npy``, in
global unit order) and, in the RAG index (``rag.py``, built from prepare's work units on first use),
each unit's document and each document's text. Nothing is recorded per token or per step.

``memlm trace --workdir RUN --text TEXT`` routes a text as ``fetched`` does and lists, per level, how
many training documents trained the block it fetches and the ones nearest the text;
``--block LEVEL:NODE`` lists a block's documents. (With ``train.sibling_path_prob`` some sequences
also train a sibling's path: those are not counted here.)
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from memlm.infer.rag import DocumentIndex, build_index

__all__ = ["BlockDocuments", "LineageError", "block_documents", "parse_block", "trace"]

CHUNK = 1 << 20  # units of paths.npy compared at once


class LineageError(ValueError):
    """A block or text cannot be traced (no tree, a node out of range); one line."""


def parse_block(spec: str, k: int, depth: int) -> tuple[int, int]:
    """``"LEVEL:NODE"`` -> (level, node), checked against the tree (node counts level by level: k**level)."""
    level, _, node = spec.partition(":")
    if not (level.isdigit() and node.isdigit()):
        raise LineageError(f"--block {spec!r}: give LEVEL:NODE, e.g. 2:13")
    level, node = int(level), int(node)
    if not 1 <= level <= depth:
        raise LineageError(f"--block {spec!r}: level must be in 1..{depth}")
    if node >= k ** level:
        raise LineageError(f"--block {spec!r}: level {level} has nodes 0..{k ** level - 1}")
    return level, node


class BlockDocuments:
    """The documents that trained one block, and their units (global unit ids)."""

    def __init__(self, level: int, node: int, units: np.ndarray, documents: np.ndarray):
        self.level, self.node, self.units, self.documents = level, node, units, documents


def block_documents(data_dir: str | os.PathLike, index: DocumentIndex, level: int, node: int) -> BlockDocuments:
    """The training documents routed through ``node`` at ``level`` (streamed over ``paths.npy``)."""
    paths = np.load(Path(data_dir) / "paths.npy", mmap_mode="r")
    units = []
    for a in range(0, len(paths), CHUNK):
        hit = np.nonzero(np.asarray(paths[a:a + CHUNK, level - 1]) == node)[0]
        units.append(hit + a)
    units = np.concatenate(units) if units else np.zeros(0, np.int64)
    return BlockDocuments(level, node, units, np.unique(index.unit_documents(units)))


def trace(run: Any, text: str | None = None, block: str | None = None, limit: int = 5) -> dict[str, Any]:
    """What ``memlm trace`` prints, as a dict: per level (or for one block) the block, how many documents
    trained it and up to ``limit`` of them (nearest the text first, when a text is given)."""
    from memlm.data.records import read_manifest

    tree = run.memory.tree
    if tree is None:
        raise LineageError(f"{str(run.workdir)!r} has no memory bank: nothing to trace")
    index = DocumentIndex(build_index(run.data_dir, read_manifest(run.data_dir), run.tokenizer))
    if block is not None:
        targets = [parse_block(block, tree.k, tree.depth)]
        query = None
    elif text is not None:
        path = run.memory.paths([text], "fetched")[0]
        targets = [(level, int(path[level - 1])) for level in range(1, tree.depth + 1)]
        query = run.memory.embed([text])[0]
    else:
        raise LineageError("give --text TEXT or --block LEVEL:NODE")
    levels = []
    for level, node in targets:
        found = block_documents(run.data_dir, index, level, node)
        if query is not None:
            order = np.argsort(-index.unit_scores(found.units, query), kind="stable")
            ranked = list(dict.fromkeys(int(d) for d in index.unit_documents(found.units[order])))
        else:
            ranked = [int(d) for d in found.documents]
        levels.append({"level": level, "node": node, "documents": int(len(found.documents)),
                       "units": int(len(found.units)),
                       "shown": [{"document": d, "text": index.text(d)} for d in ranked[:limit]]})
    return {"run": str(run.workdir), "text": text, "levels": levels}


def format_trace(result: dict[str, Any], width: int = 100) -> str:
    """Plain text: a line per block, then its documents (one line each, cut to ``width``)."""
    lines = [f"memlm trace: {result['text']!r}" if result["text"] is not None else "memlm trace"]
    for lv in result["levels"]:
        lines.append(f"level {lv['level']} node {lv['node']}: trained by {lv['documents']:,} documents "
                     f"({lv['units']:,} units)" + ("; nearest the text:" if result["text"] is not None else ":"))
        for doc in lv["shown"]:
            one = " ".join(doc["text"].split())
            lines.append(f"  [{doc['document']}] {one[: width - 10]}{'...' if len(one) > width - 10 else ''}")
    return "\n".join(lines)
