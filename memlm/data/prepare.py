"""``memlm prepare``: corpus -> tokenizer -> embeddings -> tree -> paths -> packed shards + manifest.

One pipeline of independent, resumable work units (``units.py``: what a unit does and its
on-disk markers), run in this process or, with ``--workers N`` / pipeline options, on Apache Beam
(``engine.py``). Both engines run the same unit functions, so the output does not depend on the
engine or the worker count: one process and N workers write byte-identical shards and manifest.

1. ``corpus``   (a generated corpus: ``facts``, ``bios``) written once as JSONL.
2. ``scan``     (per work unit, a range of ``data.unit_shards`` input shards) count documents, bad
                lines and corrupt shards.
3. ``read``     (driver) the held-out draw over the global document count (``eval.heldout_documents``,
                at most a tenth of the corpus); the tokenizer is trained (or loaded) on the driver.
4. ``encode``   (per work unit) held-out documents out, tokens, units (documents or
                ``tree.embed_window``-token windows), embeddings, the entity field per document.
5. ``tree``     (driver) the balanced hierarchical k-means tree, fitted on a sample of
                ``tree.fit_sample`` units (all of them when fewer), drawn with ``tree.seed``.
6. ``route``    (per work unit) paths and statistics; per leaf a payload of the unit's members
                (global ids, lengths, document ends, token offsets: ~30 bytes a unit).
7. ``pack``     (per pack range: the payloads grouped by range) each range's leaves packed in global
                unit order into its own ArrayRecord shards.
8. ``gather``   (driver) ``heldout.jsonl``, the global ``paths.npy`` / ``doc_offsets.npy`` that routing
                diagnostics read, ``entity_leaves.json``, merged statistics.
9. ``probes``   (a generated corpus) entity mentions counted in the training documents; probe files
                with frequency buckets.

Pack ranges are ``min(leaves, work units)`` runs of leaves: a property of the corpus and the
config, never of the worker count. A finished unit or range is never redone (its marker holds its
stage key); a rerun says which it reused. The driver holds per-unit counts only (the gather stage
streams unit files into the global ones); a worker holds one work unit, or one pack range's
payloads and one leaf's tokens. A corpus with fewer units than the tree has leaves
(``tree.k ** tree.depth``) is an error naming those keys: no smaller tree is substituted.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from memlm.config import validate
from memlm.corpora import facts as facts_mod
from memlm.corpora import generated
from memlm.data import units as U
from memlm.data.engine import BeamEngine, LocalEngine, engine_for
from memlm.data.manifest import build_manifest, report
from memlm.data.readers import CorpusError, ReadOptions, ReadStats, corpus_fingerprint, corpus_shards
from memlm.data.records import MANIFEST, write_json
from memlm.data.records import VERSION as RECORD_VERSION
from memlm.data.stages import Stages, stage_key
from memlm.data.tokenizer import Tokenizer, train_bpe

TOKENIZER_TRAIN_CHARS = 1_000_000_000  # the BPE sees at most this much text (the first documents)


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



@dataclasses.dataclass
class Job:
    """One prepare: its config, output directory, stage records, console, engine and work units."""

    cfg: Any
    corpus: str
    out: Path
    stages: Stages
    console: Any
    engine: LocalEngine | BeamEngine
    plan: list[U.WorkUnit] = dataclasses.field(default_factory=list)

    @property
    def root(self) -> str:
        return str(self.out)

    def markers(self, stage: str, indices: Iterable[int], key: str) -> dict[int, dict]:
        return {i: info for i in indices if (info := U.lookup(self.root, stage, i, key)) is not None}

    def require(self, stage: str, indices: list[int], key: str) -> dict[int, dict]:
        got = self.markers(stage, indices, key)
        missing = [i for i in indices if i not in got]
        if missing:
            raise DataError(f"prepare stage {stage!r}: units {_ranges(missing)} did not finish (see the worker "
                            "output above); rerun to redo only them")
        return got

    def todo(self, stage: str, key: str) -> list[U.WorkUnit]:
        """The units of ``stage`` still to run (the reused ones are said); the stage counts as reused
        in the manifest's stage list when none is left."""
        done = self.markers(stage, range(len(self.plan)), key)
        if done:
            self.console.print(f"{stage}: reused units {_ranges(sorted(done))} ({len(done)} of {len(self.plan)})")
        self.stages.status[stage] = {"key": key, "reused": len(done) == len(self.plan)}
        return [u for u in self.plan if u.index not in done]


