"""``memlm compile``: the report's shape and numbers, a config that does not fit, TPU topologies."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def _compile(*args, timeout=600):
    # The command sets its own device count; the tests' cheaper XLA optimisation level goes with it
    # (about 1.7x faster to compile; the report's memory numbers and collectives keep their shape).
    env = dict(os.environ, XLA_FLAGS=os.environ.get("MEMLM_TEST_XLA_FLAGS", ""))
    p = subprocess.run([sys.executable, "-m", "memlm.cli", "compile", *args], cwd=REPO, env=env, capture_output=True,
                       text=True, timeout=timeout)
    return p.returncode, p.stdout, p.stderr


SMALL = ["--config.model.n_layers=2", "--config.train.mode=cotrain", "--config.train.batch_size=64",
         "--config.train.microbatch_size=16"]


def test_compile_reports_memory_and_collectives_per_device():
    code, out, err = _compile("--topology", "cpu:4", "--json", *SMALL)
    assert code == 0, err
    report = json.loads(out)
    assert {"config", "topology", "devices", "mesh", "global_batch", "microbatch", "per_device", "fits",
            "collectives"} <= set(report)
    assert report["mesh"] == {"data": 4, "fsdp": 1, "tensor": 1}
    assert (report["global_batch"], report["microbatch"], report["micro_steps"]) == (64, 16, 4)
    pd = report["per_device"]
    assert pd["capacity"] == 80e9 and report["fits"] is True
    assert pd["total"] == pd["arguments"] + pd["temporaries"] + pd["outputs"] - pd["aliased"] > 0
    ops = {c["op"] for c in report["collectives"]}
    assert "all-to-all" in ops and "all-reduce" in ops  # the bank exchange and the gradient reductions
    assert all(c["bytes"] > 0 and c["count"] >= 1 for c in report["collectives"] if c["op"] == "all-to-all")


def test_a_config_that_does_not_fit_exits_with_one_line():
    # the topology and config of the test above: the same program, so a warm compilation cache serves both
    code, out, err = _compile("--topology", "cpu:4", "--capacity", "1e6", *SMALL)
    assert code == 2
    lines = [line for line in err.splitlines() if line.startswith("memlm compile")]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert "does not fit cpu:4" in lines[0] and "needs" in lines[0] and "has 0.0 GB" in lines[0]
    assert "largest buffers" in lines[0]


def test_a_bad_topology_is_one_line():
    code, _, err = _compile("--topology", "v5p-8")
    assert code == 2 and "--topology 'v5p-8'" in err and "Traceback" not in err


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="libtpu (the memlm[tpu] extra) not installed")
def test_paper_160m_fits_a_v5p_2x2x1_at_its_own_batch():
    code, out, err = _compile("--config", "experiments/paper_160m.py", "--topology", "v5p:2x2x1", "--json",
                              timeout=1200)
    assert code == 0, err[-2000:]
    report = json.loads(out)
    assert report["fits"] and report["global_batch"] == 1024
    assert max(c["bytes"] for c in report["collectives"] if c["op"] == "all-gather") < 512 * 2**20
