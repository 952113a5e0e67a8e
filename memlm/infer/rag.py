"""The RAG baseline: the k training documents nearest a text, put before it within a token budget.

The paper reports retrieval-augmented generation beside every memory result (docs/paper.md,
Table 3), with the same retriever: the embedder that routes texts to the bank finds the nearest
training documents, which are put before the context. memlm's two conditions:

- ``rag``: the anchor alone, the retrieved documents before the context;
- ``rag+fetched``: the same, with the blocks the text fetches (routed by the text itself, not by
  the documents put before it).

The index is the training units' embeddings that ``memlm prepare`` computed to route them
(``.units/encode/NNNNN/embeddings.npy``: no text is embedded twice), with each training
document's text; it is built on first use into ``DATA_DIR/rag/`` (one shard per prepare work
unit, files hard-linked where the file system allows) and rebuilt when the data is prepared
again. Held-out documents are never in it (prepare keeps them out of the encode units), so
held-out perplexity cannot retrieve its own document.

Search is exact (inner products of unit vectors, i.e. cosine), shard by shard through memory
maps: the memory it takes is one shard's block of scores, whatever the corpus size. A document
with several units (``tree.embed_unit = "window"``) counts once, at its best unit.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["DocumentIndex", "RagError", "RetrievedDocuments", "build_index", "splice", "spliced_targets",
           "template_prefix"]

INDEX_DIR = "rag"
SEARCH_ROWS = 1 << 16  # index rows scored at once: [queries, SEARCH_ROWS] float32 scores


class RagError(ValueError):
    """The RAG index cannot be built or read; the message says what to run."""


def _units(data_dir: Path, manifest: dict) -> tuple[str, list[Path]]:
    """(encode key, the encode unit directories of the current prepare), checked complete."""
    key = manifest.get("stages", {}).get("encode", {}).get("key")
    n = manifest.get("engine", {}).get("work_units")
    if key is None or n is None:
        raise RagError(f"{str(data_dir)!r} was prepared before memlm recorded its encode units: run `memlm prepare` "
                       "again to use the rag conditions")
    dirs = [data_dir / ".units" / "encode" / f"{u:05d}" for u in range(int(n))]
    for d in dirs:
        done = d / "done.json"
        if not done.is_file() or json.loads(done.read_text()).get("key") != key:
            raise RagError(f"{str(d)!r} is missing or from another prepare: the rag index is built from prepare's "
                           "work units; run `memlm prepare` again on this data directory")
    return key, dirs


def _link(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def build_index(data_dir: str | os.PathLike, manifest: dict, tokenizer: Any) -> Path:
    """Write ``DATA_DIR/rag/`` (if missing or stale) from prepare's encode units; returns its path.

    Per shard: ``NNNNN.emb.npy`` (the units' embeddings), ``NNNNN.doc.npy`` (each unit's document,
    numbered across shards), ``NNNNN.text.bin`` / ``NNNNN.offsets.npy`` (the documents' UTF-8
    texts, decoded from their tokens without the template).
    """
    data_dir = Path(data_dir)
    key, dirs = _units(data_dir, manifest)
    out = data_dir / INDEX_DIR
    info_path = out / "index.json"
    if info_path.is_file() and json.loads(info_path.read_text()).get("key") == key:
        return out
    tmp = data_dir / f"{INDEX_DIR}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    prefix = len(template_prefix(tokenizer))
    suffix = list(tokenizer.template["suffix"]) if getattr(tokenizer, "template", None) else []
    if suffix and suffix[-1] == tokenizer.eot_id:  # prepare leaves a template's final EOT to the packer
        suffix = suffix[:-1]
    shards, first = [], 0
    for d in dirs:
        name = d.name
        offsets = np.load(d / "doc_offsets.npy")
        n_docs = len(offsets) - 1
        itemsize = (d / "tokens.bin").stat().st_size // max(int(offsets[-1]), 1)
        tokens = np.fromfile(d / "tokens.bin", dtype={2: np.uint16, 4: np.uint32}.get(itemsize, np.uint16))
        texts = [tokenizer.decode(tokens[offsets[i] + prefix: offsets[i + 1] - len(suffix)]).encode("utf-8")
                 for i in range(n_docs)]
        np.save(tmp / f"{name}.offsets.npy", np.concatenate([[0], np.cumsum([len(t) for t in texts], dtype=np.int64)]))
        (tmp / f"{name}.text.bin").write_bytes(b"".join(texts))
        np.save(tmp / f"{name}.doc.npy", np.load(d / "spans.npz")["doc"].astype(np.int64) + first)
        _link(d / "embeddings.npy", tmp / f"{name}.emb.npy")
        shards.append({"name": name, "first_document": first, "documents": n_docs})
        first += n_docs
    tree = manifest["tree"]
    (tmp / "index.json").write_text(json.dumps({"key": key, "embedder": tree["embedder"], "dim": int(tree["dim"]),
                                                "documents": first, "shards": shards}, indent=2))
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return out


class DocumentIndex:
    """Exact nearest training documents of query embeddings, over the shards of ``DATA_DIR/rag/``."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        info = json.loads((self.path / "index.json").read_text())
        self.embedder, self.dim, self.documents = info["embedder"], int(info["dim"]), int(info["documents"])
        self.shards = info["shards"]

    def search(self, queries: np.ndarray, k: int) -> list[list[tuple[int, float]]]:
        """Per query, up to ``k`` ``(document, score)`` pairs, best first (each document once)."""
        q = np.asarray(queries, np.float32)
        if q.ndim != 2 or q.shape[1] != self.dim:
            raise RagError(f"query embeddings of shape {q.shape} for an index of dimension {self.dim}")
        # units kept per query: enough that k distinct documents survive when a document has several units
        keep = 4 * k
        best_s = np.full((len(q), 0), -np.inf, np.float32)
        best_d = np.zeros((len(q), 0), np.int64)
        for shard in self.shards:
            emb = np.load(self.path / f"{shard['name']}.emb.npy", mmap_mode="r")
            doc = np.load(self.path / f"{shard['name']}.doc.npy", mmap_mode="r")
            for a in range(0, len(emb), SEARCH_ROWS):
                scores = q @ np.asarray(emb[a:a + SEARCH_ROWS], np.float32).T
                top = np.argpartition(-scores, min(keep, scores.shape[1]) - 1, axis=1)[:, :keep]
                best_s = np.concatenate([best_s, np.take_along_axis(scores, top, 1)], 1)
                best_d = np.concatenate([best_d, np.asarray(doc[a:a + SEARCH_ROWS])[top]], 1)
                if best_s.shape[1] > keep:
                    cut = np.argpartition(-best_s, keep - 1, axis=1)[:, :keep]
                    best_s, best_d = np.take_along_axis(best_s, cut, 1), np.take_along_axis(best_d, cut, 1)
        out = []
        for s, d in zip(best_s, best_d, strict=True):
            order = np.lexsort((d, -s))  # best first, ties by document id
            seen: dict[int, float] = {}
            for i in order:
                if int(d[i]) not in seen:
                    seen[int(d[i])] = float(s[i])
                if len(seen) == k:
                    break
            out.append(list(seen.items()))
        return out

    def _unit_shards(self):
        """(first global unit, unit count, shard) of each shard, in the order of ``paths.npy``."""
        if not hasattr(self, "_spans"):
            first, self._spans = 0, []
            for shard in self.shards:
                n = len(np.load(self.path / f"{shard['name']}.doc.npy", mmap_mode="r"))
                self._spans.append((first, n, shard))
                first += n
        return self._spans

    def unit_documents(self, units: np.ndarray) -> np.ndarray:
        """The document of each global unit id (prepare's unit order, that of ``paths.npy``)."""
        units = np.asarray(units, np.int64)
        out = np.full(len(units), -1, np.int64)
        for first, n, shard in self._unit_shards():
            sel = (units >= first) & (units < first + n)
            if sel.any():
                out[sel] = np.load(self.path / f"{shard['name']}.doc.npy", mmap_mode="r")[units[sel] - first]
        return out

    def unit_scores(self, units: np.ndarray, query: np.ndarray) -> np.ndarray:
        """Cosine of each global unit's embedding with ``query`` (a unit vector)."""
        units = np.asarray(units, np.int64)
        out = np.zeros(len(units), np.float32)
        for first, n, shard in self._unit_shards():
            sel = (units >= first) & (units < first + n)
            if sel.any():
                emb = np.load(self.path / f"{shard['name']}.emb.npy", mmap_mode="r")
                out[sel] = np.asarray(emb[units[sel] - first], np.float32) @ np.asarray(query, np.float32)
        return out

    def text(self, document: int) -> str:
        """The training document's text (as its tokens decode, without the template)."""
        for shard in self.shards:
            i = document - shard["first_document"]
            if 0 <= i < shard["documents"]:
                offsets = np.load(self.path / f"{shard['name']}.offsets.npy", mmap_mode="r")
                with open(self.path / f"{shard['name']}.text.bin", "rb") as f:
                    f.seek(int(offsets[i]))
                    return f.read(int(offsets[i + 1] - offsets[i])).decode("utf-8")
        raise RagError(f"document {document} is not in the index ({self.documents} documents)")