def _ranges(ids: list[int]) -> str:
    """[0, 1, 2, 5] -> '0-2, 5'."""
    out, i = [], 0
    while i < len(ids):
        j = i
        while j + 1 < len(ids) and ids[j + 1] == ids[j] + 1:
            j += 1
        out.append(str(ids[i]) if i == j else f"{ids[i]}-{ids[j]}")
        i = j + 1
    return ", ".join(out)


def _prefix(counts: list[int]) -> dict[int, int]:
    starts = np.concatenate([[0], np.cumsum(counts, dtype=np.int64)])[:-1]
    return {i: int(s) for i, s in enumerate(starts)}


def prepare(cfg, corpus: str | None = None, out_dir: str | os.PathLike = "data", *, workers: int | None = None,
            pipeline_options: str | Iterable[str] = (), console=None, tree_file: str | os.PathLike | None = None,
            holdout: bool = True) -> dict[str, Any]:
    """Prepare ``corpus`` (a .jsonl / parquet file, a folder of .txt files, "facts" or "bios"; default
    ``cfg.data.corpus``) into ``out_dir`` for training; returns the manifest (also written there).

    ``workers`` / ``pipeline_options``: run the units on Beam (see the module docstring); the output
    is the same as in one process. ``tree_file``: route with this fitted tree instead of fitting one
    (``memlm learn`` routes new documents with a run's tree; any corpus size is then allowed);
    ``holdout=False``: no held-out documents (every document trains)."""
    from rich.console import Console

    validate(cfg)
    engine = engine_for(workers, pipeline_options)
    t_start = time.time()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    job = Job(cfg, str(corpus or cfg.data.corpus), out, Stages(out), console or Console(), engine)
    source, corpus_id, gen = generated_corpus(cfg, job.corpus, out, job.stages, job.console)
    read, read_key, heldout, unit_docs = _scan_and_split(job, source, corpus_id, holdout)
    n_train = int(read["training"])

    def training_texts() -> Iterator[str]:
        held = set(heldout.tolist())
        g = 0
        for u in job.plan:
            for doc in U.unit_documents(u):
                if g not in held:
                    yield doc.text
                g += 1

    tok, tok_info = tokenizer_stage(cfg, out, job.stages, read_key, training_texts, n_train, job.console)
    enc, embed_key, embed_info = _encode(job, read_key, tok, heldout, unit_docs, any_size=tree_file is not None)
    if tree_file is not None:
        tree, tree_key, tree_info = _given_tree(job, Path(tree_file), embed_key, embed_info)
    else:
        tree, tree_key, tree_info = _fit_tree(job, embed_key, embed_info, [int(enc[i]["units"]) for i in enc])
    route_info, pack, entities = _route_and_pack(job, tree, tree_key, enc, tok)
    _gather(job, heldout, enc)
    probes = probes_stage(gen, read_key, out, job.stages, training_texts, n_train, job.console,
                          seed=int(cfg.data.seed))
    manifest = build_manifest(cfg, job.corpus, read, n_tokens=sum(int(enc[i]["tokens"]) for i in enc), pack=pack,
                              tok_info=tok_info, tree=tree, tree_info=tree_info, embed_info=embed_info,
                              route_info=route_info, entities=entities, probes=probes, stages=job.stages.status)
    manifest["engine"] = {"work_units": len(job.plan), "pack_ranges": len(pack["ranges"]),
                          "fit_points": int(min(embed_info["units"], int(cfg.tree.fit_sample)))}
    write_json(out / MANIFEST, manifest)
    write_json(out / "prepare_run.json", {"runner": engine.runner, "workers": engine.workers,
                                          "seconds": round(time.time() - t_start, 3),
                                          "driver_max_rss_bytes": U.max_rss()})
    report(job.console, out, manifest, time.time() - t_start)
    return manifest


