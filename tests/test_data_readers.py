"""Corpus readers and the tokenizer: documents kept, bad input counted or refused, round trips exact."""

import importlib.util
import json

import numpy as np
import pytest

from memlm.data.readers import CorpusError, ReadStats, corpus_fingerprint, iter_documents
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
    src = write_lines(tmp_path / "c.jsonl", [b'{"text": "ok"}', b'{"body": "no text here"}'])
    with pytest.raises(CorpusError, match=r"c\.jsonl:2: record has no 'text' field"):
        read_all(src)
    src = write_lines(tmp_path / "d.jsonl", [b'{"text": 5}'])
    with pytest.raises(CorpusError, match=r"d\.jsonl:1: 'text' is int"):
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
    (tmp_path / "x.csv").write_text("a,b")
    with pytest.raises(CorpusError, match="unknown file type '.csv'"):
        read_all(str(tmp_path / "x.csv"))
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
