"""``prepare`` end to end on tiny corpora with the hashing embedder: shards hold every training token
once, sequences keep to one leaf, bad input is counted, stages are reused or rerun as their inputs say."""

import importlib.util
import json

import numpy as np
import pytest
from rich.console import Console

from memlm.config import load_config
from memlm.data import DataError, make_loader, prepare
from memlm.data.readers import iter_documents
from memlm.data.records import decode_segments
from memlm.data.tokenizer import Tokenizer

pytestmark = pytest.mark.slow  # end-to-end prepare / convert runs in module-scoped fixtures

TOPICS = {
    "sea": "wave tide salt coral reef whale shark harbour boat sail storm current",
    "space": "star planet orbit comet nebula galaxy rocket moon telescope gravity",
    "food": "bread cheese olive tomato basil flour oven pepper garlic butter",
    "music": "violin chord melody rhythm drum guitar tempo octave choir piano",
}


def make_corpus(path, n=96, seed=0, extra: list[bytes] = ()):
    rng = np.random.default_rng(seed)
    lines = []
    for i in range(n):
        topic = list(TOPICS)[i % 4]
        words = rng.choice(TOPICS[topic].split(), size=int(rng.integers(3, 60)))
        lines.append(json.dumps({"text": " ".join(words) + ".", "topic": topic, "i": i}).encode())
    path.write_bytes(b"\n".join(lines + list(extra)) + b"\n")
    return str(path)


def tiny_cfg(**tree):
    cfg = load_config(None)
    cfg.tree.update(dict(embedder="hash", k=2, depth=2, kmeans_steps=3, kmeans_batch=64), **tree)
    cfg.data.update(seq_len=48, tokenizer_vocab=320, records_per_shard=16)
    cfg.eval.heldout_documents = 6
    return cfg


QUIET = Console(quiet=True)


def shard_records(out, manifest):
    from array_record.python.array_record_module import ArrayRecordReader

    records = []
    for shard in manifest["shards"]:
        reader = ArrayRecordReader(str(out / shard))
        records += [reader.read() for _ in range(reader.num_records())]
        reader.close()
    return records


def training_docs(src, out):
    heldout = set(np.load(out / "heldout_ids.npy").tolist())
    return [d for i, d in enumerate(iter_documents(src, report=None)) if i not in heldout]


