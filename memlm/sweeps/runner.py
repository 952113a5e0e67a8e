"""``memlm sweep run``: prepare once, then train (and evaluate) every run of a sweep, resumably.

Layout of ``SWEEP_DIR``::

    data/                 the prepared data (when the sweep prepares its own)
    runs/NAME/            each run's directory, exactly as ``memlm train`` writes it
    runs/NAME/sweep_done.json   the final marker: written last, after train (and eval) succeeded
    logs/NAME.log         the run's console output (appended across attempts)
    sweep.json            the expanded sweep: names, stages, overrides, upstream runs
    events.jsonl          one line per action taken (prepare, skip, train, eval, fail)

Each run goes through the same code path as the command line: ``memlm train`` (then ``memlm
eval``) in a subprocess, one after another or ``--parallel N`` at once, a run starting only once
its ``init_from`` run finished. A rerun skips runs that have the final marker, evaluates runs whose
training finished (a checkpoint at ``train.steps``) and restarts the others, which resume from
their newest complete checkpoint. Killing the runner stops its children too (SIGTERM: the
trainer saves a checkpoint at the next step and exits), so a later rerun continues where it stopped.

``--emit slurm|tpu`` writes job scripts into ``SWEEP_DIR/jobs`` instead of running: a SLURM array
per stage whose tasks train through ``launch/slurm_gpu.sh``, or a script that trains each run on a
TPU pod slice through ``launch/tpu_pod.sh``. Both call this runner for one run at a time, so
markers, skipping and resuming behave the same.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import ctypes
import functools
import hashlib
import json
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from memlm.sweeps.spec import RunSpec, Sweep, SweepError, data_overrides, expand, load_sweep, resolve_preset

MARKER = "sweep_done.json"
LOCK_WAIT_S = 300.0


def _write_json(path: Path, obj) -> None:
    """Atomic write: a reader (or a rerun after a kill) never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
    tmp.replace(path)


@functools.cache
def _libc() -> ctypes.CDLL | None:
    """libc, loaded in the runner once (the child between fork and exec should do as little as it can)."""
    try:
        return ctypes.CDLL("libc.so.6", use_errno=True)
    except OSError:
        return None


def _die_with_parent(parent: int) -> None:
    """In the child: SIGTERM when the runner (pid ``parent``) dies, however it dies (Linux; elsewhere a
    no-op). A runner killed between the fork and the ``prctl`` would leave an orphan that trains on
    beside the rerun's trainer (which then finds the run locked), so a child whose parent is already
    gone is stopped here, before it execs."""
    libc = _libc()
    if libc is not None:
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    if os.getppid() != parent:
        os.kill(os.getpid(), signal.SIGTERM)


def _child_setup():
    """The ``preexec_fn`` for a child of this runner (None off Linux)."""
    if not sys.platform.startswith("linux"):
        return None
    _libc()
    return functools.partial(_die_with_parent, os.getpid())


def final_step(run_dir: Path) -> int | None:
    """The newest finalised checkpoint step of a run (orbax renames a step's folder when it is complete)."""
    ck = run_dir / "checkpoints"
    if not ck.is_dir():
        return None
    steps = [int(p.name) for p in ck.iterdir() if p.name.isdigit()]
    return max(steps) if steps else None


def run_status(out: Path, spec: RunSpec) -> str:
    """``done`` (marker), ``trained`` (final checkpoint, not yet marked), ``partial`` or ``missing``."""
    run_dir = out / "runs" / spec.name
    if (run_dir / MARKER).exists():
        return "done"
    step = final_step(run_dir)
    if step is not None and step >= spec.cfg.train.steps:
        return "trained"
    return "partial" if run_dir.exists() else "missing"


