"""Loader throughput against what the tiny model's training step consumes.

    .venv/bin/python bench/bench_loader.py                    # prepares facts data (hash embedder) if needed
    .venv/bin/python bench/bench_loader.py --data /tmp/x      # an existing prepared data directory

Prints, for the tiny preset's batch (16 x 256):
- the grain iterator's batches/s and tokens/s with 1 and 2 reading threads;
- ``Loader.batch_at`` (direct random access, no prefetch);
- the tiny anchor step's tokens/s on one CPU device (measured with memlm.train, or the assumed
  20k tokens/s when --no-step);
- a joint loop (loader + step on the same cores): the share of wall time spent waiting on data.
The results go into bench/RESULTS.md by hand.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from memlm.config import load_config  # noqa: E402
from memlm.data import Loader, make_loader, prepare  # noqa: E402

ASSUMED_STEP_TOKENS_PER_S = 20_000.0


def ensure_data(cfg, data: str | None) -> str:
    if data:
        return data
    out = "/tmp/memlm_bench_loader"
    from rich.console import Console

    prepare(cfg, "facts", out, console=Console(quiet=True))  # cached after the first run
    return out


def bench_iter(data: str, cfg, threads: int, steps: int) -> float:
    loader = Loader(data, batch_size=cfg.train.batch_size, seed=0, generic_prob=1 / (cfg.tree.k + 1),
                    num_threads=threads, prefetch=cfg.data.prefetch)
    it = iter(loader)
    for _ in range(10):
        next(it)
    t = time.perf_counter()
    for _ in range(steps):
        next(it)
    return steps / (time.perf_counter() - t)


def bench_batch_at(data: str, cfg, steps: int) -> float:
    loader = Loader(data, batch_size=cfg.train.batch_size, seed=0, generic_prob=1 / (cfg.tree.k + 1))
    loader.batch_at(0)
    t = time.perf_counter()
    for s in range(steps):
        loader.batch_at(s)
    return steps / (time.perf_counter() - t)


def bench_step(data: str, cfg, steps: int) -> tuple[float, float]:
    """(step tokens/s alone, share of a joint loader+step loop spent waiting for the loader)."""
    import jax

    from memlm.train.mesh import build_mesh
    from memlm.train.step import build, device_batch

    cfg.mesh.update(data=1, fsdp=1, tensor=1)
    mesh = build_mesh(cfg)
    fns = build(cfg, mesh)
    state = fns.init(0, with_banks=True)
    loader = make_loader(cfg, data, process_index=0, process_count=1)
    batches = [device_batch(loader.batch_at(s), fns.batch_shardings) for s in range(4)]
    for i in range(3):  # compile and warm up
        state, m = fns.step(state, batches[i % 4])
    jax.block_until_ready(m)
    t = time.perf_counter()
    for i in range(steps):
        state, m = fns.step(state, batches[i % 4])
        if i % 4 == 3:
            jax.block_until_ready(m)
    jax.block_until_ready(m)
    step_tps = steps * cfg.train.batch_size * cfg.data.seq_len / (time.perf_counter() - t)

    it = iter(loader)
    wait, t = 0.0, time.perf_counter()
    for i in range(steps):
        tw = time.perf_counter()
        host = next(it)
        wait += time.perf_counter() - tw
        state, m = fns.step(state, device_batch(host, fns.batch_shardings))
        if i % 4 == 3:
            jax.block_until_ready(m)
    jax.block_until_ready(m)
    return step_tps, wait / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", help="prepared data directory (default: prepare the facts corpus in /tmp)")
    ap.add_argument("--steps", type=int, default=300, help="batches timed per loader measurement")
    ap.add_argument("--step-steps", type=int, default=40, help="training steps timed")
    ap.add_argument("--no-step", action="store_true", help="do not build the model; assume 20k tokens/s")
    args = ap.parse_args()

    cfg = load_config(None)
    cfg.tree.embedder = "hash"  # the loader's speed does not depend on which embedder routed the data
    data = ensure_data(cfg, args.data)
    tokens_per_batch = cfg.train.batch_size * cfg.data.seq_len
    print(f"data: {data}; batch {cfg.train.batch_size} x {cfg.data.seq_len} = {tokens_per_batch} tokens")
    for threads in (1, 2):
        bps = bench_iter(data, cfg, threads, args.steps)
        print(f"loader iterator, {threads} thread(s): {bps:,.0f} batches/s, {bps * tokens_per_batch:,.0f} tokens/s "
              f"({1e3 / bps:.2f} ms/batch)")
    bps = bench_batch_at(data, cfg, args.steps)
    print(f"loader batch_at (direct, no prefetch): {bps:,.0f} batches/s, {bps * tokens_per_batch:,.0f} tokens/s")
    if args.no_step:
        step_tps, wait = ASSUMED_STEP_TOKENS_PER_S, None
        print(f"tiny step: assumed {step_tps:,.0f} tokens/s")
    else:
        step_tps, wait = bench_step(data, cfg, args.step_steps)
        print(f"tiny step (mode {cfg.train.mode}, 1 CPU device): {step_tps:,.0f} tokens/s "
              f"({step_tps / tokens_per_batch:.2f} steps/s)")
        print(f"joint loop (loader + step): {100 * wait:.2f}% of wall time waiting for data")
    print(f"loader headroom (2 threads, iterator alone): {bps * tokens_per_batch / step_tps:,.1f}x the step's need")


if __name__ == "__main__":
    main()
