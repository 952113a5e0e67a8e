"""Work units of the sharded prepare: what one worker does with one range of input shards.

The engine (``pipeline.py``) only schedules these functions; each one reads its inputs from and
writes its outputs to ``<out>/.units/<stage>/<unit>/``, and records a ``done.json`` marker (the
stage key and what the unit measured) only after its outputs are complete. A rerun with the same
key skips every unit whose marker is there, so a killed prepare redoes only unfinished units.

Stages per work unit (a range of ``data.unit_shards`` consecutive input shards):

- ``scan``    count the documents (bad lines and corrupt shards counted, per shard).
- ``encode``  held-out documents to ``heldout.jsonl``; the rest tokenized (``tokens.bin``,
              ``doc_offsets.npy``), cut into units (documents or windows) and embedded
              (``embeddings.npy``); the entity field's value per document.
- ``route``   the units' paths (``paths.npy``), routing statistics, entity counts per leaf, and
              per leaf a payload (global unit ids, lengths, document ends, token offsets) for the packer.
- ``pack``    per leaf range (not per work unit): the payloads of its leaves from every work unit,
              in global unit order, packed into ArrayRecord shards ``shards/train-rRRRRR-NNNNN``.

Global identities (document and unit indices in corpus order) come from prefix sums of the scan
and encode counts, so the records do not depend on how many workers ran the units or in which
order. Every array a unit holds is the unit's own: nothing grows with the corpus.
"""

from __future__ import annotations

import dataclasses
import json
import os
import resource
import shutil
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from memlm.data.progress import Progress
from memlm.data.readers import Document, ReadStats, Shard, iter_shard
from memlm.data.records import ShardWriter, encode_sequence, write_json
from memlm.retrieval.embedder import embed_dtype_of

ENCODE_BATCH = 1024
UNITS_DIR = ".units"


@dataclasses.dataclass(frozen=True)
class WorkUnit:
    """Consecutive input shards processed together; ``index`` orders units in corpus order."""

    index: int
    shards: tuple[Shard, ...]


def plan_units(shards: list[Shard], shards_per_unit: int) -> list[WorkUnit]:
    """Group the corpus shards (in corpus order) into work units of ``shards_per_unit`` shards."""
    if shards_per_unit < 1:
        raise ValueError(f"config key 'data.unit_shards' = {shards_per_unit}: must be at least 1")
    return [WorkUnit(i, tuple(shards[a:a + shards_per_unit]))
            for i, a in enumerate(range(0, len(shards), shards_per_unit))]


def unit_dir(root: str | os.PathLike, stage: str, index: int) -> Path:
    return Path(root) / UNITS_DIR / stage / f"{index:05d}"


def lookup(root: str | os.PathLike, stage: str, index: int, key: str) -> dict[str, Any] | None:
    """The marker info of a finished unit with this key, or None (never ran, other key, torn)."""
    path = unit_dir(root, stage, index) / "done.json"
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return record["info"] if record.get("key") == key else None


def _fresh(root, stage: str, index: int) -> Path:
    """An empty output folder for a unit about to (re)run: a half-written earlier try is removed."""
    d = unit_dir(root, stage, index)
    if d.exists():
        shutil.rmtree(d)
    d.mkdir(parents=True)
    return d


def _mark(root, stage: str, index: int, key: str, info: dict[str, Any], started: float) -> dict[str, Any]:
    info = {**info, "seconds": time.time() - started, "max_rss_bytes": max_rss(), "worker_pid": os.getpid()}
    write_json(unit_dir(root, stage, index) / "done.json", {"key": key, "info": info})
    _fault(f"prepare-{stage}-done", index)
    return info


def max_rss() -> int:
    """This worker process's peak resident memory so far (bytes)."""
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def _fault(point: str, index: int) -> None:
    """Crash tests' seam: ``MEMLM_KILL_AT=prepare-encode-done:3`` SIGKILLs the whole prepare (the
    driver and every worker: its process group) right after unit 3's marker is written."""
    if os.environ.get("MEMLM_KILL_AT") == f"{point}:{index}":
        os.killpg(os.getpgrp(), signal.SIGKILL)