def check_shards(out, manifest, src, window=None):
    """Every training document's tokens appear exactly once, in order, followed by one EOT; every
    segment's unit was routed to the record's leaf; manifest counts agree with the shards."""
    tok = Tokenizer.from_file(out / "tokenizer.json", 64)
    docs = training_docs(src, out)
    encoded = [tok.encode(d.text) for d in docs]
    if window is None:
        unit_doc, unit_start = np.arange(len(docs)), np.zeros(len(docs), int)
    else:
        per = [max(1, -(-len(e) // window)) for e in encoded]
        unit_doc = np.repeat(np.arange(len(docs)), per)
        unit_start = np.concatenate([np.arange(p) * window for p in per])
    paths = np.load(out / "paths.npy")
    assert len(paths) == len(unit_doc) == manifest["tree"]["units"]
    rebuilt = [[] for _ in docs]
    leaf_sequences = np.zeros(manifest["k"] ** manifest["depth"], int)
    records = shard_records(out, manifest)
    for rec in records:
        seg = decode_segments(rec)
        leaf_sequences[seg["leaf"]] += 1
        assert seg["path"][-1] == seg["leaf"]
        off = 0
        for length, unit, start in zip(seg["seg_lens"], seg["units"], seg["starts"], strict=True):
            assert paths[unit].tolist() == seg["path"].tolist(), "a sequence mixes leaf clusters"
            rebuilt[unit_doc[unit]].append((unit_start[unit] + start, seg["tokens"][off:off + length].tolist()))
            off += length
    assert len(records) == manifest["sequences"]
    assert leaf_sequences.tolist() == manifest["leaf_histogram"]["sequences"]
    for d, pieces in enumerate(rebuilt):
        tokens = [t for _, part in sorted(pieces) for t in part]
        assert tokens == encoded[d].tolist() + [tok.eot_id], f"document {d} is not packed exactly once"
    assert manifest["tokens"]["training"] == sum(len(e) for e in encoded)
    assert manifest["tokens"]["packed"] == manifest["tokens"]["training"] + len(docs)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    d = tmp_path_factory.mktemp("prep")
    src = make_corpus(d / "corpus.jsonl", extra=[b'{"text": ""}', b'{"text": "bad \xff byte"}', b'{"text": "  "}'])
    out = d / "out"
    return src, out, prepare(tiny_cfg(), src, out, console=QUIET)


def test_prepare_packs_every_training_token_once_per_leaf_and_counts_bad_input(prepared):
    src, out, manifest = prepared
    check_shards(out, manifest, src)
    docs = manifest["documents"]
    assert (docs["documents"], docs["skipped_empty"], docs["undecodable"]) == (96, 2, 1)
    assert docs["heldout"] == 6 and docs["training"] == 90
    assert any(":98: not UTF-8" in p for p in manifest["problems"])
    assert len(manifest["shards"]) == -(-manifest["sequences"] // 16)
    assert manifest["tokenizer"]["vocab_size"] == 320 and manifest["tree"]["embedder"] == "hash"
    assert json.loads((out / "manifest.json").read_text()) == manifest


def test_heldout_documents_are_written_and_never_packed(prepared):
    src, out, manifest = prepared
    heldout = [json.loads(line) for line in (out / "heldout.jsonl").read_text().splitlines()]
    assert len(heldout) == 6 and all("topic" in h for h in heldout)
    training_ids = {d.fields["i"] for d in training_docs(src, out)}
    assert not training_ids & {h["i"] for h in heldout}
    assert len(training_ids) + len(heldout) == 96


def test_paths_are_the_trees_routes_of_independently_embedded_documents(prepared):
    from memlm.retrieval import Tree, get_embedder, route

    src, out, _ = prepared
    cfg = tiny_cfg()
    tree = Tree.load(out / "tree.npz")
    texts = [d.text for d in training_docs(src, out)]
    assert np.array_equal(route(tree, get_embedder(cfg).embed(texts)), np.load(out / "paths.npy"))


def test_loader_reads_prepared_data(prepared):
    _, out, manifest = prepared
    cfg = tiny_cfg()
    cfg.train.batch_size = 4
    b = next(iter(make_loader(cfg, out, process_index=0, process_count=1)))
    assert b["tokens"].shape == (4, 48) and b["paths"].shape == (4, 2)
    assert (b["tokens"][b["segment_ids"] > 0] < manifest["tokenizer"]["vocab_size"]).all()
    cfg.data.seq_len = 32
    with pytest.raises(ValueError, match="packed with seq_len 48"):
        make_loader(cfg, out, process_index=0, process_count=1)


def ran(manifest):
    return sorted(k for k, v in manifest["stages"].items() if not v["reused"])


def test_rerun_reuses_stages_and_changes_rerun_only_their_dependents(tmp_path):
    src = make_corpus(tmp_path / "c.jsonl", n=60, seed=1)
    out = tmp_path / "out"
    first = prepare(tiny_cfg(), src, out, console=QUIET)
    every = ["encode", "pack", "read", "route", "scan", "tokenizer", "tree"]
    assert ran(first) == every
    second = prepare(tiny_cfg(), src, out, console=QUIET)
    assert ran(second) == []
    assert {k: v for k, v in second.items() if k != "stages"} == {k: v for k, v in first.items() if k != "stages"}

    cfg = tiny_cfg(kmeans_steps=4)
    assert ran(prepare(cfg, src, out, console=QUIET)) == ["pack", "route", "tree"]
    cfg.data.seq_len = 40
    changed = prepare(cfg, src, out, console=QUIET)
    assert ran(changed) == ["pack"] and changed["seq_len"] == 40
    check_shards(out, changed, src)
    cfg.data.tokenizer_vocab = 300  # new tokens: the units are encoded (and embedded) again
    assert ran(prepare(cfg, src, out, console=QUIET)) == ["encode", "pack", "route", "tokenizer", "tree"]

    make_corpus(tmp_path / "c.jsonl", n=61, seed=1)
    assert ran(prepare(cfg, src, out, console=QUIET)) == every


def test_window_units_split_documents_and_keep_eot_at_document_ends(tmp_path):
    src = make_corpus(tmp_path / "c.jsonl", n=40, seed=2)
    out = tmp_path / "out"
    manifest = prepare(tiny_cfg(embed_unit="window", embed_window=16), src, out, console=QUIET)
    assert manifest["tree"]["units"] > manifest["documents"]["training"]
    check_shards(out, manifest, src, window=16)


def test_corpus_smaller_than_the_leaf_count_is_a_clear_error(tmp_path):
    src = make_corpus(tmp_path / "c.jsonl", n=7)
    with pytest.raises(DataError, match=r"7 training documents, fewer than the tree's 8 leaves \(tree.k = 2, "
                                        r"tree.depth = 3\)"):
        prepare(tiny_cfg(depth=3), src, tmp_path / "out", console=QUIET)


def test_empty_corpus_file_is_a_clear_error(tmp_path):
    from memlm.data import CorpusError

    (tmp_path / "empty.jsonl").write_bytes(b"")
    with pytest.raises(CorpusError, match="has no documents"):
        prepare(tiny_cfg(), str(tmp_path / "empty.jsonl"), tmp_path / "out", console=QUIET)


@pytest.mark.skipif(any(importlib.util.find_spec(p) is None for p in ("periodictable", "countryinfo", "mendeleev")),
                    reason="the facts corpus needs periodictable, countryinfo and mendeleev (data extras)")
def test_facts_corpus_prepares_with_probes_bucketed_by_training_mentions(tmp_path):
    from memlm.corpora import facts

    cfg = tiny_cfg(k=4)
    cfg.data.facts_documents = 800
    out = tmp_path / "out"
    manifest = prepare(cfg, "facts", out, console=QUIET)
    check_shards(out, manifest, str(out / "corpus" / "facts.jsonl"))
    counts = facts.count_mentions((d.text for d in training_docs(str(out / "corpus" / "facts.jsonl"), out)),
                                  [e.name for e in facts.entities()])
    probe = [json.loads(line) for line in (out / manifest["probes"]["atomic_number"]).read_text().splitlines()]
    assert len(probe) == 118 and {p["bucket"] for p in probe} == {"0", "1", "2", "3", "4"}
    assert all(p["mentions"] == counts[p["entity"]] for p in probe)
    assert (out / manifest["probes"]["capital"]).is_file()
    assert sum(manifest["mention_histogram"].values()) == len(counts)
