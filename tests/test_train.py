"""Training: sharded step equals one device, frozen anchor, resume after SIGKILL, metrics, bad configs."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from helpers import small_config
from state import assert_same_state, run_state

from memlm.config import ConfigError
from memlm.sharding import make_mesh
from memlm.train.mesh import check_batch
from memlm.train.metrics import read_metrics
from memlm.train.step import build, device_batch

REPO = Path(__file__).resolve().parent.parent


def _batch(cfg, b, seed=0):
    rng = np.random.default_rng(seed)
    s = cfg.data.seq_len
    k, depth = cfg.tree.k, cfg.tree.depth
    leaf = rng.integers(0, k**depth, b)
    paths = np.stack([leaf // k ** (depth - lv) for lv in range(1, depth + 1)], 1).astype(np.int32)
    leaf[1] = leaf[0]  # a duplicate node in the batch
    seg = np.ones((b, s), np.int32)
    seg[:, s // 2:] = 2  # two documents per row
    pos = np.concatenate([np.arange(s // 2), np.arange(s - s // 2)])[None].repeat(b, 0).astype(np.int32)
    return dict(tokens=rng.integers(0, cfg.model.vocab_size, (b, s)).astype(np.int32), segment_ids=seg,
                positions=pos, paths=paths, generic=np.arange(b) % 4 == 3)


def _run(cfg, mesh, steps=3):
    fns = build(cfg, mesh)
    state = fns.init(0)
    losses = []
    for i in range(steps):
        state, m = fns.step(state, device_batch(_batch(cfg, cfg.train.batch_size, seed=i), fns.batch_shardings))
        losses.append(float(m["loss"]))  # blocks every step (multi-device CPU deadlock pitfall)
    return losses, state


@pytest.mark.slow
def test_frozen_anchor_stays_bit_identical_and_only_touched_blocks_change():
    cfg = small_config("ffn", sizes=(4, 4))
    cfg.train.update(mode="frozen", batch_size=4, memory_lr=1e-2, memory_warmup_steps=0)
    mesh = make_mesh((1, 1, 1))
    fns = build(cfg, mesh)
    state = fns.init(0)
    before = jax.device_get((state.params, state.bank.params))
    batch = _batch(cfg, 4)
    state, _ = fns.step(state, device_batch(batch, fns.batch_shardings))
    params, bank = jax.device_get((state.params, state.bank.params))
    for name in params:
        assert np.array_equal(params[name], before[0][name]), name
    fetched = ~batch["generic"]
    for level in (1, 2):
        touched = set(batch["paths"][fetched, level - 1].tolist())
        changed = {n for n in range(cfg.tree.k**level)
                   if not np.array_equal(bank[f"level{level}"]["w3"][n], before[1][f"level{level}"]["w3"][n])}
        assert changed == touched


def test_batch_not_divisible_by_the_data_axis_fails_before_compiling():
    cfg = small_config("ffn")
    cfg.train.batch_size = 6
    with pytest.raises(ConfigError, match="train.batch_size"):
        check_batch(cfg, make_mesh((4, 1, 2)))


def _cli(*args, env_extra=None, **kw):
    env = dict(os.environ, PYTHONUNBUFFERED="1", **(env_extra or {}))
    env["XLA_FLAGS"] = os.environ["MEMLM_TEST_XLA_FLAGS"]  # the training CLI runs on one CPU device
    return subprocess.Popen([sys.executable, "-m", "memlm.cli", *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)


@pytest.mark.slow
def test_cli_rejects_bad_configs_with_one_line(tmp_path):
    for args, needle in [
        (["info", "--config.model.nope=1"], "model.nope"),
        (["train", "--data", str(tmp_path), "--config.mesh.data=3"], "mesh"),
        (["train", "--data", str(tmp_path)], "manifest.json"),
        (["train", "--data", str(tmp_path), "--config.train.batch_size=0"], "train.batch_size"),
    ]:
        p = _cli(*args)
        out, _ = p.communicate(timeout=120)
        assert p.returncode == 2, out
        assert needle in out and "Traceback" not in out, out


TRAIN_FLAGS = ["--config.model.d_model=32", "--config.model.n_layers=2", "--config.model.n_heads=2",
               "--config.model.head_dim=16", "--config.model.d_ff=64", "--config.train.batch_size=4",
               "--config.train.log_every=1", "--config.train.checkpoint_every=3", "--config.train.steps=12",
               "--config.train.warmup_steps=2", "--config.train.memory_warmup_steps=2"]


def _train_args(data, workdir, *extra):
    return ["train", "--data", str(data), "--workdir", str(workdir), *TRAIN_FLAGS, *extra]


@pytest.mark.slow
def test_resume_after_sigkill_equals_an_uninterrupted_run(facts_data, tmp_path):
    """The killed run goes first (it compiles the step); the resume and the uninterrupted run then
    run side by side on the cached program."""
    extra = ["--config.train.mode=scratch"]
    killed = tmp_path / "killed"
    p = _cli(*_train_args(facts_data, killed, *extra))
    deadline = time.time() + 600
    while time.time() < deadline and not (killed / "checkpoints" / "6").exists():
        time.sleep(0.2)
    p.send_signal(signal.SIGKILL)
    p.wait()
    done = [r["step"] for r in read_metrics(killed)]
    assert done and max(done) < 12, "the run finished before it could be killed"
    full_p = _cli(*_train_args(facts_data, tmp_path / "full", *extra))
    p = _cli(*_train_args(facts_data, killed, *extra))
    out, _ = full_p.communicate(timeout=600)
    assert full_p.returncode == 0, out
    full = {r["step"]: r["loss"] for r in read_metrics(tmp_path / "full")}
    assert sorted(full) == list(range(1, 13))
    out, _ = p.communicate(timeout=600)
    assert p.returncode == 0, out
    assert "resumed" in out
    resumed = {r["step"]: r["loss"] for r in read_metrics(killed)}
    assert sorted(resumed) == list(range(1, 13))
    np.testing.assert_allclose([resumed[s] for s in range(1, 13)], [full[s] for s in range(1, 13)], rtol=1e-6)
    # The whole final state (anchor, its optimizer, every node of the bank and the generic memory with both
    # moments and the per-node counters) within the losses' tolerance. Not the version numbers: a kill after a
    # bank version was committed but before its checkpoint finished leaves that number unused for good.
    versions = ["checkpoint/bank_version", "checkpoint/generic_version", "bank/version", "generic/version"]
    assert_same_state(run_state(killed), run_state(tmp_path / "full"), exact=False, rtol=1e-6, skip=versions)


@pytest.mark.slow
def test_training_on_the_facts_corpus_lowers_the_loss_and_writes_metrics(facts_data, tmp_path):
    p = _cli(*_train_args(facts_data, tmp_path / "run", "--config.train.steps=30", "--config.train.lr=3e-3",
                          "--config.train.log_every=5", "--config.train.checkpoint_every=7"))
    out, _ = p.communicate(timeout=600)
    assert p.returncode == 0, out
    assert "tok/s" in out and "MFU" in out
    recs = read_metrics(tmp_path / "run")
    assert [r["step"] for r in recs] == [5, 10, 15, 20, 25, 30]
    losses = [r["loss"] for r in recs]
    assert losses[-1] < losses[0] - 0.5
    # Checkpoints every 7 steps whatever the logging interval, plus the last step; the newest 3 kept.
    assert sorted(int(d.name) for d in (tmp_path / "run" / "checkpoints").iterdir() if d.name.isdigit()) == [21, 28, 30]
    assert all(r["tokens_per_s"] > 0 and 0 < r["mfu"] < 1 for r in recs)
    assert list((tmp_path / "run" / "tensorboard").glob("events.out.tfevents.*"))
    record = json.loads((tmp_path / "run" / "config.json").read_text())
    assert record["config"]["train"]["steps"] == 30
