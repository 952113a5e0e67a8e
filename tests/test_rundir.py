"""The run directory never loses work: a run whose checkpoints no longer restore stops and changes
nothing, a resumed run refuses a changed train section, one trainer at a time; URLs wherever a
directory is named; per-subtree frozen jobs merged equal one joint run."""

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from memlm.run.directory import RunDir
from memlm.run.paths import location
from memlm.train.metrics import read_metrics

pytestmark = pytest.mark.slow  # every test trains through the CLI
REPO = Path(__file__).resolve().parent.parent
FLAGS = ["--config.model.d_model=32", "--config.model.n_layers=2", "--config.model.n_heads=2",
         "--config.model.head_dim=16", "--config.model.d_ff=64", "--config.train.batch_size=4",
         "--config.train.log_every=1", "--config.train.checkpoint_every=2", "--config.train.warmup_steps=1",
         "--config.train.memory_warmup_steps=1"]


def start(*args) -> subprocess.Popen:
    """``memlm ARGS`` on one CPU device, started; :func:`done` waits for it."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env["XLA_FLAGS"] = os.environ["MEMLM_TEST_XLA_FLAGS"]  # one CPU device
    return subprocess.Popen([sys.executable, "-m", "memlm.cli", *args], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def done(p: subprocess.Popen, check=True) -> subprocess.CompletedProcess:
    stdout, stderr = p.communicate(timeout=600)
    if check:
        assert p.returncode == 0, (stdout + stderr)[-3000:]
    return subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr)


def cli(*args, check=True):
    return done(start(*args), check=check)


def tree_digest(path: Path) -> dict[str, str]:
    return {str(f.relative_to(path)): hashlib.sha256(f.read_bytes()).hexdigest()
            for f in sorted(path.rglob("*")) if f.is_file() and f.name != ".lock"}


@pytest.fixture(scope="module")
def memory_run(facts_data, tmp_path_factory):
    run = tmp_path_factory.mktemp("rundir") / "run"
    cli("train", "--data", str(facts_data), "--workdir", str(run), *FLAGS, "--config.train.mode=scratch",
        "--config.train.steps=4")
    return run


def test_a_run_whose_data_was_reprepared_with_another_tree_stops_and_changes_nothing(facts_data, memory_run,
                                                                                      tmp_path):
    from memlm.config import load_config
    from memlm.data.prepare import prepare

    data = tmp_path / "data"
    shutil.copytree(facts_data, data)
    cfg = load_config(os.path.join(REPO, "experiments", "tiny.py"))
    cfg.tree.update(embedder="hash", seed=1)
    cfg.data.update(facts_documents=1500, tokenizer_vocab=1024)
    cfg.model.vocab_size = 1024
    prepare(cfg, "facts", str(data))  # a new tree; the tokens and embeddings are reused
    before = tree_digest(memory_run)
    p = cli("train", "--data", str(data), "--workdir", str(memory_run), *FLAGS, "--config.train.mode=scratch",
            "--config.train.steps=6", "--allow-config-change", check=False)
    assert p.returncode == 2, p.stdout + p.stderr
    lines = [line for line in p.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in p.stderr, p.stderr
    assert "none restores" in lines[0] and "tree_id" in lines[0] and "checkpoint 4" in lines[0]
    assert tree_digest(memory_run) == before  # bank, checkpoints, config and metrics byte for byte


def test_a_changed_train_section_needs_the_flag_and_a_busy_run_is_refused(facts_data, memory_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(memory_run, run)
    base = ["train", "--data", str(facts_data), "--workdir", str(run), *FLAGS, "--config.train.mode=scratch"]
    changed = start(*base, "--config.train.steps=6")  # refused on its config, before it asks for the lock
    with RunDir(run).lock():  # another trainer holds the run
        p = cli(*base, "--config.train.steps=4", check=False)
        assert p.returncode == 2 and "is being trained by pid" in p.stderr, p.stderr
    p = done(changed, check=False)
    assert p.returncode == 2 and "train" in p.stderr and "--allow-config-change" in p.stderr, p.stderr
    p = cli(*base, "--config.train.steps=6", "--allow-config-change")
    assert "resumed" in p.stdout and max(r["step"] for r in read_metrics(run)) == 6


def test_urls_name_runs_data_and_init_end_to_end(facts_data, memory_run, tmp_path):
    """A cotrain run whose data, run directory and --init-from (the module's run, copied to a
    path with a space) are file:// URLs, then evaluated through its URL."""
    assert os.fspath(location("gs://bucket/runs/a") / "bank") == "gs://bucket/runs/a/bank"  # not gs:/bucket/...
    url = lambda p: "file://" + str(p)  # noqa: E731
    anchor, cotrain = tmp_path / "anchor dir", tmp_path / "cotrain dir"
    shutil.copytree(memory_run, anchor)
    p = cli("train", "--data", url(facts_data), "--workdir", url(cotrain), *FLAGS, "--config.train.mode=cotrain",
            "--config.train.steps=2", "--init-from", url(anchor))
    assert f"anchor initialised from {url(anchor)}" in " ".join(p.stdout.split()), p.stdout
    assert (cotrain / "bank" / "manifest.json").exists() and (cotrain / "checkpoints" / "2").exists()
    p = cli("eval", "--workdir", url(cotrain), "--conditions", "none,fetched")
    assert (cotrain / "eval").exists(), p.stdout


