"""Where memlm's dense step time goes against the naive plain-JAX step: the same step with the
paper's architecture choices turned off one by one, beside the naive step, in the same call.

    .venv/bin/python bench/step_ablate.py --naive ../shared/bench/naive_step.py

Variants (cumulative, each a config override of the dense step): the paper's block (mean-centred
LayerNorm, QK-norm, RoPE, document-masked attention) in float32 compute (the tiny preset's dtype),
then in bfloat16 (the naive step's dtype: CPUs with AMX / AVX512-BF16 run it much faster); then
RMSNorm instead of LayerNorm; then no QK-norm; then no RoPE (not a config option: the rotation
is replaced by the identity for this variant only, to attribute its cost). What is left after
the last one is memlm's own overhead; the naive step has no QK-norm, no document mask and no positional encoding at all.
Rounds are interleaved, figures are medians over rounds.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from step import run_naive, time_step  # noqa: E402

import memlm.model.anchor as anchor  # noqa: E402
from memlm.config import apply_overrides, load_config, validate  # noqa: E402
from memlm.train.metrics import device_peak_flops  # noqa: E402

VARIANTS = (
    ("memlm, float32", {"model.compute_dtype": "float32"}),
    ("memlm, bfloat16", {"model.compute_dtype": "bfloat16"}),
    ("+ RMSNorm", {"model.norm": "rmsnorm"}),
    ("+ no QK-norm", {"model.qk_norm": "False"}),
    ("+ no RoPE", {}),  # attribution only: memlm.model.anchor.rope replaced by the identity
)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=None)
    p.add_argument("--naive", required=True, help="path to naive_step.py")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--rounds", type=int, default=3)
    a = p.parse_args()
    cfgs, acc = [], {}
    for name, over in VARIANTS:
        acc.update(over)
        cfg = load_config(a.config)
        apply_overrides(cfg, dict(acc))
        cfg.train.mode = "anchor"
        cfgs.append((name, validate(cfg)))
    peak, _ = device_peak_flops()
    times: dict[str, list[float]] = {name: [] for name, _ in cfgs}
    times["naive"] = []
    for r in range(a.rounds):
        for name, cfg in cfgs:
            rope = anchor.rope
            if name == "+ no RoPE":
                anchor.rope = lambda x, tables: x
            try:
                times[name].append(1e3 * time_step(cfg, a.steps))
            finally:
                anchor.rope = rope
        times["naive"].append(run_naive(a.naive, cfgs[0][1], a.steps, peak)["dense_ms"])
        print(f"round {r + 1}: " + ", ".join(f"{k} {v[-1]:.0f} ms" for k, v in times.items()), flush=True)
    naive = float(np.median(times["naive"]))
    cfg = cfgs[0][1]
    print(f"dense step, {cfg.train.batch_size} x {cfg.data.seq_len} tokens, medians of {a.rounds} rounds")
    for name, ts in times.items():
        med = float(np.median(ts))
        print(f"  {name:<22} {med:8.1f} ms   vs naive {med / naive:.3f}")


if __name__ == "__main__":
    main()