class Runner:
    """Runs the expanded sweep in ``out``; ``launcher`` prefixes the train command (SLURM / TPU scripts)."""

    def __init__(self, sweep: Sweep, runs: list[RunSpec], out: Path, sweep_file: Path, parallel: int = 1,
                 launcher: list[str] | None = None, quiet: bool = False):
        self.sweep, self.runs, self.out, self.file = sweep, runs, out, sweep_file
        self.parallel = max(1, parallel)
        self.launcher = launcher
        self.quiet = quiet
        self.children: set[subprocess.Popen] = set()
        self.lock = threading.Lock()
        self.stopping = False

    # ---- output ------------------------------------------------------------------------------------
    def say(self, text: str) -> None:
        if not self.quiet:
            print(f"memlm sweep: {text}", flush=True)

    def event(self, run: str, action: str, **extra) -> None:
        line = json.dumps({"run": run, "action": action, "time": round(time.time(), 3), **extra})
        with self.lock, open(self.out / "events.jsonl", "a") as f:
            f.write(line + "\n")

    # ---- subprocesses --------------------------------------------------------------------------------
    def _call(self, cmd: list[str], log: Path) -> int:
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "a") as f:
            f.write(f"\n$ {shlex.join(cmd)}\n")
            f.flush()
            with self.lock:
                if self.stopping:
                    return 143
                p = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     preexec_fn=_child_setup())
                self.children.add(p)
            try:
                return p.wait()
            finally:
                with self.lock:
                    self.children.discard(p)

    def stop(self, signum=None, frame=None) -> None:
        """Forward a stop to the children (trainers save and exit), then exit."""
        with self.lock:
            self.stopping = True
            children = list(self.children)
        for p in children:
            with contextlib.suppress(ProcessLookupError):
                p.send_signal(signal.SIGTERM)
        for p in children:
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(timeout=120)
        raise SystemExit(128 + (signum or signal.SIGTERM))

    def memlm(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "memlm.cli", *args]

    # ---- data ----------------------------------------------------------------------------------------
    def data_dir(self) -> Path | None:
        d = self.sweep.data
        if d is None:
            return None
        if isinstance(d, str):
            return Path(d)
        return self.out / "data"

    def prepare(self) -> None:
        """Prepare the sweep's data once (the marker records what it was prepared from)."""
        d = self.sweep.data
        if not isinstance(d, dict):
            if isinstance(d, str) and not (Path(d) / "manifest.json").exists():
                raise SweepError(f"the sweep's data directory {d!r} has no manifest.json: run `memlm prepare` first")
            return
        out = self.out / "data"
        config = str(d.get("config") or self.sweep.config)
        overrides = data_overrides(self.sweep)
        corpus = str(d.get("corpus", "facts"))
        key = hashlib.sha256(json.dumps([corpus, config, overrides], sort_keys=True).encode()).hexdigest()[:16]
        marker = out / ".sweep_prepared.json"
        if marker.exists() and json.loads(marker.read_text()).get("key") == key and (out / "manifest.json").exists():
            self.say(f"data: prepared already ({out})")
            self.event("data", "skip")
            return
        cmd = self.memlm("prepare", "--corpus", corpus, "--out", str(out), "--config", resolve_preset(config),
                         *(f"--config.{k}={v}" for k, v in overrides.items()))
        self.say(f"data: preparing {corpus} -> {out}")
        t = time.time()
        if self._call(cmd, self.out / "logs" / "prepare.log") != 0:
            raise SweepError(f"memlm prepare failed: see {self.out / 'logs' / 'prepare.log'}")
        _write_json(marker, {"key": key, "seconds": round(time.time() - t, 1)})
        self.event("data", "prepare", seconds=round(time.time() - t, 1))

    # ---- one run -------------------------------------------------------------------------------------
    def _wait_for_lock(self, run_dir: Path) -> None:
        """A trainer of an earlier, killed runner may still be saving: wait for it to let go."""
        path = run_dir / ".lock"
        if not path.exists():
            return
        import fcntl

        deadline = time.time() + LOCK_WAIT_S
        with open(path, "a+") as f:
            while True:
                try:
                    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    fcntl.flock(f, fcntl.LOCK_UN)
                    return
                except BlockingIOError:
                    if time.time() > deadline:
                        raise SweepError(f"{run_dir} is still held by another trainer after {LOCK_WAIT_S:.0f} s") \
                            from None
                    time.sleep(1.0)

    def run_one(self, spec: RunSpec) -> str:
        """Train (and evaluate) one run unless its marker says it is done; returns what happened."""
        run_dir = self.out / "runs" / spec.name
        marker = run_dir / MARKER
        if marker.exists():
            done = json.loads(marker.read_text())
            if done.get("config_sha") != spec.config_sha:
                raise SweepError(f"run {spec.name!r} finished with another config than the sweep file now gives; "
                                 f"move {run_dir} away to rerun it")
            self.event(spec.name, "skip")
            return "skipped"
        log = self.out / "logs" / f"{spec.name}.log"
        timings = {}
        status = run_status(self.out, spec)
        if status != "trained":
            args = [*spec.args(), "--workdir", str(run_dir)]
            data = Path(spec.data) if spec.data else self.data_dir()
            if data is not None:
                args += ["--data", str(data)]
            if spec.init_from:
                args += ["--init-from", str(self.out / "runs" / spec.init_from)]
            cmd = [*self.launcher, *args] if self.launcher else self.memlm("train", *args)
            self._wait_for_lock(run_dir)
            self.say(f"{spec.name}: training ({'resuming' if status == 'partial' else 'new'}; log {log})")
            self.event(spec.name, "train", resume=status == "partial")
            t = time.time()
            rc = self._call(cmd, log)
            timings["train_s"] = round(time.time() - t, 1)
            if rc != 0:
                self.event(spec.name, "fail", stage="train", rc=rc)
                return f"failed (train exit {rc}; see {log})"
            step = final_step(run_dir)
            if step is None or step < spec.cfg.train.steps:  # a trainer stopped by a signal saves and exits 0
                self.event(spec.name, "stopped", step=step)
                return f"stopped at step {step} of {spec.cfg.train.steps}"
        if self.sweep.eval:
            self.say(f"{spec.name}: evaluating")
            self.event(spec.name, "eval")
            t = time.time()
            rc = self._call(self.memlm("eval", "--workdir", str(run_dir)), log)
            timings["eval_s"] = round(time.time() - t, 1)
            if rc != 0:
                self.event(spec.name, "fail", stage="eval", rc=rc)
                return f"failed (eval exit {rc}; see {log})"
        _write_json(marker, {"name": spec.name, "config_sha": spec.config_sha, "steps": spec.cfg.train.steps,
                             **timings})
        self.event(spec.name, "done", **timings)
        return "finished"

    # ---- the whole sweep -----------------------------------------------------------------------------
    def run(self) -> dict[str, str]:
        """Every run, upstream runs first; a failed run's dependents are not started."""
        self.out.mkdir(parents=True, exist_ok=True)
        self.prepare()
        results: dict[str, str] = {}
        pending = list(self.runs)
        selected = {r.name for r in self.runs}  # an upstream run outside the selection finished earlier
        t0 = time.time()
        with cf.ThreadPoolExecutor(self.parallel) as pool:
            running: dict[cf.Future, RunSpec] = {}
            while pending or running:
                for spec in list(pending):
                    if len(running) >= self.parallel:
                        break
                    up = spec.init_from if spec.init_from in selected else None
                    if up is not None and up not in results:
                        continue
                    pending.remove(spec)
                    if up is not None and results[up] not in ("skipped", "finished"):
                        results[spec.name] = f"not run (upstream {up} {results[up]})"
                        self.say(f"{spec.name}: {results[spec.name]}")
                        continue
                    running[pool.submit(self.run_one, spec)] = spec
                if not running:
                    continue
                finished, _ = cf.wait(running, return_when=cf.FIRST_COMPLETED)
                for fut in finished:
                    spec = running.pop(fut)
                    try:
                        results[spec.name] = fut.result()
                    except SweepError:
                        self.stop_quietly()
                        raise
                    n = len(results)
                    self.say(f"[{n}/{len(self.runs)}] {spec.name}: {results[spec.name]} "
                             f"({time.time() - t0:.0f} s into the sweep)")
        return results

    def stop_quietly(self) -> None:
        with contextlib.suppress(SystemExit):
            self.stop()


