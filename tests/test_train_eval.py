"""Evaluation during training (``train.eval_every``): rows in metrics.jsonl that equal ``memlm eval``."""

import json

import numpy as np
import pytest

from memlm.config import load_config

pytestmark = pytest.mark.slow

SMALL = dict(d_model=32, n_layers=2, n_heads=2, head_dim=16, d_ff=64)


def _cfg(steps: int):
    cfg = load_config("experiments/tiny.py")
    cfg.model.update(SMALL)
    cfg.tree.embedder = "hash"
    cfg.train.update(mode="scratch", steps=steps, batch_size=8, log_every=2, checkpoint_every=100, eval_every=2,
                     eval_probes=6)
    cfg.mesh.update(data=-1, fsdp=1, tensor=1)
    cfg.eval.update(batch_size=4, max_new_tokens=4, heldout_documents=6, conditions="none,fetched")
    return cfg


def test_eval_every_writes_rows_that_equal_memlm_eval_of_that_step(facts_data, tmp_path, capsys):
    from memlm.eval.perplexity import evaluate_perplexity
    from memlm.eval.probes import evaluate_probes, load_probes
    from memlm.eval.run import heldout_documents
    from memlm.infer.run import load_run
    from memlm.sweeps.collect import _training_eval
    from memlm.train.evaluation import _spread
    from memlm.train.loop import train
    from memlm.train.metrics import read_metrics

    workdir = tmp_path / "run"
    train(_cfg(3), facts_data, workdir)
    assert "eval step 2: perplexity none" in capsys.readouterr().out
    records = {r["step"]: r for r in read_metrics(workdir)}
    keys = {k for k in records[2] if k.startswith("eval/")}
    probe_files = sorted(p.stem for p in (facts_data / "probes").glob("*.jsonl"))
    want = {"eval/seconds"} | {f"eval/perplexity/{c}" for c in ("none", "fetched")}
    want |= {f"eval/{p}/accuracy/{c}" for p in probe_files for c in ("none", "fetched")}
    assert keys == want and "loss" in records[2]  # the evaluation row merges with the step's training row
    assert want <= set(records[3])  # and the last step is evaluated, whatever eval_every
    assert records[2]["eval/perplexity/fetched"] != records[3]["eval/perplexity/fetched"]
    # the numbers are those of the run's checkpoint at that step, as memlm eval computes them
    run = load_run(workdir)
    assert run.step == 3
    docs, texts = heldout_documents(run)
    ppl = evaluate_perplexity(run.fn, run.params, docs, texts, run.memory, ("none", "fetched"),
                              seq_len=run.cfg.data.seq_len, batch_size=4)["conditions"]
    for c in ("none", "fetched"):
        np.testing.assert_allclose(records[3][f"eval/perplexity/{c}"], ppl[c]["perplexity"], rtol=1e-6)
    probes = _spread(load_probes(facts_data / "probes" / f"{probe_files[0]}.jsonl"), 6)
    assert len(probes) == 6
    acc = evaluate_probes(run.fn, run.params, run.tokenizer, probes, run.memory, ("none", "fetched"),
                          max_new_tokens=4, batch_size=4)["conditions"]
    for c in ("none", "fetched"):
        assert records[3][f"eval/{probe_files[0]}/accuracy/{c}"] == acc[c]["accuracy"]
    # the sweep table's columns: the last evaluation
    row = _training_eval(read_metrics(workdir))
    assert row["train_eval.step"] == 3 and row["train_eval.perplexity.fetched"] == records[3]["eval/perplexity/fetched"]
    saved = json.loads((workdir / "config.json").read_text())
    assert saved["config"]["train"]["eval_every"] == 2


def test_records_of_one_step_merge_and_a_later_value_wins(tmp_path):
    from memlm.train.metrics import read_metrics

    rows = [{"step": 2, "loss": 3.0}, {"step": 2, "eval/perplexity/none": 9.0}, {"step": 4, "loss": 2.0},
            {"step": 4, "loss": 2.5}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert read_metrics(tmp_path) == [{"step": 2, "loss": 3.0, "eval/perplexity/none": 9.0}, {"step": 4, "loss": 2.5}]


@pytest.mark.skipif(__import__("importlib").util.find_spec("wandb") is None,
                    reason="wandb is not installed (pip install 'memlm[track]')")
def test_wandb_records_offline_the_rows_of_metrics_jsonl_and_resumes_the_same_run(facts_data, tmp_path, monkeypatch):
    from memlm.train.loop import train
    from memlm.train.metrics import read_metrics

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = _cfg(4)
    cfg.train.update(eval_every=0, trackers="tensorboard,wandb", checkpoint_every=2)
    workdir = tmp_path / "run"
    train(cfg, facts_data, workdir, quiet=True)
    run_id = (workdir / "wandb_id").read_text().strip()
    history = _wandb_history(workdir, run_id)
    rows = {r["step"]: r for r in read_metrics(workdir)}
    assert sorted(history) == sorted(rows) == [2, 4]
    for step, row in rows.items():
        assert history[step]["loss"] == pytest.approx(row["loss"]) and history[step]["tokens_per_s"] > 0
    cfg.train.steps = 6  # resumed: the same wandb run goes on
    train(cfg, facts_data, workdir, quiet=True, allow_config_change=True)
    assert (workdir / "wandb_id").read_text().strip() == run_id
    assert 6 in _wandb_history(workdir, run_id)


def _wandb_history(workdir, run_id: str) -> dict[int, dict]:
    """The history rows of the offline wandb runs with this id, read from their ``.wandb`` files (a
    LevelDB-style log of protobuf records: 32 KiB blocks, 7-byte record headers)."""
    import struct

    from wandb.proto import wandb_internal_pb2

    out: dict[int, dict] = {}
    for path in sorted((workdir / "wandb").glob(f"offline-run-*-{run_id}/run-{run_id}.wandb")):
        data, pos, pending, records = path.read_bytes(), 7, b"", []
        while pos + 7 <= len(data):
            left = 32768 - pos % 32768
            _, length, kind = struct.unpack("<IHB", data[pos:pos + 7]) if left >= 7 else (0, 0, 0)
            if left < 7 or (length == 0 and kind == 0):
                pos += left
                continue
            chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
            if kind in (1, 4):
                records.append(pending + chunk)
                pending = b""
            else:
                pending += chunk
        for raw in records:
            rec = wandb_internal_pb2.Record()
            rec.ParseFromString(raw)
            if rec.WhichOneof("record_type") == "history":
                out[rec.history.step.num] = {"/".join(i.nested_key) or i.key: json.loads(i.value_json)
                                             for i in rec.history.item}
    return out


def test_an_unknown_tracker_is_refused_naming_the_key():
    from memlm.config import ConfigError, apply_overrides, validate

    cfg = load_config("experiments/tiny.py")
    with pytest.raises(ConfigError, match="train.trackers.*unknown tracker 'mlflow'"):
        validate(apply_overrides(cfg, {"train.trackers": "tensorboard,mlflow"}))
