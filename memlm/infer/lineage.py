"""Lineage: which training documents trained a memory block, and so which ones a text's memory holds.

A block (level l, node n) learns only from the sequences packed for the leaves under n: the
training documents whose units ``memlm prepare`` routed through n, plus those ``memlm learn`` added
there, minus those ``memlm forget`` removed (:class:`memlm.edit.documents.RunDocuments`). Prepare
already keeps what that takes, bounded by the corpus and not by its tokens: per work unit, each
unit's path (``.units/route/NNNNN/paths.npy``), document and embedding, each document's source file
and line (``origins.json``), and in the RAG index each document's text. Nothing is recorded per
token or per step.

``memlm trace --workdir RUN --text TEXT`` routes a text as ``fetched`` does and lists, per level, how
many training documents trained the block it fetches and the ones nearest the text;
``--block LEVEL:NODE`` (or ``memlm info RUN --block LEVEL:NODE``) lists a block's documents. (With
``train.sibling_path_prob`` some sequences also train a sibling's path: those are not counted here.)
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["BlockDocuments", "LineageError", "block_documents", "parse_block", "trace"]


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
    """The documents that trained one block; per unit routed through it, its document (and its cosine
    with a query, when one is given)."""

    def __init__(self, level: int, node: int, unit_documents: np.ndarray, scores: np.ndarray | None):
        self.level, self.node = level, node
        self.unit_documents, self.scores = unit_documents, scores
        self.documents = np.unique(unit_documents)

    def ranked(self) -> list[int]:
        """The documents, nearest the query first (at their best unit), else in number order."""
        if self.scores is None:
            return [int(d) for d in self.documents]
        order = np.argsort(-self.scores, kind="stable")
        return list(dict.fromkeys(int(d) for d in self.unit_documents[order]))


def block_documents(docs: Any, level: int, node: int, query: np.ndarray | None = None) -> BlockDocuments:
    """The live documents routed through ``node`` at ``level`` (streamed work unit by work unit)."""
    found, scores = [], []
    for u in docs.units():
        paths = np.load(u.route_dir / "paths.npy", mmap_mode="r")
        hit = np.nonzero(np.asarray(paths[:, level - 1]) == node)[0]
        if hit.size == 0:
            continue
        d = u.documents()[hit]
        live = ~np.isin(d, docs.forgotten)
        found.append(d[live])
        if query is not None:
            emb = np.load(u.encode_dir / "embeddings.npy", mmap_mode="r")
            scores.append(np.asarray(emb[hit[live]], np.float32) @ np.asarray(query, np.float32))
    unit_docs = np.concatenate(found) if found else np.zeros(0, np.int64)
    score = (np.concatenate(scores) if scores else np.zeros(0, np.float32)) if query is not None else None
    return BlockDocuments(level, node, unit_docs, score)


def trace(run: Any, text: str | None = None, block: str | None = None, limit: int = 5) -> dict[str, Any]:
    """What ``memlm trace`` prints, as a dict: per level (or for one block) the block, how many documents
    trained it and up to ``limit`` of them (nearest the text first, when a text is given), with their
    source file and line."""
    from memlm.edit.documents import RunDocuments

    tree = run.memory.tree
    if tree is None:
        raise LineageError(f"{str(run.workdir)!r} has no memory bank: nothing to trace")
    if block is not None:
        targets = [parse_block(block, tree.k, tree.depth)]
        query = None
    elif text is not None:
        from memlm.infer.beam import provider_of

        path = provider_of(run).paths([text], "fetched")[0]  # as `fetched` routes it: beam, descent, edits
        targets = [(level, int(path[level - 1])) for level in range(1, tree.depth + 1)]
        query = run.memory.embed([text])[0]
    else:
        raise LineageError("give --text TEXT or --block LEVEL:NODE")
    docs = RunDocuments(run.workdir)
    levels = []
    for level, node in targets:
        found = block_documents(docs, level, node, query)
        levels.append({"level": level, "node": node, "documents": int(len(found.documents)),
                       "units": int(len(found.unit_documents)),
                       "shown": [{"document": d, "origin": docs.origin(d), "text": docs.text(d)}
                                 for d in found.ranked()[:limit]]})
    return {"run": str(run.workdir), "text": text, "levels": levels, "forgotten": int(len(docs.forgotten))}


def format_trace(result: dict[str, Any], width: int = 100) -> str:
    """Plain text: a line per block, then its documents (one line each, cut to ``width``)."""
    lines = [f"memlm trace: {result['text']!r}" if result["text"] is not None else "memlm trace"]
    for lv in result["levels"]:
        lines.append(f"level {lv['level']} node {lv['node']}: trained by {lv['documents']:,} documents "
                     f"({lv['units']:,} units)" + ("; nearest the text:" if result["text"] is not None else ":"))
        for doc in lv["shown"]:
            one = " ".join(doc["text"].split())
            where = f" ({doc['origin']})" if doc.get("origin") else ""
            lines.append(f"  [{doc['document']}]{where} {one[: width - 10]}{'...' if len(one) > width - 10 else ''}")
    if result.get("forgotten"):
        lines.append(f"({result['forgotten']:,} forgotten documents are not counted: `memlm forget`)")
    return "\n".join(lines)
