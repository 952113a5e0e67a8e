"""The prepared data directory's manifest: what ``memlm train`` and ``memlm eval`` read, and the
report ``memlm prepare`` prints.

The manifest (version 2) records each leaf's sequences, units and documents, the tree's fit
settings and per-level statistics (node sizes, inertia and mean distance on the fit points), and
the routed units' distances to their centroids per level. Readers take every field added since
version 1 as optional, so data prepared by an older version still trains and evaluates. It holds
nothing that depends on how the work ran (engine, workers, times): one process and N workers
write the same manifest, byte for byte (``prepare_run.json`` beside it says how it ran).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from memlm.data.records import MANIFEST

MANIFEST_VERSION = 2  # 2: leaf document counts, tree fit and routing statistics, entities

__all__ = ["MANIFEST_VERSION", "build_manifest", "report"]


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
