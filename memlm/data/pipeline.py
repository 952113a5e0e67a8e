"""``memlm prepare --workers N``: prepare as an Apache Beam pipeline over independent work units.

Why Beam: it runs the same pipeline on one machine (the DirectRunner, with N worker processes)
and on clusters (Dataflow, Flink, Spark) through runner options alone; its shuffle
(``GroupByKey``) is what grouping every unit of a leaf together needs at corpus scale; and it
installs beside the pinned jax / orbax / grain / tensorstore (it pins protobuf below 7, which they
accept). Ray Data would have meant a second cluster manager for the same job.

The flow (``units.py`` holds what each work unit does, and its on-disk markers):

1. scan     (engine, per work unit)  count documents, bad lines and corrupt shards.
2. split    (driver)  the held-out draw over the global document count, exactly as the one-process
            prepare draws it; the tokenizer is trained (or loaded) on the driver.
3. encode   (engine, per work unit)  held-out documents out, tokens, units, embeddings.
4. tree     (driver)  fitted on a sample of ``tree.fit_sample`` units (all of them when fewer),
            drawn with ``tree.seed``: the same sample gives the same tree whatever the workers.
5. route    (engine, per work unit)  paths and statistics; per leaf a payload of the unit's
            members (global ids, lengths, document ends, token offsets: ~30 bytes a unit), keyed by
            the leaf's pack range.
6. pack     (engine shuffle: payloads grouped by pack range)  each range's leaves packed in global
            unit order into its own ArrayRecord shards; a leaf's tokens are read from the units'
            ``tokens.bin`` files, one leaf at a time.
7. manifest (driver)  merged statistics, shards in leaf order, the same manifest as one process.

Pack ranges are ``min(leaves, work units)`` runs of leaves: a property of the corpus and the
config, never of the worker count, so 1 and N workers write the same records to the same shards.
A finished unit or range is never redone (its marker holds its stage key); the driver says which
it reused. The driver holds per-unit counts only, never a per-document array of the corpus; a
worker holds one work unit, or one pack range's payloads and one leaf's tokens.
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from memlm.data import units as U
from memlm.data.readers import CorpusError, ReadStats, corpus_shards, iter_shard
from memlm.data.records import MANIFEST, write_json
from memlm.data.stages import Stages, stage_key


def beam_options(workers: int, pipeline_options: str | Iterable[str] = ()):
    """Beam options: the DirectRunner with ``workers`` processes unless the flags name a runner."""
    from apache_beam.options.pipeline_options import PipelineOptions

    flags = shlex.split(pipeline_options) if isinstance(pipeline_options, str) else list(pipeline_options)
    mode = "in_memory" if workers == 1 else "multi_processing"
    return PipelineOptions(flags=flags, direct_num_workers=workers, direct_running_mode=mode,
                           default_sdk_harness_log_level="WARNING")


def _quiet_beam() -> None:
    for name in ("apache_beam", "root"):
        logging.getLogger(name).setLevel(logging.ERROR)


def _run_units(options, label: str, elements: list, fn: Callable, *args) -> None:
    """One Beam pipeline applying ``fn(element, *args)`` to every element on the workers."""
    import apache_beam as beam

    if not elements:
        return
    with beam.Pipeline(options=options) as p:
        _ = (p | f"{label} units" >> beam.Create(elements) | f"{label} spread" >> beam.Reshuffle()
             | f"{label}" >> beam.Map(fn, *args))


def _route_and_pack(options, units: list[int], route_spec: U.RouteSpec, pack_spec: U.PackSpec) -> None:
    """Route every unit, shuffle the payloads by pack range, pack the pending ranges."""
    import apache_beam as beam

    with beam.Pipeline(options=options) as p:
        routed = (p | "route units" >> beam.Create(units) | "route spread" >> beam.Reshuffle()
                  | "route" >> beam.FlatMap(U.route_unit, route_spec)
                  | "payloads" >> beam.Filter(lambda kv: kv[0] >= 0))
        pending = p | "ranges" >> beam.Create([(r, None) for r in sorted(route_spec.pending_ranges)])
        _ = ({"payloads": routed, "range": pending} | "group by range" >> beam.CoGroupByKey()
             | "pack" >> beam.Map(lambda kv, spec: U.pack_range(kv[0], list(kv[1]["payloads"]), spec), pack_spec))


def _split(plan: list[U.WorkUnit], done: dict[int, dict], what: str, console) -> list[U.WorkUnit]:
    reused = sorted(done)
    if reused:
        console.print(f"{what}: reused units {_ranges(reused)} ({len(reused)} of {len(plan)})")
    return [u for u in plan if u.index not in done]


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


def _markers(root: str, stage: str, indices: Iterable[int], key: str) -> dict[int, dict]:
    return {i: info for i in indices if (info := U.lookup(root, stage, i, key)) is not None}


def _require(root: str, stage: str, indices: list[int], key: str) -> dict[int, dict]:
    got = _markers(root, stage, indices, key)
    missing = [i for i in indices if i not in got]
    if missing:
        raise RuntimeError(f"prepare stage {stage!r}: units {_ranges(missing)} did not finish (see the worker "
                           "output above); rerun to redo only them")
    return got


def _prefix(counts: list[int]) -> dict[int, int]:
    starts = np.concatenate([[0], np.cumsum(counts, dtype=np.int64)])[:-1]
    return {i: int(s) for i, s in enumerate(starts)}


def _fit_sample(root: str, plan: list[U.WorkUnit], counts: list[int], size: int, seed: int) -> np.ndarray:
    """The tree's fit points: ``size`` units drawn uniformly (all when fewer), in global order."""
    total = sum(counts)
    pick = (np.arange(total) if total <= size
            else np.sort(np.random.default_rng([seed, 7]).choice(total, size=size, replace=False)))
    starts = np.concatenate([[0], np.cumsum(counts)])
    parts = []
    for u in plan:
        a, b = np.searchsorted(pick, [starts[u.index], starts[u.index + 1]])
        if b > a:
            parts.append(np.asarray(U.load_embeddings(root, u.index)[pick[a:b] - starts[u.index]]))
    return np.concatenate(parts)