def test_subtree_jobs_merged_equal_one_joint_frozen_run(facts_data, memory_run, tmp_path):
    """Jobs for level-1 subtrees 0 and 3 (frozen anchor, no generic memory, no clipping), merged,
    equal a frozen run whose every batch is the two jobs' batches of that step together (the joint
    run's loss averages over both jobs' tokens, a scale that changes from step to step: with
    b1 = b2 ~ 0 and eps ~ 0 the row-wise update is scale-free, so all but a few elements whose
    gradient is at float-noise level agree); and the merged rows are the jobs' rows bit for bit."""
    from memlm.bank.layout import BankLayout
    from memlm.bank.store import BankStore
    from memlm.data.loader import Loader
    from memlm.sharding import make_mesh
    from memlm.train.loop import load_anchor_params
    from memlm.train.step import build, device_batch

    common = [*FLAGS, "--config.train.mode=frozen", "--config.train.steps=3", "--config.memory.generic=false",
              "--config.train.clip_norm=1e9", "--config.train.eps=1e-15",
              "--config.train.b1=1e-9", "--config.train.b2=1e-9", "--config.train.checkpoint_every=3",
              "--init-from", str(memory_run)]
    jobs = []
    for sub in (0, 3):
        job = tmp_path / f"sub{sub}"
        cli("train", "--data", str(facts_data), "--workdir", str(job), *common, f"--config.train.subtree={sub}")
        jobs.append(job)
    bad = start("merge", str(jobs[0]), str(jobs[0]), "--out", str(tmp_path / "twice"))
    p = cli("merge", str(jobs[0]), str(jobs[1]), "--out", str(tmp_path / "merged"))
    assert "subtrees [0, 3]" in p.stdout
    evaluation = start("eval", "--workdir", str(tmp_path / "merged"), "--conditions", "none,fetched")  # runs meanwhile
    bad = done(bad, check=False)
    assert bad.returncode == 2 and "both train subtree 0" in bad.stderr

    cfg, _ = RunDir(jobs[0]).load_config()
    cfg.train.subtree = -1
    cfg.train.batch_size = 8
    fns = build(cfg, make_mesh((1, 1, 1), jax.local_devices()[:1]))
    state = fns.init(cfg.train.seed, with_banks=False)
    state = state.replace(params=load_anchor_params(memory_run, fns.fn.shapes, fns.state_shardings.params)[1])
    store = BankStore.open(jobs[0] / "bank", fns.bank_layout)
    state = state.replace(bank=BankStore.create(tmp_path / "joint_bank", fns.bank_layout, seed=store.seed,
                                                tree_id=store.tree_id).load())
    loaders = [Loader(facts_data, batch_size=4, seed=cfg.train.seed, generic_prob=0.0, subtree=s) for s in (0, 3)]
    for step in range(3):
        parts = [ld.batch_at(step) for ld in loaders]
        batch = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
        state, _ = fns.step(state, device_batch(batch, fns.batch_shardings))

    from state import assert_same_state, run_state, state_arrays

    layout = BankLayout.from_config(cfg)
    merged = BankStore.open(tmp_path / "merged" / "bank", layout)
    joint = jax.device_get(state.bank)
    fresh = jax.device_get(BankStore.open(tmp_path / "joint_bank", fns.bank_layout, version=0).load())
    trained = {}
    for lv in fns.bank_layout.levels:
        nodes = trained[lv.key] = merged.written_nodes(lv.level)
        assert set((nodes // cfg.tree.k ** (lv.level - 1)).tolist()) == {0, 3}
        drift = np.abs(joint.params[lv.key]["w3"][nodes] - fresh.params[lv.key]["w3"][nodes])
        assert np.median(drift) > 1e-4, lv.key  # W3 moves at a node's first update (W1, W2 once W3 is non-zero)

    # The merged run's whole state is the jobs' bit for bit: the (one, frozen) anchor and its optimizer
    # state, and every field of every node (trained or not) of subtree i from job i.
    got, want, other = run_state(tmp_path / "merged"), run_state(jobs[0]), run_state(jobs[1])
    assert_same_state(other, want, only=["anchor/"])
    for lv in layout.levels:
        sub3 = np.arange(lv.nodes) // cfg.tree.k ** (lv.level - 1) == 3
        for name in (n for n in want if n.startswith(f"bank/{lv.key}/")):
            want[name] = want[name].copy()
            want[name][sub3] = other[name][sub3]
    assert_same_state(got, want, exact=True)

    # Against the joint run: anchor, optimizer, counters and written flags bit for bit, the parameters of
    # never-trained nodes too (their init); trained nodes' parameters all but a few float-noise elements
    # (docstring). The moments are not compared here: each carries its run's loss scale (the joint mu is
    # about half a job's, its nu a quarter; the update is scale-free); they equal the jobs' (above).
    ref = state_arrays(state)
    moved = [n for n in ref if n.endswith(("/params", "/mu", "/nu")) and n.startswith("bank/")]
    assert_same_state(got, ref, exact=True, skip=["checkpoint/", "bank/version", *moved])

    def rows(flat, in_trained):
        out = {}
        for name in (n for n in moved if n.endswith("/params")):
            mask = np.zeros(len(flat[name]), bool)
            mask[trained[name.split("/")[1]]] = True
            out[name] = flat[name][mask == in_trained]
        return out

    assert_same_state(rows(got, False), rows(ref, False), exact=True)
    assert_same_state(rows(got, True), rows(ref, True), exact=False, atol=1e-6, frac=0.02)
    p = done(evaluation)
    assert "fetched" in p.stdout
