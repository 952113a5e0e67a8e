"""Bank tiers: the training step with the deepest level off device against the all-device bank,
in the same call, and the throughput of each tier.

    .venv/bin/python bench/bench_tiers.py                 # >= 1 GB of level-3 state on local disk
    .venv/bin/python bench/bench_tiers.py --rank 4 --steps 4   # a quick look

The bank (k = 16, depth 3: 4,096 leaves) is written whole to a tensorstore bank on local disk
first, so the streamed tier reads real bytes. Three variants run the real jitted step on the same
synthetic batches (random tokens, random leaves, a pure function of the step): ``device`` (every
level on device), ``host`` (level 3 in host memory, ``bank.device_levels=2``) and ``store`` (level 3
read from tensorstore through a bounded host cache). Each round times ``--steps`` steps of every
variant, rounds interleaved; the figures are medians over ``--rounds`` rounds. Prints one line per
number; results go into bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import jax
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from memlm.bank.device import level_placement, tier_bytes  # noqa: E402
from memlm.bank.layout import BankLayout  # noqa: E402
from memlm.bank.store import BankStore  # noqa: E402
from memlm.bank.tiers import TierManager  # noqa: E402
from memlm.config import load_config, validate  # noqa: E402
from memlm.sharding import make_mesh  # noqa: E402
from memlm.train.step import build, device_batch  # noqa: E402


def config(rank: int, cache_bytes: int, device_levels: int):
    cfg = load_config("experiments/tiny.py")
    cfg.model.update(d_model=128, n_layers=4, n_heads=2, head_dim=64, d_ff=512, vocab_size=1024)
    cfg.memory.update(type="ffn", sizes=(16, 16, rank), generic=False, dtype="float32")
    cfg.tree.update(k=16, depth=3)
    cfg.data.seq_len = 128
    cfg.train.update(mode="frozen", batch_size=16, microbatch_size=16, steps=10**6)
    cfg.bank.update(replicate_levels=0, device_levels=device_levels, host_cache_bytes=cache_bytes)
    cfg.mesh.update(data=1, fsdp=1, tensor=1)
    return validate(cfg)


def leaves_at(step: int, batch: int, leaves: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(step)
    return np.sort(rng.integers(0, leaves, batch)), np.zeros(batch, bool)


def host_batch(step: int, cfg) -> dict:
    b, t, k, depth = cfg.train.batch_size, cfg.data.seq_len, cfg.tree.k, cfg.tree.depth
    leaf, generic = leaves_at(step, b, k ** depth)
    rng = np.random.default_rng(10_000 + step)
    paths = np.stack([leaf // k ** (depth - lv) for lv in range(1, depth + 1)], 1).astype(np.int32)
    return {"tokens": rng.integers(0, cfg.model.vocab_size, (b, t)).astype(np.int32),
            "segment_ids": np.ones((b, t), np.int32), "positions": np.tile(np.arange(t, dtype=np.int32), (b, 1)),
            "paths": paths, "generic": generic}


def trained_rows(store: BankStore, level: int, nodes: np.ndarray) -> dict[str, np.ndarray]:
    """Rows as after training: the init parameters with non-zero moments (incompressible on disk)."""
    rows = store.read_fields(level, nodes)
    rng = np.random.default_rng(level)
    for name, x in rows.items():
        if name.endswith("/mu"):
            rows[name] = rng.normal(0, 1e-3, x.shape).astype(x.dtype)
        elif name.endswith("/nu"):
            rows[name] = rng.uniform(0, 1e-6, x.shape).astype(x.dtype)
    return rows


class Variant:
    """One placement of the bank, with its step and (off device) its tier manager."""

    def __init__(self, name: str, cfg, store_dir: Path, mesh):
        self.name, self.cfg = name, cfg
        self.fns = build(cfg, mesh)
        layout = self.fns.bank_layout
        self.store = BankStore.open(store_dir, layout)
        slots = {k: pl.slots for k, pl in self.fns.plan.off_device.items()}
        bank = self.store.load(mesh, replicate_levels=0, slots=slots or None)
        self.state = self.fns.init(0, with_banks=False).replace(bank=bank)
        self.tiers = None
        if slots:
            leaves = cfg.tree.k ** cfg.tree.depth
            self.tiers = TierManager(self.store, layout, self.fns.plan.levels,
                                     lambda k: self.fns.state_shardings.bank.count[k],
                                     lambda s: leaves_at(s, cfg.train.batch_size, leaves),
                                     cache_bytes=cfg.bank.host_cache_bytes)
        self.step, self.stalls = 0, []

    def run(self, n: int) -> float:
        """Median seconds per step over ``n`` steps (each step waited for)."""
        times = []
        for _ in range(n):
            t0 = time.perf_counter()
            host = host_batch(self.step, self.cfg)
            if self.tiers is not None:
                bank, host["slots"] = self.tiers.install(self.state.bank, self.step)
                self.state = self.state.replace(bank=bank)
                self.stalls.append(self.tiers.stall_s)
            self.state, metrics = self.fns.step(self.state, device_batch(host, self.fns.batch_shardings))
            if self.tiers is not None:
                self.tiers.prefetch(self.step + 1)
                self.tiers.write_back(self.state.bank)
            jax.block_until_ready(metrics["loss"])
            self.step += 1
            times.append(time.perf_counter() - t0)
        return float(np.median(times))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rank", type=int, default=16, help="level-3 block rank (16: 1.2 GB of level-3 state)")
    ap.add_argument("--steps", type=int, default=8, help="timed steps per variant per round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--cache-mb", type=int, default=256, help="host cache of the streamed variant")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="memlm-bench-tiers-"))
    try:
        cfg = config(args.rank, 0, -1)
        layout = BankLayout.from_config(cfg)
        mesh = make_mesh((1, 1, 1))
        store = BankStore.create(tmp / "bank", layout, seed=1)
        t0 = time.perf_counter()
        rows = {lv.level: (np.arange(lv.nodes), lambda n, lv=lv: trained_rows(store, lv.level, n))
                for lv in layout.levels}
        store.save_rows(rows)  # every row on disk as a trained bank has it, not the lazy init
        wrote = time.perf_counter() - t0
        on_disk = sum(f.stat().st_size for f in (tmp / "bank").rglob("*") if f.is_file())
        deep = tier_bytes(layout, level_placement(layout, mesh, 0))[-1]
        print(f"bank: {layout.params():,} params, level 3 state {deep['device_bytes'] / 1e9:.2f} GB; "
              f"{on_disk / 1e9:.2f} GB on disk, written in {wrote:.1f} s ({on_disk / wrote / 1e9:.2f} GB/s)")
        variants = [Variant("device", cfg, tmp / "bank", mesh),
                    Variant("host", config(args.rank, 0, 2), tmp / "bank", mesh),
                    Variant("store", config(args.rank, args.cache_mb << 20, 2), tmp / "bank", mesh)]
        for v in variants:
            v.run(2)  # compile and warm up
            if v.tiers is not None:
                v.stalls.clear()
                v.tiers.host["level3"].stats.clear()
            v.timed_from = v.step
        rounds = {v.name: [] for v in variants}
        for r in range(args.rounds):
            for v in variants:
                rounds[v.name].append(v.run(args.steps))
            print(f"round {r + 1}: " + ", ".join(f"{n} {rounds[n][-1] * 1e3:.1f} ms" for n in rounds), flush=True)
        base = float(np.median(rounds["device"]))
        tokens = cfg.train.batch_size * cfg.data.seq_len
        for v in variants:
            med = float(np.median(rounds[v.name]))
            ratios = [rounds["device"][i] / rounds[v.name][i] for i in range(args.rounds)]
            line = (f"{v.name:>6}: {med * 1e3:.1f} ms/step, {tokens / med:,.0f} tokens/s, speed vs all-device "
                    f"{base / med:.3f} (per round {', '.join(f'{x:.3f}' for x in ratios)})")
            if v.tiers is not None:
                m = v.tiers.metrics()
                read = m["bank/level3_store_bytes_read"] + m["bank/level3_host_bytes_read"]
                written = m["bank/level3_host_bytes_written"]
                steps = v.step - v.timed_from
                line += (f"; level 3 rows: {read / steps / 1e6:.1f} MB/step read from the {v.name} tier "
                         f"({read / steps / med / 1e6:.1f} MB/s), {written / steps / med / 1e6:.1f} MB/s written "
                         f"back; fetch stall median {np.median(v.stalls) * 1e3:.2f} ms, max "
                         f"{max(v.stalls) * 1e3:.1f} ms")
                if "bank/level3_cache_hit_rate" in m:
                    line += f", cache hit rate {m['bank/level3_cache_hit_rate']:.2f}"
            print(line, flush=True)
        host = variants[1].tiers.host["level3"]
        nodes = np.sort(np.random.default_rng(0).choice(layout.levels[-1].nodes, 1024, replace=False))
        for name, fn in (("host memory", lambda: host.get(nodes)),
                         ("tensorstore", lambda: store.read_fields(3, nodes))):
            t0 = time.perf_counter()
            got = fn()
            dt = time.perf_counter() - t0
            size = sum(x.nbytes for x in got.values())
            print(f"tier read, 1,024 random level-3 rows: {name} {size / dt / 1e9:.2f} GB/s ({size / 1e6:.0f} MB)")
        for v in variants:
            if v.tiers is not None:
                v.tiers.close()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
