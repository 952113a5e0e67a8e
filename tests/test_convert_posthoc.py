"""Post-hoc memories on a converted model, end to end through the command line (CPU, tiny).

A converted Llama-family checkpoint is the frozen anchor: a corpus is prepared with its tokenizer
(the HF eos as the document separator), a hierarchical FFN-memory is trained on it with
``--init-from CONVERTED --config.train.mode=frozen --config CONVERTED``, ``memlm eval`` compares
none / generic / fetched, the anchor comes back out bit-exact with ``--to-hf``, and ``memlm export``
writes the bank so that an outside reader rebuilds exactly the memory memlm fetches.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import numpy as np
import pytest
import tensorstore as ts

from memlm.cli import main

pytestmark = pytest.mark.slow  # end-to-end prepare / convert runs in module-scoped fixtures

FIX = Path(__file__).resolve().parent / "fixtures" / "convert"
TOPICS = (
    ["the", "quick", "brown", "fox", "jumps", "over", "the", "lazy", "dog"],
    ["a", "memory", "bank", "holds", "the", "long", "tail", "anchor", "keeps"],
    ["common", "knowledge", "tiny", "models", "read", "texts", "and", "every", "token", "counts"],
)
TREE = ["--config.tree.k=2", "--config.tree.depth=2", "--config.tree.embedder=hash"]


def _corpus(path: Path, n: int = 96) -> None:
    """Documents on three word topics (so the tree has something to separate)."""
    rng = np.random.default_rng(0)
    with open(path, "w") as f:
        for i in range(n):
            words = TOPICS[i % 3]
            text = " ".join(words[j] for j in rng.integers(0, len(words), size=int(rng.integers(8, 20))))
            f.write(json.dumps({"text": text}) + "\n")


def _run(*argv):
    rc = main([str(a) for a in argv])
    assert rc == 0, argv


@pytest.fixture(scope="module")
def posthoc(tmp_path_factory):
    root = tmp_path_factory.mktemp("posthoc")
    conv, data, run = root / "converted", root / "data", root / "memory"
    _run("convert", "--from-hf", FIX / "llama", "--out", conv, "--config.model.remat=none", "--config.data.seq_len=32")
    _corpus(root / "corpus.jsonl")
    # The converted run's config carries the architecture and data.tokenizer = CONVERTED/hf/tokenizer.json.
    _run("prepare", "--config", conv, "--corpus", root / "corpus.jsonl", "--out", data, *TREE,
         "--config.eval.heldout_documents=8")
    memory = ["--config.memory.type=ffn", "--config.memory.sizes=(4,4)", "--config.memory.generic=true"]
    train = ["--config.train.mode=frozen", "--config.train.steps=8", "--config.train.batch_size=8",
             "--config.train.log_every=4", "--config.train.checkpoint_every=8", "--config.train.memory_lr=0.05",
             "--config.train.memory_warmup_steps=1"]
    _run("train", "--config", conv / "config.json", "--init-from", conv, "--data", data, "--workdir", run,
         *TREE, *memory, *train)
    probes = root / "probes.jsonl"
    probes.write_text("".join(json.dumps({"prompt": " ".join(t[:3]), "answer": t[3], "bucket": str(i)}) + "\n"
                              for i, t in enumerate(TOPICS)))
    _run("eval", "--workdir", run, "--probes", probes, "--conditions", "none,generic,fetched")
    # the converted model's own held-out perplexity: what the frozen anchor must score alone (no probes needed)
    _run("eval", "--workdir", conv, "--data", data, "--perplexity-only", "--conditions", "none")
    return root, conv, data, run


def test_generate_on_the_converted_run_equals_transformers(posthoc, capsys):
    """``memlm generate`` on a converted run: the HF tokenizer, the anchor alone, transformers' greedy tokens."""
    from memlm.data.tokenizer import Tokenizer

    _, conv, _, _ = posthoc
    ref = np.load(FIX / "llama" / "reference.npz")
    prompt = str(ref["prompts"][0])
    capsys.readouterr()
    _run("generate", "--workdir", conv, "--prompt", prompt, "--max-new-tokens", "20")
    out = capsys.readouterr().out.splitlines()
    tok = Tokenizer.from_file(conv / "hf" / "tokenizer.json", 1)
    want = ref["generated"][0].tolist()
    if tok.eot_id in want:  # the command stops at the end-of-sequence token
        want = want[: want.index(tok.eot_id)]
    assert out[0] == prompt + tok.decode(want)
    assert "none memory" in out[1]


def test_prepare_uses_the_converted_tokenizer_and_its_eos(posthoc):
    root, conv, data, _ = posthoc
    manifest = json.loads((data / "manifest.json").read_text())
    assert manifest["tokenizer"]["eot"] == "<|eot_id|>"  # the HF folder's eos_token
    hf_tok = json.loads((conv / "hf" / "tokenizer.json").read_text())
    assert json.loads((data / "tokenizer.json").read_text())["model"] == hf_tok["model"]
    from memlm.data.tokenizer import Tokenizer

    tok = Tokenizer.from_file(data / "tokenizer.json", 1)
    ids = {t["content"]: t["id"] for t in hf_tok["added_tokens"]}
    assert tok.eot_id == ids["<|eot_id|>"] != ids["<|end_of_text|>"]


