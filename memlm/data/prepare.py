"""``memlm prepare``: corpus -> tokenizer -> embeddings -> tree -> paths -> packed shards + manifest.

Stages (each cached, see ``stages.py``; a re-run with the same inputs reuses them all):

1. ``corpus``    (a generated corpus: ``facts``, ``bios``) generate it as JSONL.
2. ``read``      count documents (empty / undecodable skipped and counted) and draw the held-out
                 split (``eval.heldout_documents``, at most a tenth of the corpus), written as
                 ``heldout.jsonl`` and never packed for training.
3. ``tokenizer`` train a byte-level BPE on the training documents, or load ``data.tokenizer``.
4. ``tokens``    tokenize the training documents into one flat token file + offsets.
5. ``embed``     embed each unit (a document, or a ``tree.embed_window``-token window of one) into
                 an ``.npy`` memmap.
6. ``tree``      fit the balanced hierarchical k-means tree.
7. ``route``     route every unit to its path ``[depth]``, counting while it routes the units and
                 distinct documents per leaf and the units' distances to their nodes' centroids.
8. ``pack``      pack the units of each leaf into ``data.seq_len``-token sequences; ArrayRecord shards.
9. ``entities``  (documents with a ``data.entity_field`` field) units per leaf of each field value,
                 ``entity_leaves.json``: what ``memlm eval`` compares a probe's routing with.
10. ``probes``   (a generated corpus) count entity mentions in the training documents; probe files with
                 frequency buckets; a histogram of mentions per entity.

The manifest (version 2) records each leaf's sequences, units and documents, the tree's fit
settings and per-level statistics (node sizes, inertia and mean distance on the fit points), and
the routed units' distances to their centroids per level. Readers take every field added since
version 1 as optional, so data prepared by an older version still trains and evaluates.

A corpus with fewer units than the tree has leaves (``tree.k ** tree.depth``) is an error naming
those keys: no smaller tree is substituted behind the user's back.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from memlm.config import validate
from memlm.data import facts as facts_mod
from memlm.data import generated
from memlm.data.packing import group_by_leaf, materialize, plan_leaf
from memlm.data.readers import Document, ReadStats, corpus_fingerprint, iter_documents
from memlm.data.records import MANIFEST, ShardWriter, encode_sequence, write_json
from memlm.data.records import VERSION as RECORD_VERSION
from memlm.data.stages import Stages, stage_key
from memlm.data.tokenizer import Tokenizer, train_bpe
from memlm.data.units import unit_spans

TOKENIZER_TRAIN_CHARS = 1_000_000_000  # the BPE sees at most this much text (the first documents)
ENCODE_BATCH = 1024
ROUTE_BATCH = 65536
MANIFEST_VERSION = 2  # 2: leaf document counts, tree fit and routing statistics, entities


class DataError(ValueError):
    """The corpus and config cannot make a prepared data directory; the message says why."""


def _progress(console):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(TextColumn("{task.description:<22}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    console=console, transient=False, disable=console.quiet)


def require_units_for_tree(corpus: str, n_units: int, tc) -> int:
    """The tree's leaf count ``k ** depth``; a clear error when there are fewer training units."""
    leaves = tc.k**tc.depth
    if n_units < leaves:
        what = "documents" if tc.embed_unit == "document" else "windows"
        raise DataError(f"corpus {corpus!r} has {n_units} training {what}, fewer than the tree's "
                        f"{leaves} leaves (tree.k = {tc.k}, tree.depth = {tc.depth}): use a larger corpus or "
                        f"lower tree.depth / tree.k")
    return leaves


def embed_dtype_key(tc) -> tuple[str, ...]:
    """The embed stage key's dtype part: empty for "auto" (so data prepared before the key existed stays
    valid; the dtype "auto" gave is recorded with the stage), else the configured dtype."""
    return () if tc.get("embed_dtype", "auto") == "auto" else (str(tc.embed_dtype),)


def _training_docs(source: str, heldout: set[int]) -> Iterator[Document]:
    """The corpus documents not held out, in corpus order (a fresh streaming pass, silent)."""
    for i, doc in enumerate(iter_documents(source, report=None)):
        if i not in heldout:
            yield doc


