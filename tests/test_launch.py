"""The launch scripts: each run in dry-run mode under a faked environment (SLURM with 2 nodes x 4 GPUs,
a TPU pod, one machine with 4 GPUs or with CPU devices), the printed commands parsed back and checked:
every accelerator used exactly once, process ids 0..N-1, one coordinator. Plus local.sh for real with a
stand-in for memlm: it waits for all processes and stops the others when one fails."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
TRAIN_ARGS = ["--data", "/shared/data", "--workdir", "/shared/runs/a b", "--config.train.steps=7"]


@pytest.fixture
def fakebin(tmp_path):
    """A folder first on PATH for stand-ins of nvidia-smi and scontrol."""
    d = tmp_path / "bin"
    d.mkdir()
    return d


def fake_tool(fakebin: Path, name: str, body: str) -> None:
    path = fakebin / name
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(0o755)


def fake_gpus(fakebin: Path, n: int) -> None:
    lines = "".join(f'echo "GPU {i}: NVIDIA H100 80GB HBM3 (UUID: GPU-{i:08d})"\n' for i in range(n))
    fake_tool(fakebin, "nvidia-smi", lines if n else "echo 'No devices were found'; exit 6\n")


def base_env(fakebin: Path, **extra: str) -> dict[str, str]:
    """The caller's environment without anything describing devices or clusters, plus ``extra``."""
    drop = ("XLA_FLAGS", "JAX_PLATFORMS", "CUDA_VISIBLE_DEVICES", "MEMLM_DRY_RUN", "MEMLM_PORT", "TPU", "ZONE",
            "PROJECT")
    env = {k: v for k, v in os.environ.items() if k not in drop and not k.startswith("SLURM_")}
    env.update(PATH=f"{fakebin}:{os.environ['PATH']}", MEMLM="memlm")
    env.update(extra)
    return env


def run(script: str, args: list[str], env: dict[str, str], check: bool = True) -> subprocess.CompletedProcess:
    p = subprocess.run([str(REPO / "launch" / script), *args], env=env, capture_output=True, text=True, timeout=30)
    if check:
        assert p.returncode == 0, p.stderr
    return p


def parse(line: str) -> tuple[dict[str, str], list[str]]:
    """One printed command: its leading VAR=value assignments and its words."""
    words = shlex.split(line)
    env = {}
    while words and re.match(r"^[A-Z_][A-Z0-9_]*=", words[0]):
        k, v = words.pop(0).split("=", 1)
        env[k] = v
    return env, words


def flag(words: list[str], name: str) -> str | None:
    assert words.count(name) <= 1, words
    return words[words.index(name) + 1] if name in words else None


def check_processes(commands: list[list[str]], n: int) -> str:
    """Process ids 0..n-1 once each, --num-processes n everywhere, one coordinator; returns it."""
    assert sorted(int(flag(w, "--process-id")) for w in commands) == list(range(n))
    assert {flag(w, "--num-processes") for w in commands} == {str(n)}
    coordinators = {flag(w, "--coordinator") for w in commands}
    assert len(coordinators) == 1 and None not in coordinators, coordinators
    return coordinators.pop()


def train_words(words: list[str]) -> list[str]:
    """The words after `memlm train` up to the script's own flags."""
    assert words[:2] == ["memlm", "train"], words
    return words[2:2 + len(TRAIN_ARGS)]


# local.sh