def say(message: str) -> None:
    """Progress per unit on the console (workers print; the runner forwards their output)."""
    print(f"memlm prepare: {message}", flush=True)


# scan --------------------------------------------------------------------------------------------
def scan_unit(unit: WorkUnit, root: str, key: str) -> dict[str, Any]:
    """Count the unit's documents; the marker keeps the read statistics (per shard)."""
    done = lookup(root, "scan", unit.index, key)
    if done is not None:
        return {"unit": unit.index, "reused": True, **done}
    t0 = time.time()
    _fresh(root, "scan", unit.index)
    stats = ReadStats()
    for shard in unit.shards:
        for _ in iter_shard(shard, stats, report=None):
            pass
    info = _mark(root, "scan", unit.index, key, {"stats": stats.as_dict()}, t0)
    say(f"scan unit {unit.index}: {stats.documents} documents in {len(unit.shards)} shards")
    return {"unit": unit.index, "reused": False, **info}


def unit_documents(unit: WorkUnit) -> Iterator[Document]:
    """The unit's documents in order (silent: the scan already reported the bad lines)."""
    stats = ReadStats()
    for shard in unit.shards:
        yield from iter_shard(shard, stats, report=None)


# encode ------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class EncodeSpec:
    """Everything an encode unit needs besides its shards (picklable, sent to every worker)."""

    root: str
    key: str
    tokenizer: str  # path of tokenizer.json
    vocab_multiple: int
    token_dtype: str
    tree: dict[str, Any]  # the config's tree section (embedder, unit, window, batch)
    entity_field: str
    first_document: dict[int, int]  # unit -> global index of its first document (held-out included)
    heldout: tuple[int, ...]  # global indices of the held-out documents, sorted


_EMBEDDERS: dict[str, Any] = {}


def _embedder(tree: dict[str, Any]):
    """One embedder per worker process (MiniLM loads and compiles once, not once per unit)."""
    import ml_collections

    from memlm.retrieval import get_embedder
    from memlm.retrieval.embedder import local_embed_mesh

    name = json.dumps(tree, sort_keys=True)
    if name not in _EMBEDDERS:
        _EMBEDDERS[name] = get_embedder(ml_collections.ConfigDict({"tree": tree}), mesh=local_embed_mesh())
    return _EMBEDDERS[name]


def write_origins(path: Path, origins: list[str]) -> None:
    """Each document's source as ``{"files": [...], "documents": [[file, line], ...]}`` (line -1 when the
    reader gives none): a few bytes a document, the file names once per work unit."""
    files: dict[str, int] = {}
    rows = []
    for o in origins:
        name, _, line = o.rpartition(":")
        if not (name and line.isdigit()):
            name, line = o, "-1"
        rows.append([files.setdefault(name, len(files)), int(line)])
    path.write_text(json.dumps({"files": list(files), "documents": rows}, separators=(",", ":")), encoding="utf-8")


