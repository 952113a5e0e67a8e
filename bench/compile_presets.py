"""Compile the paper presets' train steps for their target topologies (``memlm compile``) and print
per-device memory and the largest collectives: the figures in bench/RESULTS.md.

    python bench/compile_presets.py            # TPU topologies need the memlm[tpu] extra (libtpu)

Each compile runs in its own process (``memlm compile`` fixes the device count at start-up).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RUNS = [
    ("paper_160m", "v5p:2x2x1", []),
    ("paper_410m", "v5p:2x2x1", []),
    ("paper_1b4", "v5p:2x2x2", []),
    ("paper_160m", "cpu:1", ["--config.train.microbatch_size=4"]),  # one 80 GB device
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", choices=("tpu", "cpu"), default=None, help="only the TPU or the CPU topologies")
    args = ap.parse_args()
    have_libtpu = importlib.util.find_spec("libtpu") is not None
    print("| preset | topology | mesh | batch / micro | arguments | temporaries | total | capacity | fits | "
          "largest all-gather | largest collective | compile s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for preset, topology, extra in RUNS:
        kind = "cpu" if topology.startswith("cpu:") else "tpu"
        if args.only and kind != args.only:
            continue
        if kind == "tpu" and not have_libtpu:
            print(f"| {preset} | {topology} | skipped: libtpu is not installed (pip install 'memlm[tpu]') |")
            continue
        t = time.time()
        p = subprocess.run([sys.executable, "-m", "memlm.cli", "compile", "--config", f"experiments/{preset}.py",
                            "--topology", topology, "--json", *extra], cwd=REPO, capture_output=True, text=True)
        dt = time.time() - t
        if not p.stdout.strip().startswith("{"):
            print(f"| {preset} | {topology} | - | - | - | - | - | - | no: {p.stderr.strip().splitlines()[-1][:160]} |")
            continue
        r = json.loads(p.stdout)
        pd = r["per_device"]
        gb = lambda x: "-" if x is None else f"{x / 1e9:.1f} GB"  # noqa: E731
        gathers = [c["bytes"] for c in r["collectives"] if c["op"] == "all-gather"]
        big = max(r["collectives"], key=lambda c: c["bytes"], default={"op": "-", "bytes": 0})
        mesh = "x".join(str(v) for v in r["mesh"].values())
        print(f"| {preset} | {topology} | {mesh} | {r['global_batch']} / {r['microbatch']} | {gb(pd['arguments'])} | "
              f"{gb(pd['temporaries'])} | {gb(pd['total'])} | {gb(pd['capacity'])} | {r['fits']} | "
              f"{max(gathers, default=0) / 2**20:.1f} MiB | {big['op']} {big['bytes'] / 2**20:.0f} MiB | {dt:.0f} |")


if __name__ == "__main__":
    main()
