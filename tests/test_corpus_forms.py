"""A user's corpus in the forms it comes in: another text field, JSON arrays, .txt split by paragraph
or line, CSV / TSV, a Hugging Face `datasets` folder and `hf://datasets/...` (a local stand-in)."""

import csv
import importlib.util
import json

import pytest
from natural_text import paragraphs

from memlm.data.readers import CorpusError, ReadOptions, ReadStats, iter_documents

needs_datasets = pytest.mark.skipif(importlib.util.find_spec("datasets") is None,
                                    reason="Hugging Face datasets is not installed (pip install 'memlm[eval]')")
TEXTS = paragraphs(12)


def read(source, **options):
    stats = ReadStats()
    docs = list(iter_documents(str(source), stats, report=None, options=ReadOptions(**options)))
    return docs, stats


def test_the_text_field_is_named_or_found_among_content_and_body(tmp_path):
    for field in ("content", "body"):
        path = tmp_path / f"{field}.jsonl"
        path.write_text("".join(json.dumps({field: t, "id": i}) + "\n" for i, t in enumerate(TEXTS)))
        docs, _ = read(path)
        assert [d.text for d in docs] == TEXTS and docs[3].fields == {"id": 3}
    path = tmp_path / "article.jsonl"
    path.write_text("".join(json.dumps({"article": t, "text": "not this"}) + "\n" for t in TEXTS))
    assert [d.text for d in read(path, text_field="article")[0]] == TEXTS
    with pytest.raises(CorpusError, match=r"article\.jsonl:1: record has no 'body' field; its fields: "):
        read(path, text_field="body")


def test_a_json_array_file_is_one_document_per_record(tmp_path):
    path = tmp_path / "docs.json"
    path.write_text(json.dumps([{"text": t, "n": i} for i, t in enumerate(TEXTS)] + [{"text": "  "}], indent=1))
    docs, stats = read(path)
    assert [d.text for d in docs] == TEXTS and docs[1].origin.endswith("docs.json[1]") and stats.skipped_empty == 1
    path.write_text('[{"text": "a"}, 3]')
    with pytest.raises(CorpusError, match=r"docs\.json\[1\]: expected an object"):
        read(path)


def test_a_txt_file_split_by_paragraph_or_line(tmp_path):
    path = tmp_path / "python_docs.txt"
    path.write_text("\n\n".join(TEXTS) + "\n\n  \n\n")
    whole, _ = read(path)
    assert len(whole) == 1 and whole[0].text.strip() == "\n\n".join(TEXTS)
    paras, stats = read(path, txt_split="paragraph")
    assert [d.text for d in paras] == TEXTS and stats.documents == len(TEXTS)
    assert paras[1].origin == f"{path}:{TEXTS[0].count(chr(10)) + 3}"  # the line its paragraph starts on
    lines, _ = read(path, txt_split="line")
    assert [d.text for d in lines] == [ln for t in TEXTS for ln in t.split("\n") if ln.strip()]


@pytest.mark.parametrize("name,delimiter", [("docs.csv", ","), ("docs.tsv", "\t")])
def test_csv_and_tsv_read_the_named_column(tmp_path, name, delimiter):
    path = tmp_path / name
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f, delimiter=delimiter)
        w.writerow(["id", "body", "lang"])
        for i, t in enumerate(TEXTS):
            w.writerow([i, t, "en"])  # paragraphs hold newlines, commas and quotes: quoted fields
    docs, _ = read(path)
    assert [d.text for d in docs] == TEXTS and docs[0].fields == {"id": "0", "lang": "en"}
    assert docs[2].origin == f"{path}:3"


@needs_datasets
def test_a_datasets_folder_saved_to_disk_reads_as_a_corpus(tmp_path):
    import datasets

    ds = datasets.Dataset.from_dict({"content": TEXTS, "n": list(range(len(TEXTS)))})
    ds.save_to_disk(str(tmp_path / "saved"), num_shards=2)
    docs, stats = read(tmp_path / "saved")
    assert [d.text for d in docs] == TEXTS and stats.files == 2
    assert [d.fields["n"] for d in docs] == list(range(len(TEXTS)))


@needs_datasets
def test_hf_datasets_urls_stream_through_datasets(tmp_path, monkeypatch):
    folder = tmp_path / "my_dataset"  # a local stand-in for a hub dataset: a folder of data files
    folder.mkdir()
    (folder / "train.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    docs, _ = read(f"hf://datasets/{folder}")
    assert [d.text for d in docs] == TEXTS
    with pytest.raises(CorpusError, match=r"hf://datasets/.*:nosuch"):
        read(f"hf://datasets/{folder}:nosuch")


def test_prepare_names_its_output_after_the_corpus_and_bad_input_fails_in_one_line(tmp_path, capsys):
    from memlm.cli import default_out, main

    assert default_out("/x/my_corpus.jsonl.gz") == "data/my_corpus" and default_out("facts") == "data/facts"
    assert default_out("hf://datasets/allenai/c4/en:train") == "data/c4_en" and default_out("shards/*.zst") == \
        "data/shards"
    path = tmp_path / "c.jsonl"
    path.write_text(json.dumps({"title": "no text"}) + "\n")
    out = tmp_path / "out"
    for args, needle in [(["--config.data.txt_split=page"], "data.txt_split"),
                         ([], "record has no 'text' or 'content' or 'body' field")]:
        assert main(["prepare", "--corpus", str(path), "--out", str(out), *args]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and needle in err[0], err
    with pytest.raises(SystemExit):
        main(["prepare", "--help"])
    helptext = capsys.readouterr().out
    assert "default data/<corpus name>" in helptext and "text_field" in helptext
    assert "--config.SECTION.KEY=VALUE" in " ".join(helptext.split())  # how any config key is set
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    assert "(default: data/facts)" in capsys.readouterr().out  # every flag names its default
