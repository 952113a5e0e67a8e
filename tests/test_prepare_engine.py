"""`memlm prepare` in one process and with `--workers N` (the Beam engine): a folder of 8 `.jsonl.gz`
shards gives byte-identical shards and manifest with no workers, 1 worker and 2, after a kill in the
middle and a rerun; the records are checked against an independent packing in test_data_prepare."""

import gzip
import json
import os
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from memlm.data.records import read_manifest

pytestmark = pytest.mark.slow  # end-to-end prepare / convert runs in module-scoped fixtures

REPO = Path(__file__).resolve().parent.parent
OVERRIDES = {"tree.k": 2, "tree.depth": 2, "tree.embedder": "hash", "tree.kmeans_steps": 5, "tree.kmeans_batch": 256,
             "data.seq_len": 64, "data.tokenizer_vocab": 400, "data.records_per_shard": 8,
             "eval.heldout_documents": 12, "data.entity_field": "entity"}
FLAGS = [f"--config.{k}={v}" for k, v in OVERRIDES.items()]


def _cfg():
    from memlm.config import apply_overrides, default_config

    return apply_overrides(default_config(), {k: str(v) for k, v in OVERRIDES.items()})


def _reused(stdout: str, stage: str) -> set[int]:
    """The units a log line ``<stage>: reused units 0-2, 5 (4 of 8)`` names."""
    line = next((ln for ln in stdout.splitlines() if ln.startswith(f"{stage}: reused units ")), None)
    assert line is not None, stdout
    out = set()
    for part in line.split("units ", 1)[1].split(" (")[0].split(", "):
        a, _, b = part.partition("-")
        out.update(range(int(a), int(b or a) + 1))
    return out


def _records(out: Path) -> Counter:
    from array_record.python.array_record_module import ArrayRecordReader

    got = Counter()
    for s in read_manifest(out)["shards"]:
        r = ArrayRecordReader(str(out / s))
        got.update(r.read_all())
        r.close()
    return got


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """8 gzipped jsonl shards of generated facts documents, two with bad lines."""
    from memlm.corpora import generated

    root = tmp_path_factory.mktemp("corpus")
    docs = list(generated.module("facts").generate(800, 0))
    folder = root / "shards"
    folder.mkdir()
    for i in range(8):
        lines = [json.dumps(d).encode() for d in docs[i * 100:(i + 1) * 100]]
        if i in (2, 5):
            lines.insert(3, b"{not json")
        (folder / f"part-{i:03d}.jsonl.gz").write_bytes(gzip.compress(b"\n".join(lines) + b"\n"))
    return folder


def _start(shards, out, workers, env=None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "memlm.cli", "prepare", "--corpus", str(shards), "--out", str(out),
                             "--workers", str(workers), *FLAGS], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=dict(os.environ, JAX_PLATFORMS="cpu", **(env or {})),
                            start_new_session=True)


def _wait(p: subprocess.Popen) -> subprocess.CompletedProcess:
    stdout, stderr = p.communicate(timeout=600)
    return subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr)


def _cli(shards, out, workers, env=None):
    return _wait(_start(shards, out, workers, env))


@pytest.fixture(scope="module")
def one_worker(shards, tmp_path_factory):
    out = tmp_path_factory.mktemp("w1") / "data"
    from memlm.data.prepare import prepare

    prepare(_cfg(), str(shards), out, workers=1)
    return out


def test_one_and_two_workers_and_one_process_give_the_same_records(shards, one_worker, tmp_path):
    from memlm.data.prepare import prepare

    two, single = tmp_path / "w2", tmp_path / "single"
    proc = _start(shards, two, 2)
    prepare(_cfg(), str(shards), single)  # one process, no Beam, while the two workers run
    res = _wait(proc)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    a, b = read_manifest(one_worker), read_manifest(two)
    assert a["engine"]["work_units"] == 8 and json.loads((two / "prepare_run.json").read_text())["workers"] == 2
    assert a["shards"] == b["shards"] and a["sequences"] == b["sequences"] > 0
    for s in a["shards"]:  # same records in the same shard files, byte for byte
        assert (one_worker / s).read_bytes() == (two / s).read_bytes(), s
    with np.load(one_worker / "tree.npz") as x, np.load(two / "tree.npz") as y:
        assert x.files == y.files and all(np.array_equal(x[f], y[f]) for f in x.files)
    assert a["documents"] == b["documents"] and a["documents"]["undecodable"] == 2
    assert a["documents"]["heldout"] == 12 and a["documents"]["training"] == 800 - 12
    assert (one_worker / "heldout.jsonl").read_bytes() == (two / "heldout.jsonl").read_bytes()
    assert a["leaf_histogram"] == b["leaf_histogram"] and a["tree"]["routed"] == b["tree"]["routed"]
    assert (one_worker / "entity_leaves.json").read_text() == (two / "entity_leaves.json").read_text()

    assert (one_worker / "manifest.json").read_bytes() == (two / "manifest.json").read_bytes()

    # one process, no Beam: the same files, byte for byte
    assert json.loads((single / "prepare_run.json").read_text())["runner"] == "local"
    for name in ("manifest.json", "heldout.jsonl", "entity_leaves.json", "tree.npz", "paths.npy", "doc_offsets.npy",
                 "tokenizer.json", *a["shards"]):
        assert (single / name).read_bytes() == (one_worker / name).read_bytes(), name
    assert read_manifest(single)["tree"]["embed_dtype"] == "float32"  # what eval embeds queries in


def test_a_killed_two_worker_prepare_resumes_reusing_its_finished_units(shards, one_worker, tmp_path):
    out = tmp_path / "data"
    res = _cli(shards, out, 2, env={"MEMLM_KILL_AT": "prepare-encode-done:3"})
    assert res.returncode == -signal.SIGKILL, res.stdout[-3000:] + res.stderr[-3000:]
    assert not (out / "manifest.json").exists()
    res = _cli(shards, out, 2)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "scan: reused units 0-7 (8 of 8)" in res.stdout, res.stdout
    assert 3 in _reused(res.stdout, "encode") and len(_reused(res.stdout, "encode")) < 8, res.stdout
    assert _records(out) == _records(one_worker)
    assert read_manifest(out)["leaf_histogram"] == read_manifest(one_worker)["leaf_histogram"]


def test_a_rerun_reuses_every_unit_and_range(shards, one_worker, capsys):
    from rich.console import Console

    from memlm.data.prepare import prepare

    before = {s: (one_worker / s).stat().st_mtime_ns for s in read_manifest(one_worker)["shards"]}
    prepare(_cfg(), str(shards), one_worker, workers=1, console=Console(force_terminal=False))
    out = capsys.readouterr().out
    for stage in ("scan", "encode", "route"):
        assert f"{stage}: reused units 0-7 (8 of 8)" in out, out
    assert "pack: reused ranges 0-3 (4 of 4)" in out, out
    assert {s: (one_worker / s).stat().st_mtime_ns for s in before} == before