def unit_spans(offsets: np.ndarray, unit: str, window: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(doc, start, stop, ends_document) per unit: whole documents, or windows of ``window`` tokens."""
    lengths = np.diff(offsets)
    if unit == "document":
        n = len(lengths)
        return np.arange(n, dtype=np.int64), np.zeros(n, np.int64), lengths.astype(np.int64), np.ones(n, bool)
    per_doc = np.maximum(1, -(-lengths // window))
    doc = np.repeat(np.arange(len(lengths), dtype=np.int64), per_doc)
    first = np.repeat(np.cumsum(per_doc) - per_doc, per_doc)
    start = (np.arange(len(doc)) - first) * window
    stop = np.minimum(start + window, lengths[doc])
    ends = stop == lengths[doc]
    return doc, start, stop, ends


def encode_unit(unit: WorkUnit, spec: EncodeSpec) -> dict[str, Any]:
    """Held-out split, tokens and unit embeddings of one work unit (see the module docstring)."""
    from memlm.data.tokenizer import Tokenizer

    done = lookup(spec.root, "encode", unit.index, spec.key)
    if done is not None:
        say(f"encode unit {unit.index}: reused")
        return {"unit": unit.index, "reused": True, **done}
    t0 = time.time()
    d = _fresh(spec.root, "encode", unit.index)
    tok = Tokenizer.from_file(spec.tokenizer, spec.vocab_multiple)
    first = spec.first_document[unit.index]
    heldout = np.asarray(spec.heldout, np.int64)
    lengths: list[int] = []
    entities: list[str | None] = []
    origins: list[str] = []  # each training document's "file:line" (lineage: memlm trace, memlm info --block)
    texts: list[str] = []  # document units: the texts to embed, in order
    held: list[str] = []  # held-out documents, embedded whole as evaluation routes them
    n_heldout = 0
    with open(d / "tokens.bin", "wb") as tf, open(d / "heldout.jsonl", "w", encoding="utf-8") as hf:
        batch: list[str] = []

        def flush() -> None:
            for ids in tok.encode_batch(batch):
                tf.write(ids.astype(spec.token_dtype).tobytes())
                lengths.append(len(ids))
            batch.clear()

        for i, doc in enumerate(unit_documents(unit)):
            g = first + i
            j = np.searchsorted(heldout, g)
            if j < len(heldout) and heldout[j] == g:
                hf.write(json.dumps({"text": doc.text, **doc.fields}, ensure_ascii=False) + "\n")
                held.append(doc.text)
                n_heldout += 1
                continue
            batch.append(doc.text)
            if spec.tree["embed_unit"] == "document":
                texts.append(doc.text)
            origins.append(doc.origin)
            value = doc.fields.get(spec.entity_field) if spec.entity_field else None
            entities.append(str(value) if isinstance(value, (str, int)) and not isinstance(value, bool) else None)
            if len(batch) == ENCODE_BATCH:
                flush()
        flush()
    offsets = np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)])
    np.save(d / "doc_offsets.npy", offsets)
    doc, start, stop, ends = unit_spans(offsets, spec.tree["embed_unit"], int(spec.tree["embed_window"]))
    np.savez(d / "spans.npz", doc=doc, start=start, stop=stop, ends=ends)
    if spec.entity_field:
        (d / "entities.json").write_text(json.dumps(entities), encoding="utf-8")
    write_origins(d / "origins.json", origins)
    t_tok = time.time()
    if spec.tree["embed_unit"] != "document":
        tokens = np.fromfile(d / "tokens.bin", dtype=spec.token_dtype)
        texts = [tok.decode(tokens[offsets[a] + b:offsets[a] + c]) for a, b, c in zip(doc, start, stop, strict=True)]
    embedder = _embedder(spec.tree)
    t_embed = time.time()
    reused = _embed_chunks(unit.index, spec, texts, embedder, d / "embeddings.npy")
    # evaluation fetches a held-out document's memory with its whole text: embedded here, once
    np.save(d / "heldout_embeddings.npy", embedder.embed(held) if held else np.zeros((0, embedder.dim), np.float32))
    info = _mark(spec.root, "encode", unit.index, spec.key,
                 {"documents": len(lengths), "heldout": n_heldout, "units": len(doc), "tokens": int(offsets[-1]),
                  "embedder": embedder.name, "dim": embedder.dim,
                  "embed_dtype": embed_dtype_of(embedder), "tokenize_seconds": t_tok - t0,
                  "embed_seconds": time.time() - t_embed, "embed_chunks_reused": reused}, t0)
    shutil.rmtree(_partial_dir(spec.root, unit.index), ignore_errors=True)
    say(f"encode unit {unit.index}: {len(lengths)} documents, {len(doc)} units embedded "
        f"({len(doc) / max(info['embed_seconds'], 1e-9):.0f} units/s)")
    return {"unit": unit.index, "reused": False, **info}


def embed_chunk_size(tree: dict[str, Any]) -> int:
    """Units embedded, and kept, per resumable chunk: a few of the embedder's batches (seconds of work)."""
    return max(int(tree["embed_batch"]) * 4, 64)


def _partial_dir(root: str | os.PathLike, index: int) -> Path:
    return Path(root) / UNITS_DIR / "encode_partial" / f"{index:05d}"


def _embed_chunks(index: int, spec: EncodeSpec, texts: list[str], embedder, out: Path) -> int:
    """Embed ``texts`` into ``out`` (``[n, dim]`` float32) chunk by chunk; returns the chunks reused.

    Each finished chunk is kept in ``.units/encode_partial/<unit>/`` under the stage key, so an
    interrupted prepare (Ctrl-C, SIGTERM, a killed worker) redoes only the chunk it was in.
    """
    part = _partial_dir(spec.root, index)
    key_file = part / "key"
    if not (key_file.is_file() and key_file.read_text() == spec.key):
        shutil.rmtree(part, ignore_errors=True)
        part.mkdir(parents=True)
        key_file.write_text(spec.key)
    size = embed_chunk_size(spec.tree)
    n_chunks = -(-len(texts) // size)
    emb = np.lib.format.open_memmap(out, mode="w+", dtype=np.float32, shape=(len(texts), embedder.dim))
    have = [c for c in range(n_chunks) if (part / f"{c:06d}.npy").is_file()]
    if have:
        say(f"encode unit {index}: reusing {len(have)} of {n_chunks} embedding chunks of an interrupted run")
    progress = Progress(f"embed unit {index}", len(texts), "units", done=sum(
        min(size, len(texts) - c * size) for c in have))
    for c in range(n_chunks):
        a, b = c * size, min((c + 1) * size, len(texts))
        path = part / f"{c:06d}.npy"
        if c in have:
            emb[a:b] = np.load(path)
            continue
        vecs = embedder.embed(texts[a:b])
        tmp = part / f"{c:06d}.tmp.npy"
        np.save(tmp, vecs)
        os.replace(tmp, path)
        emb[a:b] = vecs
        progress.advance(b - a)
        _fault("prepare-embed-chunk", c)
    emb.flush()
    del emb
    return len(have)


def load_embeddings(root: str | os.PathLike, index: int) -> np.ndarray:
    return np.load(unit_dir(root, "encode", index) / "embeddings.npy", mmap_mode="r")


# route -------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class RouteSpec:
    """What a route unit needs: the tree, the global offsets and which pack ranges are still to do."""

    root: str
    key: str
    tree: str  # path of tree.npz
    first_document: dict[int, int]  # unit -> global index of its first training document
    first_unit: dict[int, int]  # unit -> global index of its first unit
    token_dtype: str
    leaves: int
    ranges: int
    pending_ranges: frozenset[int]


def leaf_range(leaf: int, leaves: int, ranges: int) -> int:
    """The pack range of a leaf: ``ranges`` contiguous, nearly equal runs of leaves."""
    return leaf * ranges // leaves


def range_leaves(r: int, leaves: int, ranges: int) -> tuple[int, int]:
    """Leaves ``[lo, hi)`` of pack range ``r`` (the inverse of :func:`leaf_range`)."""
    lo = -(-r * leaves // ranges)
    hi = -(-(r + 1) * leaves // ranges)
    return lo, hi


_TREES: dict[str, Any] = {}


def route_unit(unit: int, spec: RouteSpec) -> Iterator[tuple[int, dict[str, Any]]]:
    """Route one unit's embeddings (or reuse its paths) and yield ``(pack range, payload)`` per leaf
    of a pending range; the last element, under range -1, is the unit's marker info."""
    from memlm.data.route_stats import RouteStats
    from memlm.retrieval import Tree, route

    if spec.tree not in _TREES:
        _TREES.clear()
        _TREES[spec.tree] = Tree.load(spec.tree)
    tree = _TREES[spec.tree]
    t0 = time.time()
    enc = unit_dir(spec.root, "encode", unit)
    info = lookup(spec.root, "route", unit, spec.key)
    reused = info is not None
    if not reused:
        d = _fresh(spec.root, "route", unit)
        emb = np.load(enc / "embeddings.npy", mmap_mode="r")
        spans = np.load(enc / "spans.npz")
        paths = np.zeros((emb.shape[0], tree.depth), np.int32)
        stats = RouteStats(tree)
        step = 65536
        for a in range(0, emb.shape[0], step):
            x = np.asarray(emb[a:a + step])
            paths[a:a + step] = route(tree, x)
            stats.add(paths[a:a + step], x, spans["doc"][a:a + step] + spec.first_document[unit])
        np.save(d / "paths.npy", paths)
        stats.save(d / "stats.npz")
        entities = None
        if (enc / "entities.json").is_file():
            entities = _entity_counts(json.loads((enc / "entities.json").read_text(encoding="utf-8")),
                                      spans["doc"], paths[:, -1])
            (d / "entities.json").write_text(json.dumps(entities), encoding="utf-8")
        info = _mark(spec.root, "route", unit, spec.key, {"units": int(emb.shape[0])}, t0)
        say(f"route unit {unit}: {emb.shape[0]} units ({emb.shape[0] / max(info['seconds'], 1e-9):.0f} units/s)")
    if spec.pending_ranges:
        yield from _payloads(unit, spec, tree.depth)
    yield -1, {"unit": unit, "reused": reused, **info}


def _entity_counts(values: list[str | None], doc: np.ndarray, leaf: np.ndarray) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = {}
    for d, lf in zip(doc.tolist(), leaf.tolist(), strict=True):
        v = values[d]
        if v is not None:
            per = out.setdefault(v, {})
            per[str(lf)] = per.get(str(lf), 0) + 1
    return out


def _payloads(unit: int, spec: RouteSpec, depth: int) -> Iterator[tuple[int, dict[str, Any]]]:
    """Per leaf of a pending pack range: this unit's members in order and where their tokens lie in
    the unit's ``tokens.bin`` (the packer reads them from there: the shuffle carries ~30 bytes a unit)."""
    enc = unit_dir(spec.root, "encode", unit)
    paths = np.load(unit_dir(spec.root, "route", unit) / "paths.npy")
    spans = np.load(enc / "spans.npz")
    offsets = np.load(enc / "doc_offsets.npy")
    from memlm.data.packing import group_by_leaf

    for lf, members in group_by_leaf(paths[:, -1], spec.leaves):
        r = leaf_range(lf, spec.leaves, spec.ranges)
        if len(members) == 0 or r not in spec.pending_ranges:
            continue
        start, stop = spans["start"][members], spans["stop"][members]
        yield r, {"leaf": lf, "unit": unit, "path": paths[members[0]].copy(),
                  "ids": members.astype(np.int64) + spec.first_unit[unit],
                  "lengths": (stop - start).astype(np.int64), "ends": spans["ends"][members].copy(),
                  "first_token": (offsets[spans["doc"][members]] + start).astype(np.int64)}


# pack --------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class PackSpec:
    root: str
    key: str
    leaves: int
    ranges: int
    seq_len: int
    records_per_shard: int
    eot_id: int
    token_bytes: int


def shard_prefix(r: int) -> str:
    return f"train-r{r:05d}"


def _member_tokens(spec: PackSpec, part: dict[str, Any]) -> np.ndarray:
    """The tokens of one payload's members, read from its unit's ``tokens.bin`` (a memmap)."""
    dtype = "<u2" if spec.token_bytes == 2 else "<u4"
    path = unit_dir(part.get("root", spec.root), "encode", int(part["unit"])) / "tokens.bin"
    if path.stat().st_size == 0:
        return np.zeros(0, dtype)
    tokens = np.memmap(path, dtype=dtype, mode="r")
    return np.concatenate([tokens[a:a + n] for a, n in zip(part["first_token"].tolist(), part["lengths"].tolist(),
                                                           strict=True)] or [np.zeros(0, dtype)])


def pack_leaf(writer: ShardWriter, lf: int, parts: list[dict[str, Any]], spec: PackSpec) -> tuple[int, int, int]:
    """Pack one leaf's payloads (in global unit order) into ``writer``; (sequences, units, tokens packed).
    ``memlm learn`` / ``forget`` re-pack a leaf without some documents with this same function."""
    from memlm.data.packing import materialize, plan_leaf

    parts = sorted(parts, key=lambda p: p.get("order", p["unit"]))  # global unit order
    ids = np.concatenate([p["ids"] for p in parts])
    lengths = np.concatenate([p["lengths"] for p in parts])
    ends = np.concatenate([p["ends"] for p in parts])
    tokens = np.concatenate([_member_tokens(spec, p) for p in parts])  # this leaf's tokens only
    starts = np.concatenate([[0], np.cumsum(lengths)])

    def unit_tokens(u: int) -> np.ndarray:
        return tokens[starts[u]:starts[u + 1]]

    plan = plan_leaf(lengths.tolist(), ends.tolist(), spec.seq_len)
    path = np.asarray(parts[0]["path"], np.int32)
    packed = 0
    for pieces in plan:
        toks, seg_lens = materialize(pieces, unit_tokens, spec.eot_id)
        writer.write(encode_sequence(toks, seg_lens, path, lf, spec.seq_len, spec.token_bytes,
                                     units=ids[[p.unit for p in pieces]], starts=[p.start for p in pieces]))
        packed += len(toks)
    return len(plan), len(ids), packed


def pack_range(r: int, payloads: list[dict[str, Any]], spec: PackSpec) -> dict[str, Any]:
    """Pack the leaves of range ``r`` from every unit's payloads into ``shards/train-rRRRRR-*``."""
    done = lookup(spec.root, "pack", r, spec.key)
    if done is not None:
        return {"range": r, "reused": True, **done}
    t0 = time.time()
    _fresh(spec.root, "pack", r)
    shard_dir = Path(spec.root) / "shards"
    shard_dir.mkdir(exist_ok=True)
    for old in shard_dir.glob(f"{shard_prefix(r)}-*"):  # a killed earlier try of this range
        old.unlink()
    lo, hi = range_leaves(r, spec.leaves, spec.ranges)
    by_leaf: dict[int, list[dict[str, Any]]] = {}
    for p in payloads:
        by_leaf.setdefault(int(p["leaf"]), []).append(p)
    leaf_sequences, leaf_units = [0] * (hi - lo), [0] * (hi - lo)
    packed = 0
    with ShardWriter(shard_dir, spec.records_per_shard, prefix=shard_prefix(r)) as writer:
        for lf in range(lo, hi):
            parts = by_leaf.get(lf, [])
            if not parts:
                continue
            leaf_sequences[lf - lo], leaf_units[lf - lo], n_tok = pack_leaf(writer, lf, parts, spec)
            packed += n_tok
        shards = writer.close()
    info = _mark(spec.root, "pack", r, spec.key,
                 {"leaves": [lo, hi], "sequences": writer.count, "shards": [f"shards/{s}" for s in shards],
                  "packed_tokens": packed, "leaf_sequences": leaf_sequences, "leaf_units": leaf_units}, t0)
    say(f"pack range {r} (leaves {lo}..{hi - 1}): {writer.count} sequences")
    return {"range": r, "reused": False, **info}