def _training_texts(source: str, heldout: set[int]) -> Iterator[str]:
    for doc in _training_docs(source, heldout):
        yield doc.text


def tokenizer_stage(cfg, out: Path, stages: Stages, read_key: str, training_texts, n_train: int, console):
    """The tokenizer stage: ``data.tokenizer`` loaded, or a byte-level BPE trained on the first
    training documents (``training_texts()`` streams them); returns (tokenizer, stage info)."""
    dc = cfg.data
    if dc.tokenizer:
        src = Path(dc.tokenizer)
        if not src.is_file():
            raise DataError(f"config key 'data.tokenizer' = {dc.tokenizer!r}: no such file")
        # the folder's tokenizer_config.json can change the template: the key is the loaded tokenizer's
        loaded = Tokenizer.from_file(src, cfg.model.vocab_multiple)
        tok_key = stage_key("tokenizer-file", hashlib.sha256(src.read_bytes()).hexdigest(), loaded.id,
                            sorted(loaded.config.items()), cfg.model.vocab_multiple)
    else:
        tok_key = stage_key("tokenizer-bpe", read_key, dc.tokenizer_vocab, cfg.model.vocab_multiple)
    tok_info = stages.lookup("tokenizer", tok_key)
    if tok_info is None:
        if dc.tokenizer:
            tok = loaded
        else:
            def texts() -> Iterator[str]:
                seen = 0
                for text in training_texts():
                    if seen >= TOKENIZER_TRAIN_CHARS:
                        return
                    seen += len(text)
                    bar.advance(task)
                    yield text

            with _progress(console) as bar:
                task = bar.add_task("training tokenizer", total=n_train)
                tok = train_bpe(texts(), dc.tokenizer_vocab, cfg.model.vocab_multiple, length=n_train)
        tok.save(out / "tokenizer.json")
        tok_info = stages.done("tokenizer", tok_key, {"id": tok.id, "eot_id": tok.eot_id, "eot": tok.eot,
                                                      "tokenizer_vocab": tok.raw_vocab_size,
                                                      "vocab_size": tok.vocab_size, "template": tok.template},
                                  ["tokenizer.json", "tokenizer_config.json"])
    tok = Tokenizer.from_file(out / "tokenizer.json", cfg.model.vocab_multiple)
    if tok.vocab_size > cfg.model.vocab_size:
        console.print(f"[yellow]warning[/]: the tokenizer needs a vocabulary of {tok.vocab_size} (padded), more "
                      f"than model.vocab_size = {cfg.model.vocab_size}; train with "
                      f"--config.model.vocab_size={tok.vocab_size}")
    return tok, tok_info


def generated_corpus(cfg, corpus: str, out: Path, stages: Stages, console):
    """(source to read, corpus identity for stage keys, generator module or None): a generated corpus
    (``facts``, ``bios``) is written once as JSONL under ``out/corpus``; any other is read in place."""
    dc = cfg.data
    gen = generated.module(corpus) if generated.is_generated(corpus) else None
    if gen is None:
        return corpus, stage_key("files", corpus_fingerprint(corpus)), None
    key = stage_key("corpus", gen.GENERATOR_VERSION, dc.facts_documents, dc.seed, gen.source_versions(),
                    *([corpus] if corpus != "facts" else []))
    if stages.lookup("corpus", key) is None:
        (out / "corpus").mkdir(exist_ok=True)
        with console.status(f"generating the {corpus} corpus"):
            n = generated.write_corpus(corpus, out / "corpus" / f"{corpus}.jsonl", dc.facts_documents, dc.seed)
        stages.done("corpus", key, {"documents": n, "sources": gen.source_versions()}, [f"corpus/{corpus}.jsonl"])
    return str(out / "corpus" / f"{corpus}.jsonl"), key, gen


