"""Serving a bank on stock engines: ``memlm export --serve`` / ``--merge-path`` and ``memlm route``.

The fixture (tests/fixtures/serve/, written by tests/serve_fixture_setup.py) is a tiny FFN-memory
run on the converted Llama fixture with a trained (4, 4) bank and a generic memory, its ``--serve``
export, and ``golden.npz``: what transformers + PEFT compute on that export
(tests/make_serve_fixtures.py). Here, with no torch: the export memlm writes today is the one the
golden files were made from, and memlm's own ``none`` / ``fetched`` / ``generic`` logits equal
transformers' on the padded base alone / with the path's adapter / with the generic adapter.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from serve_fixture_setup import FIX, materialise

from memlm.cli import main

KL_MAX = 1e-5
TEXTS = [" ".join(w) for w in (
    ("the", "quick", "brown", "fox"), ("a", "memory", "bank"), ("common", "knowledge"), ("tiny", "models", "read"),
    ("the", "lazy", "dog"), ("every", "token", "counts"), ("anchor", "keeps", "the", "long", "tail"), ("jumps",),
    ("over", "the", "memory"), ("texts", "and", "knowledge"), ("holds", "the", "quick", "tail"), ("",))]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    from memlm.infer.run import load_run

    root = tmp_path_factory.mktemp("serve")
    run_dir = materialise(root / "run")
    return run_dir, load_run(run_dir)


@pytest.fixture(scope="module")
def golden():
    return dict(np.load(FIX / "golden.npz")), json.loads((FIX / "prompts.json").read_text())


def _kl(p_logits: np.ndarray, q_logits: np.ndarray) -> np.ndarray:
    """Per-token KL(p || q) of two logit arrays [T, V], in float64."""
    def log_softmax(x):
        x = np.asarray(x, np.float64)
        x = x - x.max(-1, keepdims=True)
        return x - np.log(np.exp(x).sum(-1, keepdims=True))

    lp, lq = log_softmax(p_logits), log_softmax(q_logits)
    return np.sum(np.exp(lp) * (lp - lq), -1)


def _memlm_logits(loaded, ids: list[int], memory) -> np.ndarray:
    tokens = jnp.asarray([ids], jnp.int32)
    ones = jnp.ones_like(tokens)
    positions = jnp.arange(len(ids), dtype=jnp.int32)[None]
    return np.asarray(loaded.fn.apply(loaded.params, tokens, ones, positions, memory=memory))[0]


def _compare(memlm: np.ndarray, hf: np.ndarray) -> float:
    kl = _kl(hf, memlm)
    assert kl.max() < KL_MAX, kl.max()
    np.testing.assert_array_equal(memlm.argmax(-1), hf.argmax(-1))
    return float(kl.max())


def test_reexport_is_the_golden_export(run, tmp_path):
    """Exporting the fixture run today writes exactly the files the golden outputs were made from."""
    run_dir, _ = run
    assert main(["export", str(run_dir), "--serve", "--out", str(tmp_path / "x")]) == 0
    want = sorted(p.relative_to(FIX / "export") for p in (FIX / "export").rglob("*") if p.is_file())
    have = sorted(p.relative_to(tmp_path / "x") for p in (tmp_path / "x").rglob("*") if p.is_file())
    assert have == want
    for rel in want:
        if rel.name != "memlm_serve.json":  # names the run's (scratch) location
            assert (tmp_path / "x" / rel).read_bytes() == (FIX / "export" / rel).read_bytes(), rel
    base = json.loads((tmp_path / "x" / "base" / "config.json").read_text())
    assert base["intermediate_size"] == 48 + 8 and base["model_type"] == "llama"
    adapter = json.loads((tmp_path / "x" / "adapters" / "path-0-0" / "adapter_config.json").read_text())
    assert adapter["r"] == adapter["lora_alpha"] == 8 and adapter["layers_to_transform"] == [0, 1, 2]


def test_padded_base_is_the_anchor(run, golden):
    """transformers on the padded base alone = memlm's ``none`` logits."""
    _, loaded = run
    g, prompts = golden
    kls = [_compare(_memlm_logits(loaded, ids, None), g["base_logits"][i, : len(ids)])
           for i, ids in enumerate(prompts["ids"])]
    print(f"padded base vs none: max per-token KL {max(kls):.2e}")


def test_path_adapter_is_the_fetched_memory(run, golden):
    """base + the adapter of a prompt's path (one at a time, and PEFT's mixed batch) = memlm's ``fetched``;
    base + ``generic`` = memlm's ``generic``; greedy tokens are equal."""
    from memlm.infer.generate import generate

    _, loaded = run
    g, prompts = golden
    kls = []
    for i, (text, ids) in enumerate(zip(prompts["texts"], prompts["ids"], strict=True)):
        fetched = loaded.memory([text], "fetched")
        logits = _memlm_logits(loaded, ids, fetched)
        kls.append(_compare(logits, g["adapter_logits"][i, : len(ids)]))
        kls.append(_compare(logits, g["mixed_logits"][i, : len(ids)]))
        kls.append(_compare(_memlm_logits(loaded, ids, loaded.memory([text], "generic")),
                            g["generic_logits"][i, : len(ids)]))
        out = generate(loaded.fn, loaded.params, [ids], fetched, int(prompts["new_tokens"]), loaded.tokenizer.eot_id)
        assert out[0] == g["adapter_greedy"][i, : len(out[0])].tolist()
        assert not np.allclose(logits, g["base_logits"][i, : len(ids)], atol=1e-3)  # the memory matters
    print(f"adapters vs fetched / generic: max per-token KL {max(kls):.2e}")


