"""Corpus readers and the tokenizer: documents kept, bad input counted or refused, round trips exact."""

import gzip
import importlib.util
import json
import os
import pickle
import random
import zlib

import numpy as np
import pytest
import zstandard

from memlm.data.readers import (
    MAX_REPORTED,
    CorpusError,
    ReadStats,
    corpus_fingerprint,
    corpus_shards,
    iter_documents,
    iter_shard,
)
from memlm.data.tokenizer import EOT, Tokenizer, TokenizerError, train_bpe


def write_lines(path, lines: list[bytes]) -> str:
    path.write_bytes(b"\n".join(lines) + b"\n")
    return str(path)


def read_all(source, report=None):
    stats = ReadStats()
    docs = list(iter_documents(source, stats, report=report))
    return docs, stats


def test_jsonl_keeps_other_fields_and_origins(tmp_path):
    src = write_lines(tmp_path / "c.jsonl", [json.dumps({"text": "alpha", "id": 7}).encode(), b"",
                                              json.dumps({"text": "beta", "lang": "en"}).encode()])
    docs, stats = read_all(src)
    assert [d.text for d in docs] == ["alpha", "beta"]
    assert docs[0].fields == {"id": 7} and docs[1].fields == {"lang": "en"}
    assert docs[1].origin.endswith("c.jsonl:3")
    assert (stats.documents, stats.skipped_empty, stats.undecodable) == (2, 0, 0)


def test_empty_documents_are_skipped_and_counted(tmp_path):
    src = write_lines(tmp_path / "c.jsonl", [b'{"text": ""}', b'{"text": "  \\n "}', b'{"text": "kept"}'])
    docs, stats = read_all(src)
    assert [d.text for d in docs] == ["kept"]
    assert stats.skipped_empty == 2 and stats.documents == 1


def test_non_utf8_and_non_json_lines_are_reported_with_file_and_line(tmp_path):
    src = write_lines(tmp_path / "c.jsonl", [b'{"text": "one"}', b'{"text": "bad \xff\xfe bytes"}', b"{not json",
                                              b'{"text": "two"}'])
    messages = []
    docs, stats = read_all(src, report=messages.append)
    assert [d.text for d in docs] == ["one", "two"]
    assert stats.undecodable == 2
    assert messages[0].startswith(f"{src}:2: not UTF-8") and messages[1].startswith(f"{src}:3: not JSON")
    assert stats.problems == messages


def test_missing_text_field_is_an_error_naming_file_and_line(tmp_path):
    src = write_lines(tmp_path / "c.jsonl", [b'{"text": "ok"}', b'{"title": "no text here"}'])
    with pytest.raises(CorpusError, match=r"c\.jsonl:2: record has no 'text' or 'content' or 'body' field "
                                          r"\(set --config.data.text_field=NAME\); its fields: \['title'\]"):
        read_all(src)
    src = write_lines(tmp_path / "d.jsonl", [b'{"text": 5}'])
    with pytest.raises(CorpusError, match=r"d\.jsonl:1: the text is int"):
        read_all(src)


def test_empty_file_and_all_empty_documents_are_errors(tmp_path):
    (tmp_path / "empty.jsonl").write_bytes(b"")
    with pytest.raises(CorpusError, match="has no documents"):
        read_all(str(tmp_path / "empty.jsonl"))
    src = write_lines(tmp_path / "blank.jsonl", [b'{"text": ""}'])
    with pytest.raises(CorpusError, match=r"has no documents \(1 empty skipped"):
        read_all(src)


def test_txt_folder_reads_files_in_order_and_skips_bad_ones(tmp_path):
    folder = tmp_path / "txt"
    (folder / "sub").mkdir(parents=True)
    (folder / "b.txt").write_text("second document\n")
    (folder / "a.txt").write_text("first document\n")
    (folder / "sub" / "c.txt").write_bytes(b"line one\nline \xc3\x28 two\n")
    (folder / "d.txt").write_text("   \n")
    (folder / "notes.md").write_text("ignored")
    messages = []
    docs, stats = read_all(str(folder), report=messages.append)
    assert [d.text for d in docs] == ["first document\n", "second document\n"]
    assert (stats.documents, stats.skipped_empty, stats.undecodable, stats.files) == (2, 1, 1, 4)
    assert "c.txt:2: not UTF-8" in messages[0]


