"""Several processes for real: `memlm train` on 2 processes x 2 CPU devices (loopback, gloo) against
one process, a process killed in the middle of a bank save, and checkpoints restored onto another
process count. Every comparison is against an uninterrupted single-process run."""

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from memlm.train.metrics import read_metrics

pytestmark = pytest.mark.slow  # every test trains on several processes
REPO = Path(__file__).resolve().parent.parent
FLAGS = ["--config.model.d_model=32", "--config.model.n_layers=2", "--config.model.n_heads=2",
         "--config.model.head_dim=16", "--config.model.d_ff=64", "--config.train.batch_size=8",
         "--config.train.microbatch_size=4", "--config.train.log_every=1", "--config.train.checkpoint_every=3",
         "--config.train.steps=9", "--config.train.warmup_steps=2", "--config.train.memory_warmup_steps=2",
         "--config.bank.replicate_levels=0"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(devices: int, extra: dict | None = None) -> dict:
    env = dict(os.environ, PYTHONUNBUFFERED="1", JAX_PLATFORMS="cpu",
               XLA_FLAGS=f"--xla_force_host_platform_device_count={devices} {os.environ['MEMLM_TEST_XLA_FLAGS']}")
    env.update(extra or {})
    return env


def launch(args, processes=1, devices=4, extra_env=None, kill_at=None):
    """Start ``memlm train`` on ``processes`` processes sharing ``devices`` CPU devices."""
    cmd = [sys.executable, "-m", "memlm.cli", "train", *args]
    if processes == 1:
        return [subprocess.Popen(cmd, cwd=REPO, env=_env(devices, extra_env), stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT, text=True)]
    port = _free_port()
    procs = []
    for i in range(processes):
        env = dict(extra_env or {})
        if kill_at:
            env["MEMLM_KILL_AT"] = kill_at
        procs.append(subprocess.Popen(
            [*cmd, "--coordinator", f"127.0.0.1:{port}", "--num-processes", str(processes), "--process-id", str(i)],
            cwd=REPO, env=_env(devices // processes, env), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True))
    return procs


def finish(procs, timeout=600):
    outs = [p.communicate(timeout=timeout)[0] for p in procs]
    for p, out in zip(procs, outs, strict=True):
        assert p.returncode == 0, out[-3000:]
    return outs


def losses(run) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run)}


def train_args(data, run, *extra):
    return ["--data", str(data), "--workdir", str(run), *FLAGS, *extra]


def test_kill_one_process_mid_bank_save_then_resume_on_2x2_and_1x2(facts_data, tmp_path):
    """2 processes x 2 devices: process 1 is SIGKILLed while the step-6 bank version is being written.
    The step-6 version never exists; a restart of both resumes from step 3 and gives the losses of an
    uninterrupted scratch run (one process, 4 devices); the same step-3 checkpoint also continues on
    1 process x 2 devices (another process and device count). Independent runs go side by side: the
    reference beside the killed run, the two resumes together."""
    ref_run, run = tmp_path / "ref", tmp_path / "run"
    ref_procs = launch(train_args(facts_data, ref_run, "--config.train.mode=scratch"), devices=4)
    args = train_args(facts_data, run, "--config.train.mode=scratch")
    procs = launch(args, processes=2, kill_at="bank-delta-written:6:1")
    deadline = time.time() + 600
    while procs[1].poll() is None and time.time() < deadline:
        time.sleep(0.5)
    assert procs[1].returncode == -signal.SIGKILL, procs[1].communicate()[0][-2000:]
    procs[0].kill()  # its peer is gone: it would wait at the save's barrier
    for p in procs:
        p.communicate()
    import json

    from memlm.bank.store import MANIFEST_KEY

    manifest = json.loads((run / "bank" / MANIFEST_KEY).read_text())
    assert [e["version"] for e in manifest["versions"]][-1] == 1, manifest  # step 3's version, not step 6's
    assert sorted(int(p.name) for p in (run / "checkpoints").iterdir() if p.name.isdigit()) == [3]
    other = tmp_path / "one_by_2"
    shutil.copytree(run, other)

    resumes = launch(args, processes=2) + launch(train_args(facts_data, other, "--config.train.mode=scratch"),
                                                  devices=2)
    finish(ref_procs)
    reference = losses(ref_run)
    assert sorted(reference) == list(range(1, 10)) and reference[9] < reference[1]
    finish(resumes)
    got = losses(run)
    assert sorted(got) == list(range(1, 10))
    np.testing.assert_allclose([got[s] for s in range(1, 10)], [reference[s] for s in range(1, 10)], rtol=1e-5)
    got = losses(other)
    np.testing.assert_allclose([got[s] for s in range(4, 10)], [reference[s] for s in range(4, 10)], rtol=1e-5,
                               err_msg="one_by_2")


def test_cotrain_on_two_processes_equals_one_and_saves_a_bank_one_process_loads(facts_data, tmp_path):
    anchor = tmp_path / "anchor"
    finish(launch(train_args(facts_data, anchor, "--config.train.mode=anchor", "--config.train.steps=3"), devices=2))
    extra = ["--config.train.mode=cotrain", "--config.train.steps=6", "--init-from", str(anchor)]
    one, two = tmp_path / "one", tmp_path / "two"
    finish(launch(train_args(facts_data, one, *extra), devices=4) + launch(train_args(facts_data, two, *extra),
                                                                          processes=2))  # side by side
    a, b = losses(one), losses(two)
    assert sorted(a) == sorted(b) == list(range(1, 7))
    np.testing.assert_allclose([b[s] for s in a], [a[s] for s in a], rtol=1e-5)

    from state import assert_same_state, moment_names, run_state

    x, y = run_state(two), run_state(one)
    for part in ("bank", "generic"):
        for name in (n for n in y if n.startswith(f"{part}/") and n.endswith("/written")):
            assert y[name].any(), name  # every level of both memories was trained
    # The whole final state: anchor, its optimizer, every field of every node of the bank and the generic
    # memory (float32 master, both moments, counters, written flags) and the versions. Adam magnifies
    # float32 rounding on rows whose gradient is near eps (seen: 7e-6 on 1 of 131,072), hence the tolerance;
    # the moments (nu ~ 1e-8, far below any such atol) are held to it in units of each array's largest value.
    moments = moment_names(y)
    assert_same_state(x, y, exact=False, rtol=2e-4, atol=1e-5, skip=moments)
    assert_same_state(x, y, exact=False, rtol=2e-4, scaled_atol=2e-4, only=moments)


def test_a_preemption_notice_to_one_process_stops_both_at_the_same_saved_step(facts_data, tmp_path):
    run = tmp_path / "run"
    procs = launch(train_args(facts_data, run, "--config.train.mode=scratch", "--config.train.steps=400",
                              "--config.train.checkpoint_every=200"), processes=2)
    deadline = time.time() + 600
    while time.time() < deadline and not any(r["step"] >= 5 for r in read_metrics(run)):
        time.sleep(0.5)
    procs[1].send_signal(signal.SIGTERM)  # only one host gets the notice
    outs = finish(procs)
    assert "stopped at step" in outs[0]
    steps = sorted(int(p.name) for p in (run / "checkpoints").iterdir() if p.name.isdigit())
    assert len(steps) == 1 and 5 <= steps[0] < 400, steps
    assert max(r["step"] for r in read_metrics(run)) <= steps[0] + 4
