"""Profile memlm's train step (or the naive step) on the timeline: op times, idle time and the gaps.

    python bench/profile_step.py                          # tiny preset, 32 x 128, bfloat16, dense step
    python bench/profile_step.py --mode cotrain           # the memory step
    python bench/profile_step.py --naive ../shared/bench/naive_step.py   # the naive step, same sizes

Traces three steps with ``jax.profiler``, reads the trace back with ``jax.profiler.ProfileData``
and prints, per step: the span, the **idle** time (no op running on any thread) and the largest
gaps with the ops around them, then the ops by time (summed over threads), each with its HLO
shape and ``op_name`` from the compiled step. Summed op times alone can miss work: a dot that
XLA:CPU runs outside its fused kernels showed only as a gap (bench/RESULTS.md, 2026-12-04).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import glob
import re
import sys
import tempfile
from pathlib import Path

import jax

STEPS = 3
SKIP = ("ThunkExecutor", "ThreadpoolListener", "end:", "Slinky", "while")


def _events(trace_dir: str) -> list[tuple[int, int, str]]:
    """(start, end, name) of every XLA op event on the executor threads (not the python line)."""
    files = glob.glob(f"{trace_dir}/**/*.xplane.pb", recursive=True)
    if not files:
        raise SystemExit(f"no trace written under {trace_dir}")
    out = []
    for plane in jax.profiler.ProfileData.from_file(files[0]).planes:
        for line in plane.lines:
            if line.name == "python":
                continue
            out += [(e.start_ns, e.start_ns + e.duration_ns, e.name) for e in line.events
                    if not e.name.startswith(SKIP)]
    return sorted(out)


def _hlo_meta(hlo: str) -> dict[str, str]:
    """instruction name -> 'shape | op_name' from compiled HLO text."""
    meta = {}
    for line in hlo.splitlines():
        m = re.match(r"\s*(?:ROOT )?%?([\w.\-]+) = (\S+) \w+\(", line)
        if m:
            op = re.search(r'op_name="([^"]*)"', line)
            meta[m.group(1)] = f"{m.group(2)[:36]} | {re.sub(r'jit[(][^)]*[)]/', '', op.group(1))[-80:] if op else ''}"
    return meta


def report(trace_dir: str, hlo: str, top: int) -> None:
    """Print span, idle time, the largest gaps and the top ops of a trace of ``STEPS`` steps."""
    evs, meta = _events(trace_dir), _hlo_meta(hlo)
    gaps, end, before = [], evs[0][1], evs[0][2]
    for s, e, name in evs[1:]:
        if s > end:
            gaps.append(((s - end) / 1e6, before, name))
        if e > end:
            end, before = e, name
    span = (end - evs[0][0]) / 1e6
    idle = sum(g[0] for g in gaps)
    print(f"per step: span {span / STEPS:.1f} ms, idle {idle / STEPS:.1f} ms (no op running)")
    for ms, a, b in sorted(gaps, reverse=True)[:5]:
        print(f"  gap {ms:8.2f} ms after {a} ({meta.get(a, '?')})  before {b}")
    total = collections.Counter()
    for s, e, name in evs:
        total[name] += (e - s) / 1e6
    print(f"op time per step (summed over threads): {sum(total.values()) / STEPS:.1f} ms")
    for name, ms in total.most_common(top):
        print(f"  {ms / STEPS:8.2f} ms  {name:28s} {meta.get(name, '')}")


def _traced(run_steps, trace_dir: str) -> None:
    jax.profiler.start_trace(trace_dir)
    run_steps()
    jax.profiler.stop_trace()


def profile_memlm(a: argparse.Namespace, trace_dir: str) -> str:
    from bench.step import _batch
    from memlm.config import apply_overrides, load_config, validate
    from memlm.train.mesh import build_mesh
    from memlm.train.step import build, device_batch

    cfg = load_config(a.config)
    apply_overrides(cfg, dict(kv.split("=", 1) for kv in a.set))
    cfg.train.batch_size, cfg.data.seq_len, cfg.train.mode = a.batch, a.seq, a.mode
    if not any(kv.startswith("model.compute_dtype=") for kv in a.set):
        cfg.model.compute_dtype = "bfloat16"  # as bench/step.py beside the naive step
    if cfg.memory.type == "none":
        cfg.memory.type = "ffn"
    cfg.memory.generic = False
    validate(cfg)
    fns = build(cfg, build_mesh(cfg))
    box = {"state": fns.init(0)}
    batches = [device_batch(_batch(cfg, a.batch, i), fns.batch_shardings) for i in range(2)]

    def run(n: int) -> None:
        for i in range(n):
            box["state"], m = fns.step(box["state"], batches[i % 2])
            jax.block_until_ready(m)

    run(2)
    _traced(lambda: run(STEPS), trace_dir)
    return fns.step.lower(box["state"], batches[0]).compile().as_text()


def profile_naive(a: argparse.Namespace, trace_dir: str) -> str:
    """Run the naive step's script with its dense timing replaced by a traced loop."""
    src = Path(a.naive).read_text()
    line = "s_dense, l_dense = run_dense(args.steps)"
    if line not in src:
        raise SystemExit(f"{a.naive}: no line {line!r} to replace with the traced loop")
    traced = (f"run_dense(2)\ndef _traced_steps():\n    global params, m0, v0\n    for _i in range({STEPS}):\n"
              "        params, m0, v0, _l = dense_step(params, m0, v0, tokens, float(_i + 3))\n"
              "        jax.block_until_ready(_l)\n_profile_hook(_traced_steps)\nraise SystemExit\n")
    sys.argv = [a.naive, "--d", str(a.naive_dims[0]), "--layers", str(a.naive_dims[1]), "--heads",
                str(a.naive_dims[2]), "--ffn", str(a.naive_dims[3]), "--vocab", str(a.naive_dims[4]),
                "--seq", str(a.seq), "--batch", str(a.batch), "--steps", "2", "--peak", "1", "--attn", "xla"]
    out: dict = {}

    def hook(run_steps) -> None:
        _traced(run_steps, trace_dir)
        g = out["globals"]
        out["hlo"] = g["dense_step"].lower(g["params"], g["m0"], g["v0"], g["tokens"], 1.0).compile().as_text()

    g = {"__name__": "naive", "_profile_hook": hook}
    out["globals"] = g
    with contextlib.suppress(SystemExit):  # the replaced script ends itself after the traced loop
        exec(compile(src.replace(line, traced), a.naive, "exec"), g)
    return out["hlo"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=None)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--mode", default="anchor", help="train.mode: anchor (dense) or cotrain (memory)")
    p.add_argument("--set", nargs="*", default=[], help="config overrides key=value")
    p.add_argument("--naive", default=None, help="profile this naive_step.py instead, at the preset's sizes")
    p.add_argument("--top", type=int, default=25)
    a = p.parse_args()
    trace_dir = tempfile.mkdtemp(prefix="memlm_profile_")
    if a.naive:
        from memlm.config import load_config

        m = load_config(a.config).model
        a.naive_dims = (m.d_model, m.n_layers, m.n_heads, m.d_ff, m.vocab_size)
        hlo = profile_naive(a, trace_dir)
    else:
        hlo = profile_memlm(a, trace_dir)
    report(trace_dir, hlo, a.top)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    main()