def test_unusable_sources_fail_clearly(tmp_path):
    with pytest.raises(CorpusError, match="does not exist"):
        read_all(str(tmp_path / "nope.jsonl"))
    (tmp_path / "x.xml").write_text("<a/>")
    with pytest.raises(CorpusError, match="unknown file type '.xml'"):
        read_all(str(tmp_path / "x.xml"))
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(CorpusError, match="holds no .txt files"):
        read_all(str(tmp_path / "empty_dir"))


@pytest.mark.skipif(importlib.util.find_spec("pyarrow") is not None, reason="pyarrow is installed")
def test_parquet_without_pyarrow_names_the_package(tmp_path):
    (tmp_path / "c.parquet").write_bytes(b"PAR1")
    with pytest.raises(CorpusError, match="needs the 'pyarrow' package"):
        read_all(str(tmp_path / "c.parquet"))


@pytest.mark.skipif(importlib.util.find_spec("pyarrow") is None, reason="pyarrow is not installed")
def test_parquet_reads_text_and_keeps_columns(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": ["a doc", "", "another"], "id": [1, 2, 3]}), tmp_path / "c.parquet")
    docs, stats = read_all(str(tmp_path / "c.parquet"))
    assert [(d.text, d.fields["id"]) for d in docs] == [("a doc", 1), ("another", 3)]
    assert stats.skipped_empty == 1


def test_fingerprint_changes_when_the_corpus_changes(tmp_path):
    src = write_lines(tmp_path / "c.jsonl", [b'{"text": "a"}'])
    before = corpus_fingerprint(src)
    assert corpus_fingerprint(src) == before
    write_lines(tmp_path / "c.jsonl", [b'{"text": "a"}', b'{"text": "b"}'])
    assert corpus_fingerprint(src) != before


# -- sharded corpora: folders, globs, compressed shards ---------------------------------------------


def make_records(n: int, seed: int = 0) -> list[dict]:
    """Records with a text and the same other fields (parquet needs one schema), one of them long."""
    rng = random.Random(seed)
    words = ["iron", "köln", "日本語", "tab\there", "line\nbreak", "✓", "paris", "26"]
    records = [{"text": " ".join(rng.choice(words) for _ in range(rng.randint(1, 40))), "id": i,
                "lang": rng.choice(["en", "de", "ja"])} for i in range(n)]
    # in the .zst shard of write_sharded, longer than the zstd reader's input chunk even compressed
    records[3 * n // 5 + 1]["text"] = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz .") for _ in range(400_000))
    records[3 * n // 5 + 2]["text"] = "memory bank " * 300_000  # compresses ~1000x: one input chunk, many reads
    return records


def jsonl_bytes(records: list[dict]) -> bytes:
    return b"".join(json.dumps(r, ensure_ascii=False).encode() + b"\n" for r in records)


def write_sharded(folder, records: list[dict]) -> dict[str, list[dict]]:
    """3 .jsonl.gz (one of two gzip members) + 1 .jsonl.zst (two frames) + 1 parquet shard, written
    in an order unlike their names; returns {relative name: records} in the expected reading order."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    k = len(records) // 5
    parts = {"a/00.jsonl.gz": records[:k], "a/01.jsonl.gz": records[k:2 * k], "b-x.jsonl.gz": records[2 * k:3 * k],
             "b.jsonl.zst": records[3 * k:4 * k], "c.parquet": records[4 * k:]}
    (folder / "a").mkdir(parents=True)
    for name in reversed(parts):
        rs, path = parts[name], folder / name
        if name.endswith(".gz"):
            path.write_bytes(gzip.compress(jsonl_bytes(rs[:3])) + gzip.compress(jsonl_bytes(rs[3:])))
        elif name.endswith(".zst"):
            c = zstandard.ZstdCompressor(write_checksum=True)
            path.write_bytes(c.compress(jsonl_bytes(rs[:4])) + c.compress(jsonl_bytes(rs[4:])))
        else:
            pq.write_table(pa.Table.from_pylist(rs), path, row_group_size=7)
    (folder / "README.md").write_text("not a shard")
    (folder / "dataset_info.json").write_text('{"features": {}}')  # metadata, not a shard
    return parts


def as_pairs(docs) -> list[tuple[str, dict]]:
    return [(d.text, d.fields) for d in docs]


def test_sharded_folder_reads_the_same_documents_as_one_plain_jsonl(tmp_path):
    pytest.importorskip("pyarrow")
    records = make_records(40)
    parts = write_sharded(tmp_path / "corpus", records)
    plain = tmp_path / "all.jsonl"
    plain.write_bytes(jsonl_bytes(records))
    expected = [(r["text"], {k: v for k, v in r.items() if k != "text"}) for r in records]

    shards = corpus_shards(str(tmp_path / "corpus"))
    assert [s.name for s in shards] == list(parts)  # by relative path parts: 'a/..' before 'b-x..'
    assert [(s.kind, s.compression) for s in shards] == [("jsonl", "gz")] * 3 + [("jsonl", "zst"), ("parquet", None)]
    stats = ReadStats()
    by_shard = [as_pairs(iter_shard(s, stats, report=None)) for s in shards]
    assert by_shard == [[(r["text"], {k: v for k, v in r.items() if k != "text"}) for r in rs] for rs in parts.values()]
    assert sum(by_shard, []) == expected
    assert as_pairs(read_all(str(tmp_path / "corpus"))[0]) == expected
    assert as_pairs(read_all(str(plain))[0]) == expected
    assert (stats.documents, stats.files, stats.undecodable, stats.corrupt_shards) == (40, 5, 0, 0)
    assert stats.shards == {name: {"documents": len(rs), "skipped_empty": 0, "undecodable": 0}
                            for name, rs in parts.items()}
    assert pickle.loads(pickle.dumps(shards)) == shards


def test_glob_selects_matching_shards_in_order(tmp_path):
    folder = tmp_path / "corpus"
    (folder / "sub").mkdir(parents=True)
    for name, text in [("s-2.jsonl.gz", "two"), ("s-10.jsonl.gz", "ten"), ("s-1.jsonl.gz", "one"),
                       ("sub/s-3.jsonl.gz", "deep")]:
        (folder / name).write_bytes(gzip.compress(jsonl_bytes([{"text": text}])))
    write_lines(folder / "s-4.jsonl", [b'{"text": "plain"}'])
    shards = corpus_shards(str(folder / "s-*.jsonl.gz"))
    assert [s.name for s in shards] == ["s-1.jsonl.gz", "s-10.jsonl.gz", "s-2.jsonl.gz"]
    assert shards[0].path == str(folder / "s-1.jsonl.gz")
    assert [d.text for d in read_all(str(folder / "s-?.jsonl*"))[0]] == ["one", "two", "plain"]
    assert [s.name for s in corpus_shards(str(folder / "*/s-*.jsonl.gz"))] == ["sub/s-3.jsonl.gz"]
    # a matched folder is read recursively
    assert [d.text for d in read_all(str(tmp_path / "corp*"))[0]] == ["one", "ten", "two", "plain", "deep"]


def test_per_shard_counts_and_merge(tmp_path):
    folder = tmp_path / "c"
    folder.mkdir()
    write_lines(folder / "x.jsonl", [b'{"text": "x1"}', b'{"text": "bad \xff"}', b'{"text": "x3"}'])
    (folder / "y.jsonl.gz").write_bytes(gzip.compress(b'{"text": "y1"}\n{"text": ""}\n{broken\n{"text": "y4"}\n'))
    write_lines(folder / "z.jsonl", [b'{"text": "z1"}'])
    messages = []
    docs, stats = read_all(str(folder), report=messages.append)
    assert [d.text for d in docs] == ["x1", "x3", "y1", "y4", "z1"]
    assert stats.shards == {"x.jsonl": {"documents": 2, "skipped_empty": 0, "undecodable": 1},
                            "y.jsonl.gz": {"documents": 2, "skipped_empty": 1, "undecodable": 1},
                            "z.jsonl": {"documents": 1, "skipped_empty": 0, "undecodable": 0}}
    assert (stats.documents, stats.skipped_empty, stats.undecodable, stats.files) == (5, 1, 2, 3)
    assert messages[0].startswith(f"{folder / 'x.jsonl'}:2: not UTF-8")
    assert messages[1].startswith(f"{folder / 'y.jsonl.gz'}:3: not JSON")
    assert json.loads(json.dumps(stats.as_dict())) == stats.as_dict()

    merged = ReadStats()
    for shard in corpus_shards(str(folder)):
        part = ReadStats()
        list(iter_shard(shard, part, report=None))
        assert merged.merge(part) is merged
    assert merged.as_dict() == stats.as_dict()
    merged.merge(merged.__class__(documents=1, problems=["p"] * MAX_REPORTED, shards={"z.jsonl": {"documents": 1}}))
    assert merged.documents == 6 and merged.shards["z.jsonl"]["documents"] == 2
    assert len(merged.problems) == MAX_REPORTED and merged.problems[:2] == stats.problems


@pytest.mark.parametrize("codec", ["gz", "zst"])
def test_truncated_compressed_shard_keeps_earlier_lines_and_is_counted(tmp_path, codec):
    records = [{"text": f"document {i} " + "word " * (i % 50), "id": i} for i in range(3000)]
    data = jsonl_bytes(records)
    blob = gzip.compress(data) if codec == "gz" else zstandard.ZstdCompressor(write_checksum=True).compress(data)
    cut = blob[: len(blob) // 2]
    # independent reference: the complete lines a one-shot decompressor recovers from the cut stream
    recoverable = (zlib.decompressobj(31).decompress(cut) if codec == "gz"
                   else zstandard.ZstdDecompressor().decompressobj().decompress(cut)).count(b"\n")
    assert 0 < recoverable < len(records)
    folder = tmp_path / "c"
    folder.mkdir()
    (folder / f"a.jsonl.{codec}").write_bytes(cut)
    write_lines(folder / "b.jsonl", [b'{"text": "after the damage"}'])
    messages = []
    docs, stats = read_all(str(folder), report=messages.append)
    assert [d.text for d in docs] == [r["text"] for r in records[:recoverable]] + ["after the damage"]
    assert stats.corrupt_shards == 1 and stats.undecodable == 0
    assert stats.shards[f"a.jsonl.{codec}"]["documents"] == recoverable
    assert messages == [f"shard {folder / f'a.jsonl.{codec}'}: truncated/corrupt compressed stream "
                        f"after line {recoverable}" + messages[0].split(str(recoverable), 1)[1]]
    assert stats.as_dict()["corrupt_shards"] == 1

    (folder / f"a.jsonl.{codec}").write_bytes(b"this is not compressed at all\n")
    docs, stats = read_all(str(folder))
    assert [d.text for d in docs] == ["after the damage"] and stats.corrupt_shards == 1
    assert "after line 0" in stats.problems[0]


def test_unusable_shard_sources_fail_clearly(tmp_path):
    write_lines(tmp_path / "a.jsonl", [b'{"text": "a"}'])
    with pytest.raises(CorpusError, match="matches nothing"):
        corpus_shards(str(tmp_path / "*.jsonl.gz"))
    (tmp_path / "x.xml").write_text("<a/>")
    with pytest.raises(CorpusError, match="matches 1 paths, none a supported corpus file"):
        corpus_shards(str(tmp_path / "*.xml"))
    (tmp_path / "x.txt.gz").write_bytes(gzip.compress(b"text"))
    with pytest.raises(CorpusError, match="unknown file type '.txt.gz'"):
        corpus_shards(str(tmp_path / "x.txt.gz"))
    (tmp_path / "meta").mkdir()
    (tmp_path / "meta" / "info.json").write_text("{}")
    with pytest.raises(CorpusError, match="holds no .txt files"):
        corpus_shards(str(tmp_path / "meta"))
    with pytest.raises(CorpusError, match="unsupported URL scheme"):
        corpus_shards("ftp://host/corpus.jsonl")
    assert [s.kind for s in corpus_shards(str(tmp_path / "meta" / "*.json"))] == ["jsonl"]  # named: a shard


def test_shard_order_and_fingerprint_are_deterministic(tmp_path):
    names = ["b/2.jsonl", "a.txt", "b/10.jsonl", "a b.jsonl", "a/z.jsonl", "B.jsonl", "a-b/1.jsonl"]
    for order in (names, names[::-1]):
        folder = tmp_path / f"c{len(list(tmp_path.iterdir()))}"
        for name in order:
            (folder / name).parent.mkdir(parents=True, exist_ok=True)
            (folder / name).write_text(json.dumps({"text": name}) + "\n" if name.endswith(".jsonl") else name)
    first, second = (corpus_shards(str(tmp_path / c)) for c in ("c0", "c1"))
    expected = sorted(names, key=lambda n: n.split("/"))
    assert [s.name for s in first] == [s.name for s in second] == expected
    assert [d.text for d in read_all(str(tmp_path / "c0"))[0]] == expected
    assert corpus_shards(str(tmp_path / "c0")) == first

    fp = corpus_fingerprint(str(tmp_path / "c0"))
    assert fp == corpus_fingerprint(str(tmp_path / "c0"))
    st = os.stat(tmp_path / "c0" / expected[0])
    assert fp[0] == [os.path.realpath(tmp_path / "c0" / expected[0]), st.st_size, st.st_mtime_ns]
    (tmp_path / "c0" / "b" / "2.jsonl").write_text('{"text": "changed"}\n')
    assert corpus_fingerprint(str(tmp_path / "c0")) != fp


TEXTS = ["The atomic number of iron is 26.", "Grüße aus Köln — ünïcödé ✓ 日本語", "tabs\tand\nnewlines  ",
         "The capital of France is Paris."] * 20


@pytest.fixture(scope="module")
def bpe():
    return train_bpe(iter(TEXTS), vocab_size=300, vocab_multiple=64)


def test_bpe_round_trips_any_text_and_pads_the_vocabulary(bpe):
    for text in TEXTS[:4] + ["never seen: ßø∂ƒ 🙂"]:
        assert bpe.decode(bpe.encode(text)) == text
    assert bpe.raw_vocab_size == 300 and bpe.vocab_size == 320
    assert bpe.decode([bpe.eot_id]) == EOT


def test_literal_eot_text_is_not_a_document_boundary(bpe):
    ids = bpe.encode(f"before {EOT} after")
    assert bpe.eot_id not in ids.tolist()
    assert bpe.decode(ids) == f"before {EOT} after"
    batch = [x.tolist() for x in bpe.encode_batch(["a b", "c"])]
    assert batch == [bpe.encode("a b").tolist(), bpe.encode("c").tolist()]


def test_saved_tokenizer_loads_with_the_same_id_and_encoding(bpe, tmp_path):
    bpe.save(tmp_path / "tok.json")
    again = Tokenizer.from_file(tmp_path / "tok.json", 64)
    assert again.id == bpe.id and again.eot_id == bpe.eot_id
    assert np.array_equal(again.encode(TEXTS[1]), bpe.encode(TEXTS[1]))


def test_hf_tokenizer_without_eot_gets_one(tmp_path):
    from tokenizers import Tokenizer as HF
    from tokenizers import models, pre_tokenizers

    hf = HF(models.WordLevel({"hello": 0, "world": 1, "[UNK]": 2}, unk_token="[UNK]"))
    hf.pre_tokenizer = pre_tokenizers.Whitespace()
    hf.save(str(tmp_path / "wl.json"))
    tok = Tokenizer.from_file(tmp_path / "wl.json", 8)
    assert tok.eot == EOT and tok.eot_id == 3 and tok.vocab_size == 8
    assert tok.encode("hello world").tolist() == [0, 1]


def test_bad_tokenizer_files_fail_clearly(tmp_path):
    with pytest.raises(TokenizerError, match="does not exist"):
        Tokenizer.from_file(tmp_path / "missing.json", 64)
    (tmp_path / "bad.json").write_text("{not a tokenizer")
    with pytest.raises(TokenizerError, match="cannot be loaded"):
        Tokenizer.from_file(tmp_path / "bad.json", 64)
    with pytest.raises(TokenizerError, match="tokenizer_vocab = 100"):
        train_bpe(iter(TEXTS), vocab_size=100, vocab_multiple=64)