def write_jobs(sweep: Sweep, runs: list[RunSpec], sweep_file: Path, out: Path, kind: str) -> list[Path]:
    """SLURM array scripts (one per stage, chained by a submit script) or a TPU pod script."""
    jobs = out / "jobs"
    jobs.mkdir(parents=True, exist_ok=True)
    memlm = "${MEMLM:-.venv/bin/memlm}"
    base = f"sweep run {shlex.quote(str(sweep_file))} --out {shlex.quote(str(out))}"
    written = []
    stages = list(dict.fromkeys(r.stage for r in runs))
    if kind == "slurm":
        submit = ["#!/usr/bin/env bash", "# Submit the sweep's stages (from where they were emitted), each after the "
                  "one before it finished.", "set -euo pipefail", f"cd {shlex.quote(os.getcwd())}", "dep=\"\""]
        if isinstance(sweep.data, dict):
            submit += [f"dep=$(sbatch --parsable --job-name=memlm-{sweep.name}-prepare --wrap "
                       f"{shlex.quote(f'{memlm} {base} --prepare-only')})", "dep=\"--dependency=afterok:$dep\""]
        for i, stage in enumerate(stages):
            names = [r.name for r in runs if r.stage == stage]
            script = jobs / f"slurm_{i}_{stage}.sh"
            script.write_text("\n".join([
                "#!/usr/bin/env bash",
                f"# Stage {stage!r} of sweep {sweep.name!r}: one array task per run, trained through",
                "# launch/slurm_gpu.sh (every GPU of the task's nodes), then evaluated; submit with submit.sh.",
                f"#SBATCH --job-name=memlm-{sweep.name}-{stage}",
                f"#SBATCH --array=0-{len(names) - 1}",
                "#SBATCH --gpus-per-node=8",
                "#SBATCH --ntasks-per-node=8",
                "#SBATCH --exclusive",
                "set -euo pipefail",
                "cd \"${SLURM_SUBMIT_DIR:-.}\"",
                f"names=({' '.join(shlex.quote(n) for n in names)})",
                f"exec {memlm} {base} --only \"${{names[$SLURM_ARRAY_TASK_ID]}}\" --launcher launch/slurm_gpu.sh",
                ""]))
            script.chmod(0o755)
            written.append(script)
            submit += [f"job=$(sbatch --parsable $dep {shlex.quote(str(script))})", "dep=\"--dependency=afterok:$job\"",
                       f"echo \"stage {stage}: job $job ({len(names)} runs)\""]
        path = jobs / "submit.sh"
        path.write_text("\n".join(submit) + "\n")
        path.chmod(0o755)
        written.insert(0, path)
    elif kind == "tpu":
        lines = ["#!/usr/bin/env bash",
                 f"# Sweep {sweep.name!r} on a TPU pod slice, one run after another: TPU=NAME ZONE=ZONE {jobs}/tpu.sh",
                 "# Each run trains on every worker through launch/tpu_pod.sh; the sweep directory must be a path",
                 "# this machine and the workers share (NFS, a gcsfuse mount). Rerunning skips finished runs.",
                 "set -euo pipefail", ": \"${TPU:?set TPU}\" \"${ZONE:?set ZONE}\"", f"cd {shlex.quote(os.getcwd())}"]
        if isinstance(sweep.data, dict):
            lines.append(f"{memlm} {base} --prepare-only")
        lines += [f"{memlm} {base} --only {shlex.quote(r.name)} --launcher launch/tpu_pod.sh" for r in runs]
        path = jobs / "tpu.sh"
        path.write_text("\n".join(lines) + "\n")
        path.chmod(0o755)
        written.append(path)
    else:
        raise SweepError(f"--emit {kind!r}: choose slurm or tpu")
    return written


