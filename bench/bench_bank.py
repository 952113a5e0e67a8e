"""Bank benchmarks: device gather and sparse row-wise AdamW throughput, against a dense AdamW pass
over the same bank, and tensorstore save / load / path-fetch throughput.

    .venv/bin/python bench/bench_bank.py                  # every size, device and store
    .venv/bin/python bench/bench_bank.py --sizes medium --only device

Throughput is in GB/s of block bytes (parameters of the blocks fetched or updated; a sparse
update also reads and writes two fp32 moments per parameter, reported as "state traffic").
Runs on the default JAX backend (one device). Prints one line per number; the results go into
bench/RESULTS.md by hand.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))  # the single-device reference

from oracles import sparse_adamw  # noqa: E402

from memlm.bank import BankLayout, BankStore, PathFetcher, gather, init_state, leaf_paths  # noqa: E402
from memlm.config import load_config  # noqa: E402

# name: (n_layers, d_model, sizes, k, depth, dtype)
SIZES = {
    "tiny": (4, 128, (32, 32), 8, 2, "float32"),  # experiments/tiny.py: 72 nodes
    "medium": (8, 256, (64, 16), 16, 2, "float32"),  # 272 nodes, 120 MiB
    "deep": (4, 256, (64, 16, 4), 16, 3, "float32"),  # 4,368 nodes (4,096 leaves), 252 MiB
    "large": (12, 512, (128, 32, 8), 8, 3, "bfloat16"),  # 584 nodes, 252 MiB in bf16
}


def layout_for(name: str) -> BankLayout:
    n_layers, d, sizes, k, depth, dtype = SIZES[name]
    cfg = load_config()
    cfg.model.update(n_layers=n_layers, d_model=d, d_ff=4 * d, n_heads=max(1, d // 64), head_dim=64)
    cfg.memory.update(type="ffn", sizes=sizes, dtype=dtype)
    cfg.tree.update(k=k, depth=depth)
    return BankLayout.from_config(cfg)


def timed(fn, *args, repeat: int) -> float:
    """Median seconds of ``fn(*args)`` over ``repeat`` runs after one warm-up."""
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def bench_device(name: str, batch: int, repeat: int) -> None:
    layout = layout_for(name)
    state = init_state(layout, seed=0)
    rng = np.random.default_rng(0)
    paths = jnp.asarray(leaf_paths(layout, rng.integers(0, layout.k ** layout.depth, size=batch)))
    fetched_bytes = batch * layout.fetched_params() * layout.itemsize
    g = jax.jit(gather)
    t_gather = timed(g, state, paths, repeat=repeat)
    print(f"[{name}] bank {layout.bytes() / 2**20:.0f} MiB ({layout.dtype}), {batch} paths, fetched "
          f"{fetched_bytes / 2**20:.1f} MiB: gather {t_gather * 1e3:.2f} ms = "
          f"{fetched_bytes / t_gather / 1e9:.2f} GB/s")

    grads = {k: jnp.asarray(rng.normal(size=v.shape).astype(np.float32) * 1e-3) for k, v in g(state, paths).items()}
    touched = jnp.ones(batch, bool)
    step = jax.jit(lambda s, p, gr, t: sparse_adamw(s, p, gr, t, lr=1e-3, weight_decay=1e-3), donate_argnums=0)
    unique_bytes = sum(len(np.unique(np.asarray(paths[:, lv.level - 1]))) * layout.block_bytes(lv)
                       for lv in layout.levels)
    unique_params = unique_bytes // layout.itemsize
    state = step(state, paths, grads, touched)
    jax.block_until_ready(state)
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        state = step(state, paths, grads, touched)
        jax.block_until_ready(state)
        times.append(time.perf_counter() - t)
    t_update = float(np.median(times))
    traffic = unique_params * 2 * (layout.itemsize + 8)  # read + write of params, mu, nu
    print(f"[{name}] sparse AdamW on {unique_bytes / 2**20:.1f} MiB of touched blocks: {t_update * 1e3:.2f} ms = "
          f"{unique_bytes / t_update / 1e9:.2f} GB/s of blocks, {traffic / t_update / 1e9:.2f} GB/s state traffic")

    if layout.params() * 4 <= 512 << 20:  # the dense pass the design forbids, for scale
        tx = optax.adamw(1e-3, b1=0.9, b2=0.95, weight_decay=1e-3)
        dense = jax.tree.map(lambda x: x.astype(jnp.float32), state.params)
        opt = tx.init(dense)
        dense_grads = jax.tree.map(jnp.zeros_like, dense)

        @jax.jit
        def dense_step(p, o):
            u, o = tx.update(dense_grads, o, p)
            return optax.apply_updates(p, u), o

        t_dense = timed(lambda p, o: dense_step(p, o)[0], dense, opt, repeat=repeat)
        print(f"[{name}] dense AdamW over the whole bank: {t_dense * 1e3:.2f} ms "
              f"({t_dense / t_update:.1f}x the sparse update)")
    del state


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def bench_store(name: str, batch: int) -> None:
    layout = layout_for(name)
    root = Path(tempfile.mkdtemp(prefix="bench_bank_"))
    try:
        t = time.perf_counter()
        store = BankStore.create(root / "bank", layout, seed=0)
        t_create = time.perf_counter() - t
        state = store.load()
        # every block dirty and no all-zero blocks (zarr does not store chunks equal to the fill value)
        bump = jax.jit(lambda p: (p.astype(jnp.float32) + 1e-3).astype(p.dtype))
        params = jax.tree.map(bump, state.params)
        moments = jax.tree.map(lambda p: bump(p).astype(jnp.float32), params)
        state = state.replace(params=params, mu=moments, nu=moments,
                              count=jax.tree.map(lambda c: c + 1, state.count),
                              dirty=jax.tree.map(lambda d: jnp.ones_like(d), state.dirty))
        jax.block_until_ready(state)
        total = layout.params() * (layout.itemsize + 8)  # params + two fp32 moments
        t = time.perf_counter()
        _, state = store.save(state)
        t_save = time.perf_counter() - t
        store.close()
        print(f"[{name}] create (lazy) {t_create * 1e3:.0f} ms; full save of {total / 2**20:.0f} MiB state "
              f"{t_save:.2f} s = {total / t_save / 1e9:.3f} GB/s (delta + main: {2 * total / t_save / 1e9:.3f} GB/s "
              f"written); on disk after it {dir_bytes(root / 'bank') / 2**20:.0f} MiB")

        rng = np.random.default_rng(1)
        leaves = layout.k ** layout.depth
        paths = jnp.asarray(leaf_paths(layout, rng.integers(0, leaves, size=batch)))
        grads = {k: jnp.ones(v.shape, jnp.float32) * 1e-3 for k, v in gather(state, paths).items()}
        state = sparse_adamw(state, paths, grads, jnp.ones(batch, bool), lr=1e-3)
        dirty = sum(int(np.asarray(d).sum()) for d in state.dirty.values())
        t = time.perf_counter()
        store.save(state)
        t_inc = time.perf_counter() - t
        print(f"[{name}] incremental save of {dirty} dirty blocks (one step of {batch} paths): {t_inc * 1e3:.0f} ms")

        t = time.perf_counter()
        reopened = BankStore.open(root / "bank", layout)
        loaded = reopened.load()
        jax.block_until_ready(loaded)
        t_load = time.perf_counter() - t
        print(f"[{name}] open + load to device: {t_load:.2f} s = {total / t_load / 1e9:.3f} GB/s")
        del loaded

        fetcher = PathFetcher(BankStore.open(root / "bank", layout), cache_levels=(1,) if layout.depth > 2 else ())
        fetched = layout.fetched_params() * layout.itemsize
        fetch_paths = leaf_paths(layout, rng.integers(0, leaves, size=20))
        fetcher.fetch(fetch_paths[0])
        t = time.perf_counter()
        for p in fetch_paths[1:]:
            fetcher.fetch(p)
        t_fetch = (time.perf_counter() - t) / (len(fetch_paths) - 1)
        print(f"[{name}] path fetch (page cache warm, level-1 cache {'on' if fetcher.cache_levels else 'off'}): "
              f"{t_fetch * 1e3:.1f} ms per path of {fetched / 2**20:.2f} MiB = {fetched / t_fetch / 1e9:.2f} GB/s")
    finally:
        shutil.rmtree(root, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default=",".join(SIZES), help=f"comma-separated, from {list(SIZES)}")
    ap.add_argument("--only", choices=("device", "store"), default=None)
    ap.add_argument("--batch", type=int, default=32, help="sequences (paths) per step")
    ap.add_argument("--repeat", type=int, default=10)
    args = ap.parse_args()
    print(f"backend {jax.default_backend()}, devices {jax.device_count()}")
    for name in args.sizes.split(","):
        if name not in SIZES:
            raise SystemExit(f"--sizes: unknown size {name!r}; choose from {list(SIZES)}")
        if args.only in (None, "device"):
            bench_device(name, args.batch, args.repeat)
        if args.only in (None, "store"):
            bench_store(name, args.batch)


if __name__ == "__main__":
    main()