class RetrievedDocuments:
    """Per retrieval text, the token ids put before its context: the nearest documents, within budget.

    Documents are taken best first, each followed by a blank line, while their tokens fit in
    ``budget`` (the first one is cut to the budget when it alone is longer). Cached per text.
    """

    def __init__(self, index: DocumentIndex, embed, tokenizer: Any, k: int, budget: int):
        self.index, self.embed, self.tokenizer, self.k, self.budget = index, embed, tokenizer, k, budget
        self._ids: dict[str, list[int]] = {}
        self.retrieved: dict[str, list[tuple[int, float]]] = {}

    def __call__(self, texts: Sequence[str]) -> list[list[int]]:
        missing = [t for t in dict.fromkeys(texts) if t not in self._ids]
        if missing:
            for text, hits in zip(missing, self.index.search(self.embed(missing), self.k), strict=True):
                self.retrieved[text] = hits
                self._ids[text] = self._fit([self.index.text(d) for d, _ in hits])
        return [self._ids[t] for t in texts]

    def _fit(self, documents: list[str]) -> list[int]:
        ids: list[int] = []
        for doc in documents:
            more = [int(t) for t in self.tokenizer.encode_plain(doc + "\n\n")]
            if len(ids) + len(more) > self.budget:
                if not ids:
                    ids = more[: self.budget]
                break
            ids += more
        return ids