def sweep_record(sweep: Sweep, runs: list[RunSpec], sweep_file: Path) -> dict:
    """What ``sweep.json`` holds: the expansion, for collect and for humans."""
    return {"sweep": sweep.name, "file": str(sweep_file), "description": sweep.description,
            "runs": [{"name": r.name, "stage": r.stage, "config": r.config_file, "overrides": r.overrides,
                      "knobs": {k: r.overrides.get(k) for k in r.knobs}, "init_from": r.init_from,
                      "budget": r.budget, "config_sha": r.config_sha} for r in runs]}


def run_sweep(sweep_file: str | Path, out: str | Path, parallel: int = 1, only: str | None = None,
              emit: str | None = None, launcher: str | None = None, prepare_only: bool = False,
              quiet: bool = False) -> dict[str, str]:
    """The ``memlm sweep run`` verb; returns run name -> what happened."""
    sweep_file, out = Path(sweep_file), Path(out)
    sweep = load_sweep(sweep_file)
    runs = expand(sweep)
    out.mkdir(parents=True, exist_ok=True)
    _write_json(out / "sweep.json", sweep_record(sweep, runs, sweep_file))
    if emit:
        written = write_jobs(sweep, runs, sweep_file, out, emit)
        for p in written:
            print(f"memlm sweep: wrote {p}")
        return {}
    selected = runs
    if only:
        wanted = [n for n in only.split(",") if n]
        unknown = [n for n in wanted if n not in {r.name for r in runs}]
        if unknown:
            raise SweepError(f"--only {','.join(unknown)}: no such run in {sweep_file} "
                             f"(runs: {', '.join(r.name for r in runs[:8])}{' ...' if len(runs) > 8 else ''})")
        selected = [r for r in runs if r.name in wanted]
        for r in selected:  # one run of a job array: its upstream run finished in an earlier job
            if r.init_from and r.init_from not in wanted and run_status(out, _by_name(runs, r.init_from)) != "done":
                raise SweepError(f"run {r.name!r} starts from {r.init_from!r}, which has not finished")
    runner = Runner(sweep, selected, out, sweep_file, parallel=parallel,
                    launcher=shlex.split(launcher) if launcher else None, quiet=quiet)
    old = {s: signal.signal(s, runner.stop) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        if prepare_only:
            runner.out.mkdir(parents=True, exist_ok=True)
            runner.prepare()
            return {}
        t = time.time()
        results = runner.run()
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    failed = {n: r for n, r in results.items() if r not in ("skipped", "finished")}
    runner.say(f"{len(results) - len(failed)} of {len(results)} runs complete in {time.time() - t:.0f} s"
               + (f"; not complete: {', '.join(failed)}" if failed else "") + f"; runs in {out / 'runs'}")
    if failed:
        raise SweepError(f"{len(failed)} run(s) did not complete: "
                         + "; ".join(f"{n}: {r}" for n, r in list(failed.items())[:4]))
    return results



def _by_name(runs: list[RunSpec], name: str) -> RunSpec:
    return next(r for r in runs if r.name == name)