def test_prepare_puts_the_bos_at_each_document_start(posthoc):
    """A BOS model (Llama 3's template) trains on documents as it read them in pretraining: each packed
    document starts with <|begin_of_text|>, and documents are still separated by the EOT."""
    from array_record.python.array_record_module import ArrayRecordReader

    from memlm.data.records import decode_segments
    from memlm.data.tokenizer import Tokenizer

    root, _, data, _ = posthoc
    manifest = json.loads((data / "manifest.json").read_text())
    tok = Tokenizer.from_file(data / "tokenizer.json", 1)
    bos = tok._tok.token_to_id("<|begin_of_text|>")
    assert manifest["tokenizer"]["template"] == {"prefix": [bos], "suffix": []}
    texts = [json.loads(line)["text"] for line in (root / "corpus.jsonl").read_text().splitlines()]
    heldout = {json.loads(line)["text"] for line in (data / "heldout.jsonl").read_text().splitlines()}
    starts, ends, seen = 0, 0, []
    for shard in manifest["shards"]:
        reader = ArrayRecordReader(str(data / shard))
        for _ in range(reader.num_records()):
            seg = decode_segments(reader.read())
            at = np.concatenate([[0], np.cumsum(seg["seg_lens"])[:-1]])
            for a, n, start in zip(at, seg["seg_lens"], seg["starts"], strict=True):
                piece = seg["tokens"][a: a + n].tolist()
                if start == 0:  # a document's first piece
                    assert piece[0] == bos
                    seen.append(piece)
                    starts += 1
                ends += piece[-1] == tok.eot_id
        reader.close()
    train = [t for t in texts if t not in heldout]
    assert starts == ends == len(train)
    full = [tok.encode(t).tolist() + [tok.eot_id] for t in train]  # the ids transformers gives, and the EOT
    assert all(any(f[: len(piece)] == piece for f in full) for piece in seen)  # long ones are cut at seq_len


def test_data_tokenized_without_the_template_is_refused_by_train_and_eval(posthoc, tmp_path, capsys):
    """Data prepared before templates were applied (no ``template`` in the manifest) for a BOS model:
    ``memlm train`` and ``memlm eval`` say to prepare again, in one line."""
    import shutil

    root, conv, data, run = posthoc
    old = tmp_path / "old_data"
    shutil.copytree(data, old)
    manifest = json.loads((old / "manifest.json").read_text())
    del manifest["tokenizer"]["template"]
    (old / "manifest.json").write_text(json.dumps(manifest))
    capsys.readouterr()
    assert main(["train", "--config", str(conv / "config.json"), "--init-from", str(conv), "--data", str(old),
                 "--workdir", str(tmp_path / "r"), "--config.train.mode=frozen", "--config.memory.type=ffn",
                 "--config.memory.sizes=(4,4)", *TREE]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "run `memlm prepare` again" in err[0], err
    assert main(["eval", "--workdir", str(conv), "--data", str(old), "--conditions", "none"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "run `memlm prepare` again" in err[0], err


def test_frozen_memory_training_on_the_converted_anchor(posthoc):
    root, conv, data, run = posthoc
    cfg = json.loads((run / "config.json").read_text())
    conv_cfg = json.loads((conv / "config.json").read_text())
    assert cfg["config"]["model"] == conv_cfg["config"]["model"]  # the converted architecture, unchanged
    losses = [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 2 and losses[-1] < losses[0]
    result = json.loads((run / "eval" / "probes.json").read_text())
    assert set(result["conditions"]) == {"none", "generic", "fetched"}
    ppl = result["perplexity"]
    # the frozen anchor alone scores as the converted model does; the trained memory changes the model
    base = json.loads((conv / "eval" / "perplexity.json").read_text())["perplexity"]["none"]
    assert ppl["none"] == pytest.approx(base, rel=1e-5)
    assert ppl["fetched"] != pytest.approx(ppl["none"], rel=1e-4)
    assert ppl["fetched"] < ppl["none"]


def test_memory_run_anchor_exports_bit_exact(posthoc, tmp_path):
    from memlm.convert.safetensors import Checkpoint

    _, _, _, run = posthoc
    _run("convert", "--to-hf", run, "--out", tmp_path / "hf")
    a, b = Checkpoint(FIX / "llama"), Checkpoint(tmp_path / "hf")
    assert a.names() == b.names()
    assert all(a.get(n).tobytes() == b.get(n).tobytes() for n in a.names())
    assert (FIX / "llama" / "config.json").read_bytes() == (tmp_path / "hf" / "config.json").read_bytes()


def test_exported_bank_rebuilds_the_fetched_memory(posthoc, tmp_path):
    """Read the export with tensorstore alone, concatenate a path's blocks as the metadata says,
    and compare with the memory memlm fetches for that text."""
    from memlm.infer.run import load_run

    _, _, _, run = posthoc
    _run("export", run, "--out", tmp_path / "export")
    meta = json.loads((tmp_path / "export" / "memlm_bank.json").read_text())
    assert meta["memory"]["type"] == "ffn" and meta["tree"]["k"] == 2 and meta["generic"] is not None

    def read(rel):
        return ts.open({"driver": "zarr3", "kvstore": {"driver": "file", "path": str(tmp_path / "export" / rel)}},
                       open=True).result().read().result()

    loaded = load_run(run)
    text = " ".join(TOPICS[1][:4])
    path = loaded.memory.paths([text])[0]
    fetched = jax.device_get(loaded.memory([text], "fetched"))
    generic = jax.device_get(loaded.memory([text], "generic"))
    for name in ("w1", "w2", "w3"):
        levels = meta["bank"]["levels"]
        parts = [read(lv["arrays"][name]["path"])[path[lv["level"] - 1]] for lv in levels]
        axis = levels[0]["arrays"][name]["rank_axis"] - 1
        np.testing.assert_array_equal(np.concatenate(parts, axis=axis), fetched[name][0])
        np.testing.assert_array_equal(read(meta["generic"]["arrays"][name]["path"])[0], generic[name][0])
    assert np.abs(fetched["w3"]).max() > 0  # trained: w3 starts at zero
    centroids = read(meta["tree"]["centroids"]["1"])
    assert centroids.shape == (2, meta["tree"]["dim"])