def template_prefix(tokenizer: Any) -> list[int]:
    """The ids the tokenizer's template puts before a text (none for a tokenizer without one)."""
    template = getattr(tokenizer, "template", None)
    return [int(t) for t in template["prefix"]] if template else []


def spliced_targets(tokens: Sequence[int], documents: Sequence[int], template: Sequence[int]
                     ) -> tuple[list[int], list[int], list[int]]:
    """``(inputs, targets, scored)`` of a token sequence with documents put in: ``scored`` lists the
    input positions whose target is one of the sequence's own targets (``tokens[1:]``), each once."""
    seq, at, n = splice(tokens, documents, template)
    scored = [(m if m < at else m + n) - 1 for m in range(1, len(tokens))]
    return seq[:-1], seq[1:], scored


def splice(ids: Sequence[int], documents: Sequence[int], template: Sequence[int]) -> tuple[list[int], int, int]:
    """``(ids with the documents put in, where they went, how many tokens went in)``.

    The documents go right after the template's prefix (the BOS the model always starts with); a
    sequence that does not start with it (a continuation window) gets the prefix first.
    """
    ids, template = [int(i) for i in ids], [int(t) for t in template]
    if not documents:
        return ids, 0, 0
    n = len(template)
    if ids[:n] == template:
        return ids[:n] + list(documents) + ids[n:], n, len(documents)
    return template + list(documents) + ids, 0, n + len(documents)