@pytest.mark.parametrize("processes", [2, 4])
def test_local_gpu_split(fakebin, processes):
    """4 GPUs (nvidia-smi) over N processes: disjoint --local-device-ids slices covering all GPUs."""
    fake_gpus(fakebin, 4)
    out = run("local.sh", ["--processes", str(processes), "--dry-run", *TRAIN_ARGS], base_env(fakebin)).stdout
    commands = [parse(line)[1] for line in out.splitlines()]
    assert len(commands) == processes
    coordinator = check_processes(commands, processes)
    assert re.fullmatch(r"127\.0\.0\.1:\d+", coordinator)
    slices = [[int(x) for x in flag(w, "--local-device-ids").split(",")] for w in commands]
    assert sorted(d for s in slices for d in s) == [0, 1, 2, 3]  # every GPU once
    assert {len(s) for s in slices} == {4 // processes}
    for w in commands:
        assert train_words(w) == TRAIN_ARGS


def test_local_visible_gpus_and_device_subset(fakebin):
    """CUDA_VISIBLE_DEVICES names the GPUs (their ordinals are 0..k-1); --devices uses the first D."""
    fake_gpus(fakebin, 8)
    out = run("local.sh", ["--processes", "2", "--dry-run", *TRAIN_ARGS],
              base_env(fakebin, CUDA_VISIBLE_DEVICES="4,5,6,7,1,3")).stdout
    assert [flag(parse(line)[1], "--local-device-ids") for line in out.splitlines()] == ["0,1,2", "3,4,5"]
    out = run("local.sh", ["--processes", "2", "--devices", "4", "--dry-run", *TRAIN_ARGS], base_env(fakebin)).stdout
    assert [flag(parse(line)[1], "--local-device-ids") for line in out.splitlines()] == ["0,1", "2,3"]


@pytest.mark.parametrize("processes", [2, 4])
def test_local_cpu_split(fakebin, processes):
    """No GPU: the 8 forced CPU devices of XLA_FLAGS split into 8 / N per process, other XLA flags kept."""
    fake_gpus(fakebin, 0)
    env = base_env(fakebin, XLA_FLAGS="--xla_force_host_platform_device_count=8 --xla_cpu_enable_fast_math=false",
                   MEMLM_DRY_RUN="1")
    out = run("local.sh", ["--processes", str(processes), *TRAIN_ARGS], env).stdout
    parsed = [parse(line) for line in out.splitlines()]
    assert len(parsed) == processes
    check_processes([w for _, w in parsed], processes)
    counts = []
    for penv, words in parsed:
        assert penv["JAX_PLATFORMS"] == "cpu" and flag(words, "--local-device-ids") is None
        xla = penv["XLA_FLAGS"].split()
        assert "--xla_cpu_enable_fast_math=false" in xla
        (count,) = [int(f.split("=")[1]) for f in xla if f.startswith("--xla_force_host_platform_device_count=")]
        counts.append(count)
        assert train_words(words) == TRAIN_ARGS
    assert counts == [8 // processes] * processes


def test_local_cpu_by_jax_platforms_and_one_process(fakebin):
    """JAX_PLATFORMS=cpu wins over visible GPUs (one device each by default); without --processes: one
    plain `memlm train`."""
    fake_gpus(fakebin, 4)
    out = run("local.sh", ["--processes", "2", "--port", "4321", "--dry-run", *TRAIN_ARGS],
              base_env(fakebin, JAX_PLATFORMS="cpu")).stdout
    parsed = [parse(line) for line in out.splitlines()]
    assert check_processes([w for _, w in parsed], 2) == "127.0.0.1:4321"
    assert [e["XLA_FLAGS"] for e, _ in parsed] == ["--xla_force_host_platform_device_count=1"] * 2
    out = run("local.sh", ["--dry-run", *TRAIN_ARGS], base_env(fakebin)).stdout
    assert [parse(line) for line in out.splitlines()] == [({}, ["memlm", "train", *TRAIN_ARGS])]


@pytest.mark.parametrize("args", [["--processes", "0"], ["--processes"], ["--processes", "3"],
                                  ["--processes", "2", "--coordinator", "h:1"], ["--platform", "tpu"]])
def test_local_bad_arguments(fakebin, args):
    fake_gpus(fakebin, 4)
    p = run("local.sh", [*args, "--dry-run", *TRAIN_ARGS], base_env(fakebin), check=False)
    assert p.returncode == 2 and p.stdout == ""
    assert len(p.stderr.splitlines()) == 1 and p.stderr.startswith("usage: launch/local.sh"), p.stderr


def test_local_waits_for_all_and_stops_the_rest_when_one_fails(fakebin, tmp_path):
    """For real, with a stand-in for memlm: all succeed -> 0; process 1 fails -> its status, and process 0
    (which would run for a minute) is stopped within seconds."""
    fake_gpus(fakebin, 0)
    stand_in = tmp_path / "memlm"
    stand_in.write_text('#!/bin/sh\nid=""; while [ $# -gt 0 ]; do [ "$1" = --process-id ] && id=$2; shift; done\n'
                        f'echo $$ > {tmp_path}/pid$id\n'
                        '[ "$id" = "$FAIL" ] && exit 3\n'
                        '[ -n "$FAIL" ] && exec sleep 60\n'
                        'exit 0\n')
    stand_in.chmod(0o755)
    env = base_env(fakebin, MEMLM=str(stand_in))
    assert run("local.sh", ["--processes", "2", *TRAIN_ARGS], env).returncode == 0
    t0 = time.monotonic()
    p = run("local.sh", ["--processes", "2", *TRAIN_ARGS], dict(env, FAIL="1"), check=False)
    assert p.returncode == 3 and "process 1 exited with status 3" in p.stderr, p.stderr
    assert time.monotonic() - t0 < 10
    survivor = int((tmp_path / "pid0").read_text())
    with pytest.raises(ProcessLookupError):
        os.kill(survivor, 0)


# slurm_gpu.sh


def slurm_env(fakebin: Path, **extra: str) -> dict[str, str]:
    """The batch step of `sbatch --nodes=2 --gpus-per-node=4` on nodes gpu01, gpu02."""
    fake_tool(fakebin, "scontrol", '[ "$1 $2 $3" = "show hostnames gpu[01-02]" ] || exit 1\necho gpu01\necho gpu02\n')
    return base_env(fakebin, SLURM_JOB_ID="4242", SLURM_JOB_NODELIST="gpu[01-02]", SLURM_JOB_NUM_NODES="2",
                    SLURM_GPUS_ON_NODE="4", SLURM_NTASKS="2", SLURM_PROCID="0", SLURM_LOCALID="0",
                    CUDA_VISIBLE_DEVICES="0,1,2,3", SLURM_SUBMIT_DIR=str(REPO), **extra)


@pytest.mark.parametrize("tasks_per_node", [None, 1, 2])
def test_slurm_every_gpu_once(fakebin, tasks_per_node):
    """2 nodes x 4 GPUs: one srun step, then one command per task; (node, GPU) pairs cover all 8 once,
    process ids 0..P-1 match SLURM_PROCID, the coordinator is on the first node."""
    layout = [] if tasks_per_node is None else ["--tasks-per-node", str(tasks_per_node)]
    out = run("slurm_gpu.sh", [*layout, "--dry-run", *TRAIN_ARGS], slurm_env(fakebin)).stdout
    lines = out.splitlines()
    tasks = tasks_per_node or 4
    srun_env, srun = parse(lines[0])
    assert srun[0] == "srun" and srun_env == {}
    assert {"--nodes=2", f"--ntasks={2 * tasks}", f"--ntasks-per-node={tasks}", "--kill-on-bad-exit=1"} <= set(srun)
    assert srun[srun.index("--kill-on-bad-exit=1") + 1:] == [str(REPO / "launch/slurm_gpu.sh"), "--task", *TRAIN_ARGS]
    parsed = [parse(line) for line in lines[1:]]
    assert len(parsed) == 2 * tasks
    coordinator = check_processes([w for _, w in parsed], 2 * tasks)
    assert coordinator == f"gpu01:{61440 + 4242 % 4096}"
    used = []
    for penv, words in parsed:
        assert flag(words, "--process-id") == penv["SLURM_PROCID"] and penv["SLURM_NTASKS"] == str(2 * tasks)
        assert penv["XLA_PYTHON_CLIENT_MEM_FRACTION"] == "0.92"
        assert train_words(words) == TRAIN_ARGS
        used += [(penv["SLURMD_NODENAME"], int(g)) for g in flag(words, "--local-device-ids").split(",")]
    assert sorted(used) == [(node, g) for node in ("gpu01", "gpu02") for g in range(4)]


@pytest.mark.parametrize(("visible", "local_id", "expected"), [("0,1,2,3", "3", "3"), ("2", "2", "0"),
                                                               ("0,1,2,3", "1", "1")])
def test_slurm_task_picks_its_gpu(fakebin, visible, local_id, expected):
    """The task step itself (what srun runs on each node): its GPU among all the node's, or ordinal 0
    when SLURM bound one GPU to it."""
    env = slurm_env(fakebin, MEMLM="echo", MEMLM_COORDINATOR="gpu01:5000", MEMLM_GPUS_PER_NODE="4",
                    MEMLM_TASKS_PER_NODE="4")
    env.update(SLURM_NTASKS="8", SLURM_PROCID=str(4 + int(local_id)), SLURM_LOCALID=local_id,
               CUDA_VISIBLE_DEVICES=visible)
    words = run("slurm_gpu.sh", ["--task", *TRAIN_ARGS], env).stdout.split()
    assert flag(words, "--local-device-ids") == expected
    assert flag(words, "--process-id") == str(4 + int(local_id)) and flag(words, "--coordinator") == "gpu01:5000"


@pytest.mark.parametrize("args", [["--tasks-per-node", "3"], ["--coordinator", "h:1"], ["--tasks-per-node"]])
def test_slurm_bad_arguments(fakebin, args):
    p = run("slurm_gpu.sh", [*args, "--dry-run", *TRAIN_ARGS], slurm_env(fakebin), check=False)
    assert p.returncode == 2 and p.stdout == "" and len(p.stderr.splitlines()) == 1, p.stderr
    p = run("slurm_gpu.sh", ["--dry-run", *TRAIN_ARGS], base_env(fakebin), check=False)  # not in a job
    assert p.returncode == 2 and "not inside a SLURM job" in p.stderr


# tpu_pod.sh


def test_tpu_pod_same_command_on_every_worker(fakebin):
    """One gcloud ssh to --worker=all whose remote command is `memlm train` with the arguments intact and
    no coordinator or process flags (jax reads the pod from the TPU metadata)."""
    env = base_env(fakebin, TPU="my-v5p-64", ZONE="us-east5-a", PROJECT="proj", MEMLM_DRY_RUN="1")
    out = run("tpu_pod.sh", TRAIN_ARGS, env).stdout
    (line,) = out.splitlines()
    penv, words = parse(line)
    assert penv == {}
    assert words[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh"] and words[5] == "my-v5p-64"
    assert flag(words, "--zone") == "us-east5-a" and flag(words, "--project") == "proj" and "--worker=all" in words
    remote = shlex.split(flag(words, "--command"))
    assert remote[:5] == ["cd", "$HOME/memlm", "&&", ".venv/bin/memlm", "train"]
    assert remote[5:] == TRAIN_ARGS
    p = run("tpu_pod.sh", [*TRAIN_ARGS, "--num-processes", "2"], env, check=False)
    assert p.returncode == 2 and len(p.stderr.splitlines()) == 1
    p = run("tpu_pod.sh", TRAIN_ARGS, dict(env, TPU=""), check=False)
    assert p.returncode == 2 and "set TPU" in p.stderr
