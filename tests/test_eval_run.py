"""memlm eval / generate on a trained run, with a probe file that is not the built-in one."""

import json

import pytest

from memlm.config import load_config
from memlm.demo import demo_configs
from memlm.model.accounting import accounting

SMALL = dict(d_model=32, n_layers=2, n_heads=2, head_dim=16, d_ff=64)


@pytest.fixture(scope="module")
def trained_run(facts_data, tmp_path_factory):
    from memlm.train.loop import train

    cfg = load_config("experiments/tiny.py")
    cfg.model.update(SMALL)
    cfg.tree.embedder = "hash"
    cfg.train.update(mode="scratch", steps=4, batch_size=8, log_every=2, checkpoint_every=4)
    cfg.mesh.update(data=-1, fsdp=1, tensor=1)  # the 8 test devices
    cfg.eval.update(batch_size=4, max_new_tokens=4, heldout_documents=4)
    workdir = tmp_path_factory.mktemp("run")
    train(cfg, facts_data, workdir, quiet=True)
    return workdir


def test_eval_on_a_custom_probe_file_writes_every_condition(trained_run, tmp_path):
    from memlm.eval.run import evaluate

    probes = tmp_path / "islands.jsonl"
    items = [
        {"prompt": "The capital of Iceland is", "answer": "Reykjavik", "bucket": "rare"},
        {"prompt": "The atomic number of tin is", "answer": "50", "bucket": "rare", "context": "tin element"},
        {"prompt": "The capital of France is", "answer": "Paris", "bucket": "common"},
    ]
    probes.write_text("".join(json.dumps(i) + "\n" for i in items))
    results = evaluate(trained_run, probes=str(probes))
    res = results["islands"]
    assert set(res["conditions"]) == {"none", "generic", "fetched", "blocked"}
    for r in res["conditions"].values():
        assert r["n"] == 3 and set(r["by_bucket"]) == {"rare", "common"}
        assert 0.0 <= r["accuracy"] <= 1.0
    saved = json.loads((trained_run / "eval" / "islands.json").read_text())
    assert saved["conditions"] == res["conditions"]
    assert set(saved["perplexity"]) == {"none", "generic", "fetched", "blocked"}
    assert (trained_run / "eval" / "islands.png").exists()


def test_blocked_routing_never_uses_the_texts_own_level1_node(trained_run):
    from memlm.eval.run import load_run

    run = load_run(trained_run)
    texts = ["The capital of Iceland is", "The atomic number of tin is", "oxygen is a gas"]
    fetched = run.memory.paths(texts, "fetched")
    blocked = run.memory.paths(texts, "blocked")
    level = run.cfg.eval.block_level
    assert (fetched[:, level - 1] != blocked[:, level - 1]).all()


def test_generate_prints_the_prompt_and_its_continuation(trained_run, capsys):
    from memlm.serve.generate import generate_cli

    text = generate_cli(str(trained_run), "The capital of France is", max_new_tokens=4)
    out = capsys.readouterr().out
    assert out.startswith("The capital of France is" + text)
    assert "fetched memory [path" in out


def test_demo_dense_baseline_has_anchor_plus_fetched_parameters():
    cfgs = demo_configs(load_config("experiments/tiny.py"))
    anchor, memory, dense = (accounting(cfgs[k]) for k in ("anchor", "memory", "dense"))
    assert dense["anchor_params"] == anchor["anchor_params"] + memory["fetched_params"]
    assert cfgs["dense"].train.steps == cfgs["memory"].train.steps and cfgs["dense"].train.lr == cfgs["memory"].train.lr