def prepare(cfg, corpus: str | None = None, out_dir: str | os.PathLike = "data", *, console=None) -> dict[str, Any]:
    """Prepare ``corpus`` (a .jsonl / parquet file, a folder of .txt files, "facts" or "bios"; default
    ``cfg.data.corpus``) into ``out_dir`` for training; returns the manifest (also written there)."""
    from rich.console import Console

    validate(cfg)
    console = console or Console(stderr=False)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stages = Stages(out)
    corpus = str(corpus or cfg.data.corpus)
    t_start = time.time()
    tc, dc, ec = cfg.tree, cfg.data, cfg.eval

    # 1. corpus ------------------------------------------------------------------------------------
    source, corpus_id, gen = generated_corpus(cfg, corpus, out, stages, console)

    # 2. read + held-out split ---------------------------------------------------------------------
    read_key = stage_key("read", corpus_id, ec.heldout_documents, dc.seed)
    read = stages.lookup("read", read_key)
    if read is None:
        stats = ReadStats()
        with _progress(console) as bar:
            task = bar.add_task("reading corpus", total=None)
            for _ in iter_documents(source, stats, report=lambda m: console.print(f"[yellow]skipped[/] {m}")):
                bar.advance(task)
        n = stats.documents
        n_heldout = min(int(ec.heldout_documents), n // 10)
        heldout = np.sort(np.random.default_rng([dc.seed, 1]).choice(n, size=n_heldout, replace=False))
        np.save(out / "heldout_ids.npy", heldout)
        wanted = set(heldout.tolist())
        with open(out / "heldout.jsonl.tmp", "w", encoding="utf-8") as f:
            for i, doc in enumerate(iter_documents(source, report=None)):
                if i in wanted:
                    f.write(json.dumps({"text": doc.text, **doc.fields}, ensure_ascii=False) + "\n")
        os.replace(out / "heldout.jsonl.tmp", out / "heldout.jsonl")
        read = stages.done("read", read_key, {**stats.as_dict(), "heldout": n_heldout, "training": n - n_heldout},
                           ["heldout_ids.npy", "heldout.jsonl"])
    heldout_set = set(np.load(out / "heldout_ids.npy").tolist())
    n_train = int(read["training"])

    # 3. tokenizer ---------------------------------------------------------------------------------
    tok, tok_info = tokenizer_stage(cfg, out, stages, read_key, lambda: _training_texts(source, heldout_set), n_train,
                                    console)

    # 4. tokens ------------------------------------------------------------------------------------
    token_dtype = np.uint16 if tok.vocab_size <= 65536 else np.uint32
    tokens_key = stage_key("tokens", read_key, tok.id)
    tokens_info = stages.lookup("tokens", tokens_key)
    if tokens_info is None:
        offsets = np.lib.format.open_memmap(out / "doc_offsets.npy", mode="w+", dtype=np.int64, shape=(n_train + 1,))
        offsets[0] = 0
        i = 0
        with open(out / "tokens.bin", "wb") as f, _progress(console) as bar:
            task = bar.add_task("tokenizing", total=n_train)
            batch: list[str] = []

            def flush() -> None:
                nonlocal i
                for ids in tok.encode_batch(batch):
                    f.write(ids.astype(token_dtype).tobytes())
                    offsets[i + 1] = offsets[i] + len(ids)
                    i += 1
                bar.advance(task, len(batch))
                batch.clear()

            for doc in _training_docs(source, heldout_set):
                batch.append(doc.text)
                if len(batch) == ENCODE_BATCH:
                    flush()
            flush()
        if i != n_train:
            raise DataError(f"corpus {corpus!r} changed while being read ({i} training documents, expected {n_train})")
        offsets.flush()
        tokens_info = stages.done("tokens", tokens_key, {"documents": n_train, "tokens": int(offsets[-1]),
                                                         "dtype": np.dtype(token_dtype).name},
                                  ["tokens.bin", "doc_offsets.npy"])
        del offsets
    offsets = np.load(out / "doc_offsets.npy", mmap_mode="r")
    n_tokens = int(tokens_info["tokens"])
    tokens = (np.memmap(out / "tokens.bin", dtype=tokens_info["dtype"], mode="r", shape=(n_tokens,)) if n_tokens
              else np.zeros(0, tokens_info["dtype"]))

    # units: documents or windows ------------------------------------------------------------------
    unit_doc, unit_start, unit_stop, unit_ends = unit_spans(np.asarray(offsets), tc.embed_unit, tc.embed_window)
    n_units = len(unit_doc)
    leaves = require_units_for_tree(corpus, n_units, tc)

    # 5. embed -------------------------------------------------------------------------------------
    embedder = None
    unit_key = (tc.embed_unit, tc.embed_window if tc.embed_unit == "window" else None)
    embed_key = stage_key("embed", tokens_key if tc.embed_unit == "window" else read_key, unit_key, tc.embedder,
                          tc.embed_max_tokens, *embed_dtype_key(tc))
    embed_info = stages.lookup("embed", embed_key)
    if embed_info is None:
        from memlm.retrieval import get_embedder
        from memlm.retrieval.embedder import embed_dtype_of, local_embed_mesh

        embedder = get_embedder(cfg, mesh=local_embed_mesh())
        emb = np.lib.format.open_memmap(out / "embeddings.npy", mode="w+", dtype=np.float32,
                                        shape=(n_units, embedder.dim))
        chunk = max(int(tc.embed_batch) * 64, 1024)  # large calls: few part-filled batches per length bucket

        def unit_texts() -> Iterator[str]:
            if tc.embed_unit == "document":
                for doc in _training_docs(source, heldout_set):
                    yield doc.text
            else:
                for d, a, b in zip(unit_doc, unit_start, unit_stop, strict=True):
                    yield tok.decode(tokens[offsets[d] + a:offsets[d] + b])

        with _progress(console) as bar:
            task = bar.add_task(f"embedding ({embedder.name})", total=n_units)
            row, texts = 0, []
            for text in unit_texts():
                texts.append(text)
                if len(texts) == chunk:
                    emb[row:row + len(texts)] = embedder.embed(texts)
                    row += len(texts)
                    bar.advance(task, len(texts))
                    texts = []
            if texts:
                emb[row:row + len(texts)] = embedder.embed(texts)
                row += len(texts)
                bar.advance(task, len(texts))
        emb.flush()
        del emb
        embed_info = stages.done("embed", embed_key, {"units": n_units, "embedder": embedder.name,
                                                      "dim": embedder.dim, "embed_dtype": embed_dtype_of(embedder)},
                                 ["embeddings.npy"])
    embeddings = np.load(out / "embeddings.npy", mmap_mode="r")

    # 6. tree --------------------------------------------------------------------------------------
    from memlm.data.route_stats import RouteStats
    from memlm.retrieval import Tree, fit_tree, route

    tree_key = stage_key("tree", embed_key, tc.k, tc.depth, tc.kmeans_steps, tc.kmeans_batch, tc.balance_factor,
                         tc.seed, *([tc.fit_sample] if n_units > tc.fit_sample else []))
    tree_info = stages.lookup("tree", tree_key)
    if tree_info is None:
        fit_points = embeddings  # at most tree.fit_sample units, drawn as the sharded prepare draws them
        if n_units > tc.fit_sample:
            fit_points = embeddings[np.sort(np.random.default_rng([tc.seed, 7]).choice(n_units, size=tc.fit_sample,
                                                                                       replace=False))]
        with console.status(f"fitting the tree (k = {tc.k}, depth = {tc.depth}) on {len(fit_points)} of {n_units} "
                            "embeddings"):
            tree = fit_tree(fit_points, k=tc.k, depth=tc.depth, steps=tc.kmeans_steps, batch=tc.kmeans_batch,
                            balance_factor=tc.balance_factor, seed=tc.seed, embedder_name=embed_info["embedder"])
        tree.save(out / "tree.npz")
        tree_info = stages.done("tree", tree_key, {"id": tree.id}, ["tree.npz"])
    tree = Tree.load(out / "tree.npz", expect_dim=embed_info["dim"], expect_embedder=embed_info["embedder"])

    # 7. route -------------------------------------------------------------------------------------
    route_key = stage_key("route", tree_key)
    route_info = stages.lookup("route", route_key)
    if route_info is None:
        paths = np.lib.format.open_memmap(out / "paths.npy", mode="w+", dtype=np.int32, shape=(n_units, tc.depth))
        acc = RouteStats(tree)
        with _progress(console) as bar:
            task = bar.add_task("routing", total=n_units)
            for a in range(0, n_units, ROUTE_BATCH):
                b = min(a + ROUTE_BATCH, n_units)
                x = np.asarray(embeddings[a:b])
                paths[a:b] = route(tree, x)
                acc.add(paths[a:b], x, unit_doc[a:b])
                bar.advance(task, b - a)
        paths.flush()
        del paths
        route_info = stages.done("route", route_key, {"units": n_units, **acc.result()}, ["paths.npy"])
    paths = np.load(out / "paths.npy", mmap_mode="r")
    if "leaf_documents" not in route_info:  # routed by an older prepare: the statistics in one streaming pass
        acc = RouteStats(tree)
        for a in range(0, n_units, ROUTE_BATCH):
            acc.add(paths[a:a + ROUTE_BATCH], np.asarray(embeddings[a:a + ROUTE_BATCH]), unit_doc[a:a + ROUTE_BATCH])
        route_info = stages.done("route", route_key, {"units": n_units, **acc.result()}, ["paths.npy"])
        stages.status["route"]["reused"] = True  # the paths are kept; only their statistics are new

    # 8. pack --------------------------------------------------------------------------------------
    pack_key = stage_key("pack", RECORD_VERSION, route_key, tokens_key, unit_key, dc.seq_len, dc.records_per_shard)
    pack = stages.lookup("pack", pack_key)
    if pack is None:
        pack = _pack(out, tokens, offsets, (unit_doc, unit_start, unit_stop, unit_ends), paths, tok.eot_id,
                     leaves, dc.seq_len, dc.records_per_shard, 2 if token_dtype == np.uint16 else 4, console)
        stages.done("pack", pack_key, pack, pack["shards"])

    # 9. entities ---------------------------------------------------------------------------------
    entities = None
    if dc.entity_field:
        entities_key = stage_key("entities", route_key, unit_key, dc.entity_field)
        entities = stages.lookup("entities", entities_key)
        if entities is None:
            with console.status(f"counting units per leaf by document field {dc.entity_field!r}"):
                entities = _entity_leaves(out, _training_docs(source, heldout_set), dc.entity_field, unit_doc, paths,
                                          leaves)
            stages.done("entities", entities_key, entities, [entities["path"]] if entities["path"] else [])

    # 10. probes -----------------------------------------------------------------------------------
    probes = probes_stage(gen, read_key, out, stages, lambda: _training_texts(source, heldout_set), n_train, console,
                          seed=int(dc.seed))

    # manifest -------------------------------------------------------------------------------------
    manifest = build_manifest(cfg, corpus, read, n_tokens=n_tokens, pack=pack, tok_info=tok_info, tree=tree,
                              tree_info=tree_info, embed_info=embed_info, route_info=route_info, entities=entities,
                              probes=probes, stages=stages.status)
    write_json(out / MANIFEST, manifest)
    report(console, out, manifest, time.time() - t_start)
    return manifest


def probes_stage(gen, read_key: str, out: Path, stages: Stages, training_texts, n_train: int, console,
                 seed: int = 0) -> dict[str, Any] | None:
    """(A generated corpus) entity mentions counted in the training documents, probe files written
    with frequency buckets; None for any other corpus."""
    if gen is None:
        return None
    probes_key = stage_key("probes", read_key)
    probes = stages.lookup("probes", probes_key)
    if probes is None:
        ents = gen.entities(seed)
        with _progress(console) as bar:
            task = bar.add_task("counting mentions", total=n_train)

            def texts_counted() -> Iterator[str]:
                for text in training_texts():
                    bar.advance(task)
                    yield text

            counts = facts_mod.count_mentions(texts_counted(), [e.name for e in ents])
        files = facts_mod.write_probes(out / "probes", gen.probe_items(ents, counts))
        probes = {"files": {k: str(Path(v).relative_to(out)) for k, v in files.items()},
                  "mentions": counts, "histogram": facts_mod.mention_histogram(counts)}
        stages.done("probes", probes_key, probes, list(probes["files"].values()))
    console.print(facts_mod.format_histogram(probes["mentions"]), markup=False, highlight=False)
    return probes


def build_manifest(cfg, corpus: str, read: dict[str, Any], *, n_tokens: int, pack: dict[str, Any],
                   tok_info: dict[str, Any], tree, tree_info: dict[str, Any], embed_info: dict[str, Any],
                   route_info: dict[str, Any], entities: dict[str, Any] | None, probes: dict[str, Any] | None,
                   stages: dict[str, Any]) -> dict[str, Any]:
    """The prepared data's manifest (version ``MANIFEST_VERSION``), from every stage's info."""
    tc, dc = cfg.tree, cfg.data
    return {
        "version": MANIFEST_VERSION,
        "corpus": corpus,
        "documents": {k: read[k] for k in ("documents", "skipped_empty", "undecodable", "files", "heldout",
                                            "training")},
        "problems": read["problems"],
        "documents_per_shard": read.get("shards", {}),  # kept, empty and undecodable per input shard
        "tokens": {"training": n_tokens, "packed": pack["packed_tokens"], "padding": pack["padding_tokens"],
                   "fill": pack["fill"]},
        "tokenizer": {"path": "tokenizer.json", **tok_info},
        "tree": {"path": "tree.npz", "id": tree_info["id"], "k": tc.k, "depth": tc.depth,
                 "embedder": embed_info["embedder"], "dim": embed_info["dim"], "embed_unit": tc.embed_unit,
                 "embed_window": tc.embed_window if tc.embed_unit == "window" else None,
                 "embed_max_tokens": tc.embed_max_tokens, "embed_dtype": embed_info.get("embed_dtype", "float32"),
                 "units": embed_info["units"], "seed": tree.seed,
                 "fit": {**tree.fit, "levels": {str(lv): tree.stats[f"level_{lv}"] for lv in range(1, tc.depth + 1)
                                                if f"level_{lv}" in tree.stats}},
                 "routed": route_info.get("distances", {})},
        "seq_len": dc.seq_len,
        "depth": tc.depth,
        "k": tc.k,
        "sequences": pack["sequences"],
        "shards": pack["shards"],
        "leaf_histogram": {"sequences": pack["leaf_sequences"], "units": pack["leaf_units"],
                           "documents": route_info["leaf_documents"]},
        "entities": entities or {},
        "heldout": "heldout.jsonl",
        "probes": probes["files"] if probes else {},
        "mention_histogram": probes["histogram"] if probes else {},
        "stages": stages,
    }


def _entity_leaves(out: Path, docs: Iterator[Document], field: str, unit_doc: np.ndarray, paths: np.ndarray,
                   leaves: int) -> dict[str, Any]:
    """Units per leaf of each value of a document field (e.g. the entity a document is about), in one
    streaming pass over the training documents; written as ``entity_leaves.json`` when any has it."""
    counts: dict[str, dict[int, int]] = {}
    names: list[str] = []
    ids: dict[str, int] = {}

    def flush(d0: int, d1: int, value_of: np.ndarray) -> None:
        lo, hi = np.searchsorted(unit_doc, d0), np.searchsorted(unit_doc, d1 - 1, side="right")
        vid = value_of[unit_doc[lo:hi] - d0]
        key = vid * leaves + np.asarray(paths[lo:hi, -1], np.int64)
        uniq, n = np.unique(key[vid >= 0], return_counts=True)
        for kk, c in zip(uniq.tolist(), n.tolist(), strict=True):
            per = counts.setdefault(names[kk // leaves], {})
            per[kk % leaves] = per.get(kk % leaves, 0) + c

    d0, n_docs, value_of = 0, 0, np.full(ROUTE_BATCH, -1, np.int64)
    for doc in docs:
        if n_docs - d0 == ROUTE_BATCH:
            flush(d0, n_docs, value_of)
            d0, value_of = n_docs, np.full(ROUTE_BATCH, -1, np.int64)
        value = doc.fields.get(field)
        if isinstance(value, (str, int)) and not isinstance(value, bool):
            value = str(value)
            if value not in ids:
                ids[value] = len(names)
                names.append(value)
            value_of[n_docs - d0] = ids[value]
        n_docs += 1
    if n_docs > d0:
        flush(d0, n_docs, value_of)
    if not counts:
        return {"field": field, "path": None, "values": 0}
    table = {name: {str(lf): c for lf, c in sorted(counts[name].items())} for name in sorted(counts)}
    write_json(out / "entity_leaves.json", {"field": field, "leaves": table})
    return {"field": field, "path": "entity_leaves.json", "values": len(table)}


def _pack(out: Path, tokens, offsets, units, paths, eot_id: int, leaves: int, seq_len: int, per_shard: int,
          token_bytes: int, console) -> dict[str, Any]:
    """Pack every leaf's units into sequences and write the shards (old shards removed first)."""
    unit_doc, unit_start, unit_stop, unit_ends = units
    shard_dir = out / "shards"
    if shard_dir.exists():
        shutil.rmtree(shard_dir)
    leaf_sequences, leaf_units = [0] * leaves, [0] * leaves
    packed = 0
    with ShardWriter(shard_dir, per_shard) as writer, _progress(console) as bar:
        task = bar.add_task("packing", total=leaves)
        for lf, members in group_by_leaf(paths[:, -1], leaves):
            bar.advance(task)
            if len(members) == 0:
                continue
            path = np.asarray(paths[members[0]], dtype=np.int32)
            lengths = (unit_stop[members] - unit_start[members]).tolist()

            def unit_tokens(u: int, members=members) -> np.ndarray:
                m = members[u]
                base = offsets[unit_doc[m]]
                return tokens[base + unit_start[m]:base + unit_stop[m]]

            plan = plan_leaf(lengths, unit_ends[members].tolist(), seq_len)
            for pieces in plan:
                toks, seg_lens = materialize(pieces, unit_tokens, eot_id)
                units_in = members[[p.unit for p in pieces]]
                writer.write(encode_sequence(toks, seg_lens, path, lf, seq_len, token_bytes, units=units_in,
                                             starts=[p.start for p in pieces]))
                packed += len(toks)
            leaf_sequences[lf] = len(plan)
            leaf_units[lf] = len(members)
        shards = writer.close()
    n_seq = writer.count
    return {"sequences": n_seq, "shards": [f"shards/{s}" for s in shards], "packed_tokens": packed,
            "padding_tokens": n_seq * seq_len - packed, "fill": packed / max(1, n_seq * seq_len),
            "leaf_sequences": leaf_sequences, "leaf_units": leaf_units}


def report(console, out: Path, manifest: dict[str, Any], seconds: float) -> None:
    """Say where everything went, and which stages were reused."""
    from rich.table import Table

    reused = [k for k, v in manifest["stages"].items() if v["reused"]]
    d, t = manifest["documents"], manifest["tokens"]
    table = Table(title=f"memlm prepare: {out} ({seconds:.1f} s)", show_lines=False)
    table.add_column("what")
    table.add_column("where")
    rows = [
        (f"{manifest['sequences']} sequences x {manifest['seq_len']} tokens ({t['fill']:.1%} filled), "
         f"{len(manifest['shards'])} shards", str(out / "shards")),
        (f"manifest ({d['training']} training documents, {d['skipped_empty']} empty and {d['undecodable']} "
         f"undecodable skipped)", str(out / MANIFEST)),
        (f"tokenizer (vocab {manifest['tokenizer']['tokenizer_vocab']}, padded {manifest['tokenizer']['vocab_size']})",
         str(out / "tokenizer.json")),
        (f"tree {manifest['tree']['id']} (k = {manifest['k']}, depth = {manifest['depth']}, "
         f"{manifest['tree']['embedder']})", str(out / "tree.npz")),
        (f"held-out documents ({d['heldout']})", str(out / "heldout.jsonl")),
    ]
    rows += [(f"probe '{name}'", str(out / p)) for name, p in manifest["probes"].items()]
    for what, where in rows:
        table.add_row(what, where)
    console.print(table)
    if reused:
        console.print(f"reused cached stages: {', '.join(reused)}")
