"""Ctrl-C in the middle of embedding a natural-text corpus: `memlm prepare` stops soon, with one
line, and the rerun reuses the finished embedding chunks and writes what an uninterrupted prepare writes."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from natural_text import write_jsonl

from memlm.data.records import read_manifest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent
FLAGS = ["--config.tree.embedder=minilm", "--config.tree.embed_batch=8", "--config.tree.k=4", "--config.tree.depth=2",
         "--config.data.tokenizer_vocab=600", "--config.eval.heldout_documents=10", "--config.data.seq_len=64"]


# A suite started as a background job of a non-interactive shell inherits SIGINT ignored (POSIX), and a
# Python started with SIGINT ignored keeps ignoring it: the child gets Python's own Ctrl-C handler back, as
# a terminal's `memlm prepare` has it.
MAIN = ("import signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
        "from memlm.cli import main; sys.exit(main(sys.argv[1:]))")


def _start(corpus: Path, out: Path) -> subprocess.Popen:
    """``memlm prepare`` on one CPU device with XLA's default optimisation: the suite's cheapest level
    (``MEMLM_TEST_XLA_FLAGS``) runs MiniLM about 3x slower, and every run here uses the same flags."""
    return subprocess.Popen([sys.executable, "-c", MAIN, "prepare", "--corpus", str(corpus), "--out", str(out),
                             *FLAGS], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=""))


def test_ctrl_c_while_embedding_stops_at_once_and_the_rerun_reuses_the_finished_chunks(tmp_path):
    corpus = write_jsonl(tmp_path / "python_docs.jsonl", 300)
    out = tmp_path / "data"
    proc = _start(corpus, out)
    partial = out / ".units" / "encode_partial" / "00000"
    deadline = time.time() + 300
    while not (partial / "000002.npy").exists():  # three chunks of 64 units are embedded
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.05)
    sent = time.time()
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=60)
    # The signal is handled between XLA calls: a compile in flight finishes first, which on a loaded 2-core
    # host has taken 21 s; a hang (the bug this guards) blocks until the 60 s communicate timeout.
    assert time.time() - sent < 40, f"took {time.time() - sent:.1f} s to stop"
    assert proc.returncode == 130, stdout[-2000:] + stderr[-2000:]
    assert stderr.strip().splitlines() == [
        "memlm prepare: interrupted; what finished is kept: run the same command again to go on"], stderr
    assert "Traceback" not in stdout + stderr
    kept = len(list(partial.glob("??????.npy")))
    assert kept >= 3 and not (out / "manifest.json").exists()
    assert "embed unit 0:" in stdout and "units/s" not in stdout  # progress lines came, the unit did not finish

    whole = tmp_path / "whole"  # the same corpus, never interrupted: it runs beside the rerun
    rerun, once = _start(corpus, out), _start(corpus, whole)
    stdout, stderr = rerun.communicate(timeout=600)
    assert rerun.returncode == 0, stdout[-2000:] + stderr[-2000:]
    n_chunks = -(-read_manifest(out)["documents"]["training"] // 64)
    assert f"encode unit 0: reusing {kept} of {n_chunks} embedding chunks of an interrupted run" in stdout, stdout
    assert not partial.exists()

    stdout, stderr = once.communicate(timeout=600)
    assert once.returncode == 0, stdout[-2000:] + stderr[-2000:]
    a, b = read_manifest(whole), read_manifest(out)
    for name in ("tree.npz", "paths.npy", "doc_offsets.npy", "heldout.jsonl", *a["shards"]):
        assert (out / name).read_bytes() == (whole / name).read_bytes(), name
    assert b["stages"]["scan"]["reused"] and not a["stages"]["scan"]["reused"]  # what differs: what was reused
    for m in (a, b):
        m["stages"] = {k: v["key"] for k, v in m["stages"].items()}
    assert a == b