def test_merged_path_is_base_plus_its_lora_delta(run, tmp_path):
    """``--merge-path 0,1``: the padded base's FFN plus the adapter's delta, exactly; other tensors unchanged."""
    from memlm.convert.safetensors import Checkpoint

    run_dir, _ = run
    assert main(["export", str(run_dir), "--merge-path", "0,1", "--out", str(tmp_path / "m")]) == 0
    merged, base = Checkpoint(tmp_path / "m"), Checkpoint(FIX / "export" / "base")
    adapter = Checkpoint(FIX / "export" / "adapters" / "path-0-1" / "adapter_model.safetensors")
    assert merged.names() == base.names()
    changed = 0
    for name in base.names():
        module = name.removesuffix(".weight")
        key = f"base_model.model.{module}.lora_A.weight"
        want = np.asarray(base.get(name), np.float64)
        if key in adapter:
            want = want + adapter.get(f"base_model.model.{module}.lora_B.weight").astype(np.float64) @ adapter.get(key)
            changed += 1
        np.testing.assert_array_equal(merged.get(name), want.astype(np.float32), err_msg=name)
    assert changed == 9  # gate / up / down of the 3 memory layers
    assert json.loads((tmp_path / "m" / "config.json").read_text())["intermediate_size"] == 56


def test_merged_path_by_text_is_the_routed_path(run, tmp_path):
    run_dir, loaded = run
    text = TEXTS[1]
    assert main(["export", str(run_dir), "--merge-path", text, "--out", str(tmp_path / "t")]) == 0
    path = ",".join(str(int(n)) for n in loaded.memory.paths([text])[0])
    assert main(["export", str(run_dir), "--merge-path", path, "--out", str(tmp_path / "n")]) == 0
    for f in ("model.safetensors", "config.json"):
        assert (tmp_path / "t" / f).read_bytes() == (tmp_path / "n" / f).read_bytes()


def test_router_equals_memlm_routing(run, capsys):
    """The exported router (numpy descent) names each text's greedy memlm path; ``memlm route`` prints it."""
    from memlm.retrieval import HashingEmbedder
    from memlm.serve.descent import adapter_name
    from memlm.serve.router import Router

    _, loaded = run
    rng = np.random.default_rng(0)
    words = sorted({w for t in TEXTS for w in t.split()})
    texts = TEXTS + [" ".join(rng.choice(words, size=int(rng.integers(1, 12)))) for _ in range(300)]
    router = Router(FIX / "export")
    want = [adapter_name(p, 2) for p in loaded.memory.paths(texts)]
    assert router.names(texts) == want
    emb = HashingEmbedder().embed(texts)
    np.testing.assert_array_equal(router.paths(emb), loaded.memory.paths(texts))
    assert len(set(want)) == 4  # every leaf is reached
    capsys.readouterr()
    assert main(["route", "--serve", str(FIX / "export"), "--text", texts[0]]) == 0
    assert capsys.readouterr().out.strip() == want[0]


def test_paths_top_n_and_for_text(run, tmp_path):
    run_dir, loaded = run
    assert main(["export", str(run_dir), "--serve", "--paths", "2", "--out", str(tmp_path / "top")]) == 0
    manifest = json.loads((run_dir.parent / "data" / "manifest.json").read_text())
    counts = np.asarray(manifest["leaf_histogram"]["sequences"])
    top = {f"path-{leaf // 2}-{leaf}" for leaf in np.argsort(-counts, kind="stable")[:2]}
    assert {p.name for p in (tmp_path / "top" / "adapters").iterdir()} == top | {"generic"}
    text = TEXTS[0]
    assert main(["export", str(run_dir), "--serve", "--paths", f"for:{text}", "--out", str(tmp_path / "one")]) == 0
    path = loaded.memory.paths([text])[0]
    assert {p.name for p in (tmp_path / "one" / "adapters").iterdir()} == {f"path-{path[0]}-{path[1]}", "generic"}


def _edited(run_dir: Path, dst: Path, **model_or_memory) -> Path:
    import shutil

    shutil.copytree(run_dir.parent, dst)
    record = json.loads((dst / "memory" / "config.json").read_text())
    for key, value in model_or_memory.items():
        section, name = key.split("__")
        record["config"][section][name] = value
    (dst / "memory" / "config.json").write_text(json.dumps(record))
    return dst / "memory"


@pytest.mark.parametrize("edit, words", [
    ({"memory__type": "kv"}, "kv memory has no LoRA form"),
    ({"model__norm": "layernorm", "model__qk_norm": True, "model__qk_norm_scope": "full"}, "no Hugging Face"),
])
def test_no_lora_form_fails_in_one_line(run, tmp_path, capsys, edit, words):
    """A KV-memory run and a run with memlm's OpenLM anchor: ``memlm export --serve`` says why, in one line."""
    run_dir, _ = run
    edited = _edited(run_dir, tmp_path / "e", **edit)
    capsys.readouterr()
    assert main(["export", str(edited), "--serve", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("memlm export: error: ") and words in err[0], err
    assert not (tmp_path / "out").exists()


def test_router_descent_imports_neither_jax_nor_the_model():
    """A routing proxy loads the router and descends with numpy alone (the embedder is its only other need)."""
    import subprocess
    import sys

    code = ("import sys, numpy as np; from memlm.serve.router import Router; r = Router(sys.argv[1]); "
            "p = r.paths(np.ones((2, r.doc['dim']), np.float32)); assert p.shape == (2, 2); "
            "bad = [m for m in sys.modules if m == 'jax' or m.startswith(('memlm.model', 'memlm.retrieval'))]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code, str(FIX / "export")], check=True, cwd=Path(__file__).parents[1])
