"""The sharded prepare (`memlm prepare --workers N`, Apache Beam): one worker's peak memory as the
corpus grows, and documents/s per worker for embedding and routing.

    .venv/bin/python bench/bench_prepare.py                       # 10k and 100k documents, MiniLM
    .venv/bin/python bench/bench_prepare.py --sizes 2000,20000 --embedder hash   # a quick look

Each corpus is written as gzipped jsonl shards of ``--shard-docs`` generated bios documents (so a
work unit is the same size whatever the corpus), then prepared with the tiny preset and
``--workers`` local worker processes. Every work unit's marker records its worker's peak RSS and
its time: the figures are the largest peak RSS over the encode, route and pack units, and the
median units/s of the encode (embedding) and route units. The driver's own peak (tokenizer
training, the tree fit on at most ``tree.fit_sample`` units, manifest) is printed beside it.
"""

from __future__ import annotations

import argparse
import gzip
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def write_corpus(folder: Path, n: int, shard_docs: int) -> int:
    from memlm.corpora import generated

    folder.mkdir(parents=True)
    docs = generated.module("bios").generate(n, 0)
    shard, lines = 0, []
    for d in docs:
        lines.append(json.dumps(d))
        if len(lines) == shard_docs:
            (folder / f"part-{shard:05d}.jsonl.gz").write_bytes(gzip.compress(("\n".join(lines) + "\n").encode()))
            shard, lines = shard + 1, []
    if lines:
        (folder / f"part-{shard:05d}.jsonl.gz").write_bytes(gzip.compress(("\n".join(lines) + "\n").encode()))
        shard += 1
    return shard


def markers(out: Path, stage: str) -> list[dict]:
    return [json.loads(p.read_text())["info"] for p in sorted((out / ".units" / stage).glob("*/done.json"))]


def run(size: int, args, tmp: Path) -> dict:
    corpus, out = tmp / f"corpus_{size}", tmp / f"data_{size}"
    shards = write_corpus(corpus, size, args.shard_docs)
    cmd = [sys.executable, "-m", "memlm.cli", "prepare", "--corpus", str(corpus), "--out", str(out),
           "--workers", str(args.workers), "--config", "experiments/tiny.py",
           f"--config.tree.embedder={args.embedder}", f"--config.tree.fit_sample={args.fit_sample}",
           "--config.data.entity_field="]
    t0 = time.time()
    res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if res.returncode:
        sys.exit(res.stdout[-3000:] + res.stderr[-3000:])
    wall = time.time() - t0
    enc, rte, pck = markers(out, "encode"), markers(out, "route"), markers(out, "pack")
    row = {
        "documents": size, "shards": shards, "wall_s": wall,
        "worker_peak_rss_mib": max(m["max_rss_bytes"] for m in enc + rte + pck) / 2**20,
        "encode_peak_rss_mib": max(m["max_rss_bytes"] for m in enc) / 2**20,
        "pack_peak_rss_mib": max(m["max_rss_bytes"] for m in pck) / 2**20,
        "driver_peak_rss_mib": json.loads((out / "manifest.json").read_text())["engine"]["driver_max_rss_bytes"]
        / 2**20,
        "embed_units_per_s": float(np.median([m["units"] / m["embed_seconds"] for m in enc])),
        "tokenize_docs_per_s": float(np.median([m["documents"] / m["tokenize_seconds"] for m in enc])),
        "route_units_per_s": float(np.median([m["units"] / m["seconds"] for m in rte])),
    }
    shutil.rmtree(corpus)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="10000,100000")
    ap.add_argument("--shard-docs", type=int, default=5000)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--embedder", default="minilm")
    ap.add_argument("--fit-sample", type=int, default=20000)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(dir=REPO / ".cache" if (REPO / ".cache").is_dir() else None) as tmp:
        rows = [run(int(s), args, Path(tmp)) for s in args.sizes.split(",")]
    for r in rows:
        print(json.dumps(r))
    first, last = rows[0], rows[-1]
    print(f"worker peak RSS {first['worker_peak_rss_mib']:.0f} MiB at {first['documents']} documents, "
          f"{last['worker_peak_rss_mib']:.0f} MiB at {last['documents']} "
          f"(ratio {last['worker_peak_rss_mib'] / first['worker_peak_rss_mib']:.3f} for "
          f"{last['documents'] / first['documents']:.0f}x the corpus)")
    print(f"per worker: embed {last['embed_units_per_s']:.0f} documents/s, route {last['route_units_per_s']:.0f} "
          f"documents/s, tokenize {last['tokenize_docs_per_s']:.0f} documents/s ({args.embedder}, "
          f"{args.workers} workers)")


if __name__ == "__main__":
    main()
