"""Run every benchmark in bench/ at small sizes and append their figures to bench/RESULTS.md (``make bench``).

    python bench/run_all.py                      # all of them, ~10 minutes on a 2-core CPU
    python bench/run_all.py --only step,bank     # a subset, by name
    python bench/run_all.py --no-write           # print only

Each script runs in its own process (one JAX runtime each, as when run by hand) with the
repository first on PYTHONPATH. The appended section is dated and names the machine (platform,
CPU count, memory, accelerator if any) and the jax version, then gives each script's command
line, wall time and printed output verbatim. A script that fails or runs past its time limit
is recorded as such and the others still run; the exit status is non-zero if any failed.
The sizes here are for a quick health check on a small machine; the figures quoted in the
sections above come from the scripts run by hand at the sizes their docstrings give.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / "bench"
RESULTS = BENCH / "RESULTS.md"
NAIVE_STEP = REPO.parent / "shared" / "bench" / "naive_step.py"

# name: (script, arguments, time limit in seconds). Small sizes: the whole set fits ~10 minutes on 2 cores.
BENCHMARKS: dict[str, tuple[str, list[str], int]] = {
    "step": ("step.py", ["--steps", "3"], 300),
    "bank": ("bench_bank.py", ["--sizes", "tiny", "--repeat", "3"], 180),
    "loader": ("bench_loader.py", ["--steps", "100", "--step-steps", "8"], 300),
    "retrieval": ("bench_retrieval.py", ["--embed-texts", "256", "--fit-points", "50000", "--route-points",
                                         "200000", "--depth", "2"], 300),
    "compile": ("compile_presets.py", [], 300),
    "tiers": ("bench_tiers.py", ["--rank", "4", "--steps", "4"], 300),
    "prepare": ("bench_prepare.py", ["--sizes", "2000,20000", "--embedder", "hash"], 300),
    "ablate": ("step_ablate.py", ["--rounds", "1", "--steps", "3"], 400),
}


def memory_bytes() -> int | None:
    """Physical memory of this machine (Linux / macOS), or None if it cannot be read."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def machine() -> str:
    """One line: platform, CPU model and count, memory, JAX backend and devices, jax version."""
    import jax

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = memory_bytes()
    devices = jax.devices()
    return (f"{platform.system()} {platform.release()} ({platform.machine()}), {cpu}, {os.cpu_count()} CPUs, "
            f"{'?' if mem is None else f'{mem / 2**30:.0f} GiB'} memory, jax {jax.__version__}, "
            f"backend {jax.default_backend()} ({len(devices)} x {devices[0].device_kind})")


def run_one(name: str, script: str, args: list[str], limit: int, env: dict[str, str]) -> tuple[str, float, str]:
    """(status, wall seconds, output) of one benchmark script; its output is echoed as it runs."""
    cmd = [sys.executable, str(BENCH / script), *args]
    print(f"== {name}: {' '.join(cmd[1:])}", flush=True)
    t = time.perf_counter()
    lines: list[str] = []
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    timer = threading.Timer(limit, proc.kill)  # a silent hang is stopped too
    timer.start()
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line.rstrip("\n"))
            print(line, end="", flush=True)
        proc.wait()
    finally:
        timer.cancel()
    if proc.returncode == 0:
        status = "ok"
    elif time.perf_counter() - t >= limit:
        status = f"stopped at its {limit} s limit"
    else:
        status = f"failed (exit status {proc.returncode})"
    wall = time.perf_counter() - t
    # Warnings of libraries (absl, XLA) are noise in a results file; keep the script's own lines.
    kept = [ln for ln in lines if not ln.startswith(("WARNING:", "W0", "I0", "E0"))]
    if status != "ok":
        kept = lines[-40:]
    return status, wall, "\n".join(kept)


def section(results: list[tuple[str, list[str], str, float, str]], started: datetime.datetime) -> str:
    """The markdown section appended to RESULTS.md."""
    out = [f"## `make bench` ({started:%Y-%m-%d %H:%M} UTC, {machine()})", "",
           "Small sizes (bench/run_all.py); one call each, so ratios within a call are what to compare "
           "across machines and days.", ""]
    for name, cmd, status, wall, text in results:
        out += [f"### {name}: `python {' '.join(cmd)}` ({status}, {wall:.0f} s)", "", "```", text, "```", ""]
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default=None, help=f"comma-separated subset of {', '.join(BENCHMARKS)}")
    ap.add_argument("--naive", default=str(NAIVE_STEP),
                    help="naive_step.py to run beside the train step (skipped if the file is absent)")
    ap.add_argument("--results", default=str(RESULTS), help="markdown file the section is appended to")
    ap.add_argument("--no-write", action="store_true", help="print only; do not append to the results file")
    a = ap.parse_args()
    names = list(BENCHMARKS) if a.only is None else [n.strip() for n in a.only.split(",") if n.strip()]
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        raise SystemExit(f"--only: unknown benchmark {unknown[0]!r}; choose from {', '.join(BENCHMARKS)}")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH")])])
    env.setdefault("JAX_COMPILATION_CACHE_DIR", str(REPO / ".cache" / "jax"))
    started = datetime.datetime.now(datetime.UTC)
    results = []
    for name in names:
        script, args, limit = BENCHMARKS[name]
        args = list(args)
        if name in ("step", "ablate") and Path(a.naive).is_file():
            args += ["--naive", a.naive]
        elif name == "ablate":
            continue  # attributes the gap to the naive step: nothing to compare without it
        status, wall, text = run_one(name, script, args, limit, env)
        results.append((name, [f"bench/{script}", *args], status, wall, text))
    text = section(results, started)
    if not a.no_write:
        path = Path(a.results)
        old = path.read_text() if path.exists() else ""
        path.write_text(old.rstrip("\n") + "\n\n" + text)
        print(f"appended to {path}")
    failed = [r[0] for r in results if r[2] != "ok"]
    total = (datetime.datetime.now(datetime.UTC) - started).total_seconds()
    print(f"bench: {len(results) - len(failed)} of {len(results)} ran in {total:.0f} s"
          + (f"; failed: {', '.join(failed)}" if failed else ""))
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