def prepare_sharded(cfg, corpus: str | None, out_dir: str | os.PathLike, *, workers: int,
                    pipeline_options: str | Iterable[str] = (), console=None) -> dict[str, Any]:
    """Prepare ``corpus`` into ``out_dir`` on the Beam pipeline (see the module docstring)."""
    from rich.console import Console

    from memlm.config import validate
    from memlm.data.prepare import (
        DataError,
        build_manifest,
        embed_dtype_key,
        generated_corpus,
        probes_stage,
        report,
        require_units_for_tree,
        tokenizer_stage,
    )

    validate(cfg)
    if workers < 1:
        raise ValueError(f"--workers {workers}: must be at least 1")
    _quiet_beam()
    console = console or Console()
    t_start = time.time()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    root = str(out)
    stages = Stages(out)
    tc, dc, ec = cfg.tree, cfg.data, cfg.eval
    options = beam_options(workers, pipeline_options)
    corpus = str(corpus or dc.corpus)
    source, corpus_id, gen = generated_corpus(cfg, corpus, out, stages, console)

    # 1. scan -------------------------------------------------------------------------------------
    plan = U.plan_units(corpus_shards(source), int(dc.unit_shards))
    plan_key = stage_key("plan", corpus_id, int(dc.unit_shards))
    console.print(f"corpus {corpus!r}: {sum(len(u.shards) for u in plan)} shards in {len(plan)} work units, "
                  f"{workers} worker(s)")
    scan_key = stage_key("scan", plan_key)
    todo = _split(plan, _markers(root, "scan", range(len(plan)), scan_key), "scan", console)
    _run_units(options, "scan", todo, U.scan_unit, root, scan_key)
    scans = _require(root, "scan", list(range(len(plan))), scan_key)
    stats = ReadStats()
    for i in range(len(plan)):
        stats.merge(ReadStats(**scans[i]["stats"]))
    for msg in stats.problems:
        console.print(f"[yellow]skipped[/] {msg}")
    if stats.documents == 0:
        raise CorpusError(f"corpus {corpus!r} has no documents ({stats.skipped_empty} empty skipped, "
                          f"{stats.undecodable} undecodable skipped)")

    # 2. held-out split and tokenizer --------------------------------------------------------------
    n = stats.documents
    n_heldout = min(int(ec.heldout_documents), n // 10)
    heldout = np.sort(np.random.default_rng([dc.seed, 1]).choice(n, size=n_heldout, replace=False))
    read_key = stage_key("read", plan_key, ec.heldout_documents, dc.seed)
    read = {**stats.as_dict(), "heldout": n_heldout, "training": n - n_heldout}
    stages.done("read", read_key, read, [])
    unit_docs = [int(scans[i]["stats"]["documents"]) for i in range(len(plan))]
    first_document = _prefix(unit_docs)

    def training_texts() -> Iterator[str]:
        held = set(heldout.tolist())
        g = 0
        for u in plan:
            s = ReadStats()
            for shard in u.shards:
                for doc in iter_shard(shard, s, report=None):
                    if g not in held:
                        yield doc.text
                    g += 1

    tok, tok_info = tokenizer_stage(cfg, out, stages, read_key, training_texts, n - n_heldout, console)
    token_dtype = "uint16" if tok.vocab_size <= 65536 else "uint32"

    # 3. encode -----------------------------------------------------------------------------------
    unit_key = (tc.embed_unit, tc.embed_window if tc.embed_unit == "window" else None)
    embed_key = stage_key("encode", read_key, tok.id, unit_key, tc.embedder, tc.embed_max_tokens, dc.entity_field,
                          *embed_dtype_key(tc))
    spec = U.EncodeSpec(root=root, key=embed_key, tokenizer=str(out / "tokenizer.json"),
                        vocab_multiple=int(cfg.model.vocab_multiple), token_dtype=token_dtype,
                        tree={k: tc[k] for k in ("embedder", "embed_unit", "embed_window", "embed_batch",
                                                 "embed_max_tokens", "embed_dtype")},
                        entity_field=str(dc.entity_field), first_document=first_document,
                        heldout=tuple(heldout.tolist()))
    todo = _split(plan, _markers(root, "encode", range(len(plan)), embed_key), "encode", console)
    _run_units(options, "encode", todo, U.encode_unit, spec)
    enc = _require(root, "encode", list(range(len(plan))), embed_key)
    unit_counts = [int(enc[i]["units"]) for i in range(len(plan))]
    n_units = sum(unit_counts)
    leaves = require_units_for_tree(corpus, n_units, tc)
    embedder_name, dim = enc[0]["embedder"], int(enc[0]["dim"])
    dtypes = {str(enc[i].get("embed_dtype", "float32")) for i in range(len(plan))}
    if len(dtypes) > 1:  # "auto" resolved differently on CPU and accelerator workers
        raise DataError(f"work units were embedded in different dtypes ({', '.join(sorted(dtypes))}): set "
                        f"tree.embed_dtype to one of them explicitly and rerun")
    embed_info = {"units": n_units, "embedder": embedder_name, "dim": dim, "embed_dtype": dtypes.pop()}

    # 4. tree on a sample --------------------------------------------------------------------------
    from memlm.retrieval import Tree, fit_tree

    tree_key = stage_key("tree", embed_key, tc.k, tc.depth, tc.kmeans_steps, tc.kmeans_batch, tc.balance_factor,
                         tc.seed, tc.fit_sample)
    tree_info = stages.lookup("tree", tree_key)
    if tree_info is None:
        sample = _fit_sample(root, plan, unit_counts, int(tc.fit_sample), int(tc.seed))
        with console.status(f"fitting the tree (k = {tc.k}, depth = {tc.depth}) on {len(sample)} of "
                            f"{n_units} units"):
            tree = fit_tree(sample, k=tc.k, depth=tc.depth, steps=tc.kmeans_steps, batch=tc.kmeans_batch,
                            balance_factor=tc.balance_factor, seed=tc.seed, embedder_name=embedder_name)
        del sample
        tree.save(out / "tree.npz")
        tree_info = stages.done("tree", tree_key, {"id": tree.id}, ["tree.npz"])
    tree = Tree.load(out / "tree.npz", expect_dim=dim, expect_embedder=embedder_name)

    # 5-6. route, shuffle by leaf range, pack -------------------------------------------------------
    from memlm.data.records import VERSION as RECORD_VERSION

    ranges = min(leaves, len(plan))
    route_key = stage_key("route", tree_key)
    pack_key = stage_key("pack", RECORD_VERSION, route_key, unit_key, dc.seq_len, dc.records_per_shard, ranges)
    packed = _markers(root, "pack", range(ranges), pack_key)
    if packed:
        console.print(f"pack: reused ranges {_ranges(sorted(packed))} ({len(packed)} of {ranges})")
    _split(plan, _markers(root, "route", range(len(plan)), route_key), "route", console)
    pending = frozenset(r for r in range(ranges) if r not in packed)
    routed_all = len(_markers(root, "route", range(len(plan)), route_key)) == len(plan)
    if pending or not routed_all:
        route_spec = U.RouteSpec(root=root, key=route_key, tree=str(out / "tree.npz"),
                                 first_document=_prefix([int(enc[i]["documents"]) for i in range(len(plan))]),
                                 first_unit=_prefix(unit_counts), token_dtype=token_dtype, leaves=leaves,
                                 ranges=ranges, pending_ranges=pending)
        pack_spec = U.PackSpec(root=root, key=pack_key, leaves=leaves, ranges=ranges, seq_len=int(dc.seq_len),
                               records_per_shard=int(dc.records_per_shard), eot_id=int(tok.eot_id),
                               token_bytes=2 if token_dtype == "uint16" else 4)
        _route_and_pack(options, list(range(len(plan))), route_spec, pack_spec)
    _require(root, "route", list(range(len(plan))), route_key)
    packs = _require(root, "pack", list(range(ranges)), pack_key)

    # 7. merge and write the manifest ----------------------------------------------------------------
    from memlm.data.route_stats import RouteStats

    acc = RouteStats(tree)
    entity_counts: dict[str, dict[str, int]] = {}
    for u in plan:
        d = U.unit_dir(root, "route", u.index)
        acc.merge(d / "stats.npz")
        if (d / "entities.json").is_file():
            for name, per in json.loads((d / "entities.json").read_text(encoding="utf-8")).items():
                mine = entity_counts.setdefault(name, {})
                for lf, c in per.items():
                    mine[lf] = mine.get(lf, 0) + c
    route_info = {"units": n_units, **acc.result()}
    stages.done("route", route_key, route_info, [])
    pack = {"sequences": 0, "shards": [], "packed_tokens": 0, "leaf_sequences": [], "leaf_units": []}
    for r in range(ranges):
        for k in ("sequences", "packed_tokens"):
            pack[k] += packs[r][k]
        for k in ("shards", "leaf_sequences", "leaf_units"):
            pack[k] += packs[r][k]
    slots = pack["sequences"] * int(dc.seq_len)
    pack.update(padding_tokens=slots - pack["packed_tokens"], fill=pack["packed_tokens"] / max(1, slots))
    stages.done("pack", pack_key, pack, pack["shards"])

    with open(out / "heldout.jsonl.tmp", "wb") as f:
        for u in plan:
            f.write((U.unit_dir(root, "encode", u.index) / "heldout.jsonl").read_bytes())
    os.replace(out / "heldout.jsonl.tmp", out / "heldout.jsonl")
    np.save(out / "heldout_ids.npy", heldout)

    entities = None
    if dc.entity_field:
        entities = {"field": str(dc.entity_field), "path": None, "values": 0}
        if entity_counts:
            table = {name: dict(sorted(entity_counts[name].items(), key=lambda kv: int(kv[0])))
                     for name in sorted(entity_counts)}
            write_json(out / "entity_leaves.json", {"field": str(dc.entity_field), "leaves": table})
            entities.update(path="entity_leaves.json", values=len(table))
    probes = probes_stage(gen, read_key, out, stages, training_texts, n - n_heldout, console, seed=int(dc.seed))
    manifest = build_manifest(cfg, corpus, read, n_tokens=sum(int(enc[i]["tokens"]) for i in range(len(plan))),
                                pack=pack, tok_info=tok_info, tree=tree, tree_info=tree_info, embed_info=embed_info,
                                route_info=route_info, entities=entities, probes=probes, stages=stages.status)
    manifest["engine"] = {"runner": "beam", "workers": workers, "work_units": len(plan), "pack_ranges": ranges,
                          "fit_points": int(min(n_units, int(tc.fit_sample))),
                          "driver_max_rss_bytes": U._max_rss()}
    write_json(out / MANIFEST, manifest)
    report(console, out, manifest, time.time() - t_start)
    return manifest