def _scan_and_split(job: Job, source: str, corpus_id: str, holdout: bool = True
                    ) -> tuple[dict, str, np.ndarray, list[int]]:
    """Scan every work unit, merge the counts, draw the held-out documents."""
    cfg, console = job.cfg, job.console
    dc, ec = cfg.data, cfg.eval
    options = ReadOptions(text_field=str(dc.text_field), txt_split=str(dc.txt_split))
    job.plan = U.plan_units(corpus_shards(source, options), int(dc.unit_shards))
    plan_key = stage_key("plan", corpus_id, int(dc.unit_shards), *options.key())
    console.print(f"corpus {job.corpus!r}: {sum(len(u.shards) for u in job.plan)} shards in {len(job.plan)} work "
                  f"units, {job.engine.workers} worker(s)")
    scan_key = stage_key("scan", plan_key)
    job.engine.run_units("scan", job.todo("scan", scan_key), U.scan_unit, job.root, scan_key)
    scans = job.require("scan", list(range(len(job.plan))), scan_key)
    stats = ReadStats()
    for i in range(len(job.plan)):
        stats.merge(ReadStats(**scans[i]["stats"]))
    for msg in stats.problems:
        console.print(f"[yellow]skipped[/] {msg}")
    if stats.documents == 0:
        raise CorpusError(f"corpus {job.corpus!r} has no documents ({stats.skipped_empty} empty skipped, "
                          f"{stats.undecodable} undecodable skipped)")
    n = stats.documents
    n_heldout = min(int(ec.heldout_documents), n // 10) if holdout else 0
    heldout = np.sort(np.random.default_rng([dc.seed, 1]).choice(n, size=n_heldout, replace=False))
    read_key = stage_key("read", plan_key, ec.heldout_documents if holdout else 0, dc.seed)
    read = (job.stages.lookup("read", read_key)
            or job.stages.done("read", read_key, {**stats.as_dict(), "heldout": n_heldout, "training": n - n_heldout},
                               []))
    return read, read_key, heldout, [int(scans[i]["stats"]["documents"]) for i in range(len(job.plan))]


def _encode(job: Job, read_key: str, tok: Tokenizer, heldout: np.ndarray, unit_docs: list[int],
            any_size: bool = False) -> tuple[dict[int, dict], str, dict[str, Any]]:
    """Tokenize and embed every work unit; (unit markers, stage key, embedding info)."""
    tc, dc = job.cfg.tree, job.cfg.data
    token_dtype = "uint16" if tok.vocab_size <= 65536 else "uint32"
    unit_key = (tc.embed_unit, tc.embed_window if tc.embed_unit == "window" else None)
    embed_key = stage_key("encode", read_key, tok.id, unit_key, tc.embedder, tc.embed_max_tokens, dc.entity_field,
                          *embed_dtype_key(tc))
    spec = U.EncodeSpec(root=job.root, key=embed_key, tokenizer=str(job.out / "tokenizer.json"),
                        vocab_multiple=int(job.cfg.model.vocab_multiple), token_dtype=token_dtype,
                        tree={k: tc[k] for k in ("embedder", "embed_unit", "embed_window", "embed_batch",
                                                 "embed_max_tokens", "embed_dtype")},
                        entity_field=str(dc.entity_field), first_document=_prefix(unit_docs),
                        heldout=tuple(heldout.tolist()))
    job.engine.run_units("encode", job.todo("encode", embed_key), U.encode_unit, spec)
    enc = job.require("encode", list(range(len(job.plan))), embed_key)
    n_units = sum(int(enc[i]["units"]) for i in enc)
    if not any_size:
        require_units_for_tree(job.corpus, n_units, tc)
    dtypes = {str(enc[i].get("embed_dtype", "float32")) for i in enc}
    if len(dtypes) > 1:  # "auto" resolved differently on CPU and accelerator workers
        raise DataError(f"work units were embedded in different dtypes ({', '.join(sorted(dtypes))}): set "
                        f"tree.embed_dtype to one of them explicitly and rerun")
    info = {"units": n_units, "embedder": enc[0]["embedder"], "dim": int(enc[0]["dim"]), "embed_dtype": dtypes.pop()}
    return enc, embed_key, info


def _fit_sample(job: Job, counts: list[int], size: int, seed: int) -> np.ndarray:
    """The tree's fit points: ``size`` units drawn uniformly (all when fewer), in global order."""
    total = sum(counts)
    pick = (np.arange(total) if total <= size
            else np.sort(np.random.default_rng([seed, 7]).choice(total, size=size, replace=False)))
    starts = np.concatenate([[0], np.cumsum(counts)])
    parts = []
    for u in job.plan:
        a, b = np.searchsorted(pick, [starts[u.index], starts[u.index + 1]])
        if b > a:
            parts.append(np.asarray(U.load_embeddings(job.root, u.index)[pick[a:b] - starts[u.index]]))
    return np.concatenate(parts)


def _fit_tree(job: Job, embed_key: str, embed_info: dict[str, Any], unit_counts: list[int]):
    """The tree, fitted on a sample of the units (or reused); (tree, stage key, stage info)."""
    from memlm.retrieval import Tree, fit_tree

    tc, out = job.cfg.tree, job.out
    tree_key = stage_key("tree", embed_key, tc.k, tc.depth, tc.kmeans_steps, tc.kmeans_batch, tc.balance_factor,
                         tc.seed, tc.fit_sample)
    tree_info = job.stages.lookup("tree", tree_key)
    if tree_info is None:
        sample = _fit_sample(job, unit_counts, int(tc.fit_sample), int(tc.seed))
        with job.console.status(f"fitting the tree (k = {tc.k}, depth = {tc.depth}) on {len(sample)} of "
                                f"{embed_info['units']} units"):
            tree = fit_tree(sample, k=tc.k, depth=tc.depth, steps=tc.kmeans_steps, batch=tc.kmeans_batch,
                            balance_factor=tc.balance_factor, seed=tc.seed, embedder_name=embed_info["embedder"],
                            say=U.say)
        del sample
        tree.save(out / "tree.npz")
        tree_info = job.stages.done("tree", tree_key, {"id": tree.id}, ["tree.npz"])
    tree = Tree.load(out / "tree.npz", expect_dim=embed_info["dim"], expect_embedder=embed_info["embedder"])
    return tree, tree_key, tree_info


def _given_tree(job: Job, src: Path, embed_key: str, embed_info: dict[str, Any]):
    """A fitted tree taken as it is (copied into the data directory); (tree, stage key, stage info)."""
    import shutil

    from memlm.retrieval import Tree

    tree = Tree.load(src, expect_dim=embed_info["dim"], expect_embedder=embed_info["embedder"])
    tree_key = stage_key("tree-file", embed_key, tree.id)
    tree_info = job.stages.lookup("tree", tree_key)
    if tree_info is None:
        shutil.copyfile(src, job.out / "tree.npz")
        tree_info = job.stages.done("tree", tree_key, {"id": tree.id, "given": str(src)}, ["tree.npz"])
    return Tree.load(job.out / "tree.npz"), tree_key, tree_info


def _route_and_pack(job: Job, tree, tree_key: str, enc: dict[int, dict], tok: Tokenizer):
    """Route every unit and pack every leaf range (the finished ones reused); merge their statistics.
    Returns (route info, pack info, entity info or None)."""
    from memlm.data.route_stats import RouteStats

    cfg, root, n = job.cfg, job.root, len(job.plan)
    tc, dc = cfg.tree, cfg.data
    leaves = tc.k ** tc.depth
    token_dtype = "uint16" if tok.vocab_size <= 65536 else "uint32"
    ranges = min(leaves, n)
    unit_key = (tc.embed_unit, tc.embed_window if tc.embed_unit == "window" else None)
    route_key = stage_key("route", tree_key)
    pack_key = stage_key("pack", RECORD_VERSION, route_key, unit_key, dc.seq_len, dc.records_per_shard, ranges)
    packed = job.markers("pack", range(ranges), pack_key)
    if packed:
        job.console.print(f"pack: reused ranges {_ranges(sorted(packed))} ({len(packed)} of {ranges})")
    job.stages.status["pack"] = {"key": pack_key, "reused": len(packed) == ranges}
    routed = len(job.todo("route", route_key)) == 0
    pending = frozenset(r for r in range(ranges) if r not in packed)
    if pending or not routed:
        unit_counts = [int(enc[i]["units"]) for i in range(n)]
        route_spec = U.RouteSpec(root=root, key=route_key, tree=str(job.out / "tree.npz"),
                                 first_document=_prefix([int(enc[i]["documents"]) for i in range(n)]),
                                 first_unit=_prefix(unit_counts), token_dtype=token_dtype, leaves=leaves,
                                 ranges=ranges, pending_ranges=pending)
        pack_spec = U.PackSpec(root=root, key=pack_key, leaves=leaves, ranges=ranges, seq_len=int(dc.seq_len),
                               records_per_shard=int(dc.records_per_shard), eot_id=int(tok.eot_id),
                               token_bytes=2 if token_dtype == "uint16" else 4)
        job.engine.route_and_pack(list(range(n)), route_spec, pack_spec)
    job.require("route", list(range(n)), route_key)
    packs = job.require("pack", list(range(ranges)), pack_key)

    acc = RouteStats(tree)
    entity_counts: dict[str, dict[str, int]] = {}
    for u in job.plan:
        d = U.unit_dir(root, "route", u.index)
        acc.merge(d / "stats.npz")
        if (d / "entities.json").is_file():
            for name, per in json.loads((d / "entities.json").read_text(encoding="utf-8")).items():
                mine = entity_counts.setdefault(name, {})
                for lf, c in per.items():
                    mine[lf] = mine.get(lf, 0) + c
    route_info = {"units": sum(int(enc[i]["units"]) for i in range(n)), **acc.result()}
    pack = {"sequences": 0, "shards": [], "packed_tokens": 0, "leaf_sequences": [], "leaf_units": [],
            "ranges": list(range(ranges))}
    for r in range(ranges):
        for k in ("sequences", "packed_tokens", "shards", "leaf_sequences", "leaf_units"):
            pack[k] += packs[r][k]
    slots = pack["sequences"] * int(dc.seq_len)
    pack.update(padding_tokens=slots - pack["packed_tokens"], fill=pack["packed_tokens"] / max(1, slots))
    if not job.stages.status["route"]["reused"]:
        job.stages.done("route", route_key, route_info, [])
    if not job.stages.status["pack"]["reused"]:
        job.stages.done("pack", pack_key, pack, pack["shards"])
    return route_info, pack, _entity_leaves(job, entity_counts)


def _entity_leaves(job: Job, entity_counts: dict[str, dict[str, int]]) -> dict[str, Any] | None:
    """``entity_leaves.json``: units per leaf of each value of ``data.entity_field``."""
    field = str(job.cfg.data.entity_field)
    if not field:
        return None
    if not entity_counts:
        return {"field": field, "path": None, "values": 0}
    table = {name: dict(sorted(entity_counts[name].items(), key=lambda kv: int(kv[0])))
             for name in sorted(entity_counts)}
    write_json(job.out / "entity_leaves.json", {"field": field, "leaves": table})
    return {"field": field, "path": "entity_leaves.json", "values": len(table)}


def _gather(job: Job, heldout: np.ndarray, enc: dict[int, dict]) -> None:
    """The corpus-wide files, streamed from the units': held-out documents, paths and document offsets
    (what routing diagnostics read)."""
    out, root = job.out, job.root
    with open(out / "heldout.jsonl.tmp", "wb") as f:
        for u in job.plan:
            f.write((U.unit_dir(root, "encode", u.index) / "heldout.jsonl").read_bytes())
    os.replace(out / "heldout.jsonl.tmp", out / "heldout.jsonl")
    np.save(out / "heldout_ids.npy", heldout)
    held = [np.load(U.unit_dir(root, "encode", u.index) / "heldout_embeddings.npy") for u in job.plan]
    np.save(out / "heldout_embeddings.npy.tmp.npy", np.concatenate(held).astype(np.float32))
    os.replace(out / "heldout_embeddings.npy.tmp.npy", out / "heldout_embeddings.npy")
    n_units = sum(int(enc[i]["units"]) for i in enc)
    n_docs = sum(int(enc[i]["documents"]) for i in enc)  # training documents (held-out ones are apart)
    depth = int(job.cfg.tree.depth)
    paths = np.lib.format.open_memmap(out / "paths.npy.tmp.npy", mode="w+", dtype=np.int32, shape=(n_units, depth))
    offsets = np.lib.format.open_memmap(out / "doc_offsets.npy.tmp.npy", mode="w+", dtype=np.int64,
                                        shape=(n_docs + 1,))
    offsets[0] = 0
    row = doc = 0
    for u in job.plan:
        p = np.load(U.unit_dir(root, "route", u.index) / "paths.npy", mmap_mode="r")
        paths[row:row + len(p)] = p
        row += len(p)
        o = np.load(U.unit_dir(root, "encode", u.index) / "doc_offsets.npy")
        offsets[doc + 1:doc + len(o)] = offsets[doc] + o[1:]
        doc += len(o) - 1
    paths.flush()
    offsets.flush()
    del paths, offsets
    os.replace(out / "paths.npy.tmp.npy", out / "paths.npy")
    os.replace(out / "doc_offsets.npy.tmp.npy", out / "doc_offsets.npy")
