"""Train-step throughput: memlm's dense and memory steps, and the naive plain-JAX baseline.

Prints tokens/s, MFU, the memory / dense step-time ratio against the active-FLOP ratio
(docs/design.md §5 target: <= 1.03 x the FLOP ratio), and the same figures for
``shared/bench/naive_step.py`` run at the same sizes on the same machine, in the same call.

    python bench/step.py                                  # tiny preset, CPU-sized
    python bench/step.py --config experiments/paper_160m.py --batch 16 --naive ../shared/bench/naive_step.py

With ``--naive`` memlm computes in bfloat16 like the naive step (unless ``--set
model.compute_dtype=...`` says otherwise), so both sides run the same dtype.

Synthetic batches (random tokens, one document per row, random leaf paths) so the number is the
step alone; the loader is measured in bench/bench_loader.py.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np

from memlm.config import apply_overrides, load_config, validate
from memlm.memspec import fetched_rank
from memlm.model.accounting import accounting
from memlm.train.mesh import build_mesh
from memlm.train.metrics import device_peak_flops
from memlm.train.step import build, device_batch


def _batch(cfg, b: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    s, k, depth = cfg.data.seq_len, cfg.tree.k, cfg.tree.depth
    leaf = rng.integers(0, k**depth, b)
    paths = np.stack([leaf // k ** (depth - lv) for lv in range(1, depth + 1)], 1).astype(np.int32)
    return dict(tokens=rng.integers(0, cfg.model.vocab_size, (b, s)).astype(np.int32),
                segment_ids=np.ones((b, s), np.int32), positions=np.tile(np.arange(s, dtype=np.int32), (b, 1)),
                paths=paths, generic=np.zeros(b, bool))


def time_step(cfg, steps: int) -> float:
    """Median seconds per step after two warm-up steps."""
    fns = build(cfg, build_mesh(cfg))
    state = fns.init(0)
    batches = [device_batch(_batch(cfg, cfg.train.batch_size, i), fns.batch_shardings) for i in range(2)]
    for i in range(2):
        state, m = fns.step(state, batches[i % 2])
    jax.block_until_ready(m)
    times = []
    for i in range(steps):
        t = time.perf_counter()
        state, m = fns.step(state, batches[i % 2])
        jax.block_until_ready(m)
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def run_naive(path: str, cfg, steps: int, peak: float) -> dict:
    m = cfg.model
    k, depth = cfg.tree.k, cfg.tree.depth
    sizes = [r for r in cfg.memory.sizes[:depth]]
    nodes = ",".join(str(k ** (i + 1)) for i, r in enumerate(sizes) if r)
    mem = ",".join(str(r) for r in sizes if r)
    cmd = [sys.executable, path, "--d", str(m.d_model), "--layers", str(m.n_layers), "--heads", str(m.n_heads),
           "--ffn", str(m.d_ff), "--vocab", str(m.vocab_size), "--seq", str(cfg.data.seq_len),
           "--batch", str(cfg.train.batch_size), "--nodes", nodes, "--mem", mem, "--steps", str(steps),
           "--peak", str(peak / 1e12), "--attn", "cudnn" if jax.default_backend() == "gpu" else "xla"]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=None)
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--seq", type=int, default=None)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--naive", default=None, help="path to naive_step.py to run side by side")
    p.add_argument("--set", nargs="*", default=[], help="config overrides key=value")
    a = p.parse_args()
    cfg = load_config(a.config)
    apply_overrides(cfg, dict(kv.split("=", 1) for kv in a.set))
    if a.batch:
        cfg.train.batch_size = a.batch
    if a.seq:
        cfg.data.seq_len = a.seq
    if a.naive and not any(kv.startswith("model.compute_dtype=") for kv in a.set):
        cfg.model.compute_dtype = "bfloat16"  # side by side at the naive step's dtype
    if cfg.memory.type == "none":
        cfg.memory.type = "ffn"
    cfg.memory.generic = False
    validate(cfg)
    acc = accounting(cfg)
    fl = acc["flops_per_token"]
    peak, src = device_peak_flops()
    tokens = cfg.train.batch_size * cfg.data.seq_len
    print(f"device: {jax.devices()[0].device_kind} x{jax.device_count()}  peak {peak / 1e12:.1f} TFLOP/s ({src})")
    print(f"config: {cfg.name} ({cfg.model.compute_dtype} compute)  anchor {acc['anchor_params']:,}  "
          f"fetched {acc['fetched_params']:,} "
          f"(R={fetched_rank(cfg)})  bank {acc['bank_params']:,}  batch {cfg.train.batch_size}x{cfg.data.seq_len}")
    dense = cfg.copy_and_resolve_references()
    dense.train.mode = "anchor"
    mem = cfg.copy_and_resolve_references()
    mem.train.mode = "cotrain"
    s_dense = time_step(dense, a.steps)
    s_mem = time_step(mem, a.steps)
    n = jax.device_count()
    mfu_dense = tokens * fl["anchor_train"] / s_dense / (peak * n)
    mfu_mem = tokens * (fl["anchor_train"] + fl["memory_train"]) / s_mem / (peak * n)
    ratio, flop_ratio = s_mem / s_dense, acc["flop_ratio"]
    print(f"memlm dense : {1e3 * s_dense:8.1f} ms  {tokens / s_dense:10,.0f} tok/s  MFU {100 * mfu_dense:5.1f}%")
    print(f"memlm memory: {1e3 * s_mem:8.1f} ms  {tokens / s_mem:10,.0f} tok/s  MFU {100 * mfu_mem:5.1f}%")
    print(f"memlm memory/dense step ratio {ratio:.3f} for a FLOP ratio of {flop_ratio:.3f} "
          f"(overhead {ratio / flop_ratio:.3f} x the FLOP ratio)")
    result = {"device": jax.devices()[0].device_kind, "config": cfg.name, "dense_ms": 1e3 * s_dense,
              "memory_ms": 1e3 * s_mem, "dense_mfu": mfu_dense, "memory_mfu": mfu_mem, "ratio": ratio,
              "flop_ratio": flop_ratio}
    if a.naive:
        naive = run_naive(a.naive, cfg, a.steps, peak)
        print(f"naive dense : {naive['dense_ms']:8.1f} ms  MFU {100 * naive['dense_mfu']:5.1f}%   "
              f"memory: {naive['mem_ms']:8.1f} ms  ratio {naive['ratio']:.3f} (FLOP ratio {naive['flop_ratio']:.3f})")
        print(f"memlm / naive step time: dense {1e3 * s_dense / naive['dense_ms']:.3f}, "
              f"memory {1e3 * s_mem / naive['mem_ms']:.3f}")
        result["naive"] = naive
    print(json.dumps(result))


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    main()
