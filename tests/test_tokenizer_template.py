"""Text -> tokens as the model's own tokenizer does it, on real released tokenizers.

The fixtures (tests/make_tokenizer_fixtures.py) are the tokenizers of Llama 3, Qwen2, Gemma 3 (as
saved, and with Gemma's ``add_bos_token`` flags) and SmolLM2-135M-Instruct, with the ids
``transformers`` gave for prompts, documents and chat conversations. memlm must give the same ids:
the special-token template (BOS) included, for prompts and for documents.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import zstandard

from memlm.data.tokenizer import EMPTY_TEMPLATE, Tokenizer, TokenizerError, check_template

FIX = Path(__file__).resolve().parent / "fixtures" / "tokenizers"
NAMES = ("llama", "qwen2", "gemma3", "gemma", "smollm2")
BOS = {"llama": [128000], "qwen2": [], "gemma3": [2], "gemma": [2], "smollm2": []}


def real_folder(name: str, root: Path) -> Path:
    """The fixture's tokenizer folder, ``tokenizer.json`` decompressed, under ``root``."""
    out = root / name
    if out.exists():
        return out
    out.mkdir(parents=True)
    golden = json.loads((FIX / name / "golden.json").read_text())
    src = FIX / golden.get("tokenizer_json_from", name) / "tokenizer.json.zst"
    (out / "tokenizer.json").write_bytes(zstandard.ZstdDecompressor().decompress(src.read_bytes(),
                                                                                  max_output_size=1 << 27))
    for f in ("tokenizer_config.json", "chat_template.jinja"):
        if (FIX / name / f).exists():
            shutil.copy2(FIX / name / f, out / f)
    return out


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("tokenizers")
    return lambda name: real_folder(name, root)


@pytest.mark.parametrize("name", NAMES)
def test_prompts_and_documents_encode_as_transformers_does(folders, name):
    golden = json.loads((FIX / name / "golden.json").read_text())
    tok = Tokenizer.from_file(folders(name) / "tokenizer.json", 64)
    assert tok.template == {"prefix": BOS[name], "suffix": []}
    for item in golden["prompts"]:
        assert tok.encode(item["text"]).tolist() == item["ids"], item["text"]
    docs = tok.encode_batch([d["text"] for d in golden["documents"]])
    assert [d.tolist() for d in docs] == [d["ids"] for d in golden["documents"]]
    # the plain encoding (a continuation) is the same text without the template
    first = golden["prompts"][0]
    assert tok.encode_plain(first["text"]).tolist() == first["ids"][len(BOS[name]):]
    assert tok.eot == golden["eos_token"]


@pytest.mark.parametrize("name", ["qwen2", "smollm2"])
def test_chat_template_encodes_as_apply_chat_template(folders, name):
    golden = json.loads((FIX / name / "golden.json").read_text())
    tok = Tokenizer.from_file(folders(name) / "tokenizer.json", 64)
    from memlm.data.chat import render_chat

    for item in golden["chat"]:
        assert render_chat(tok.chat_template, item["messages"], tok.config) == item["text"]
        assert tok.encode_chat(item["messages"]).tolist() == item["ids"]


def test_a_tokenizer_without_a_chat_template_says_so(folders):
    tok = Tokenizer.from_file(folders("gemma3") / "tokenizer.json", 64)
    with pytest.raises(TokenizerError, match="no chat template"):
        tok.encode_chat([{"role": "user", "content": "hi"}])


def test_saved_tokenizer_keeps_the_template_and_the_chat_template(folders, tmp_path):
    """A data directory's copy (``Tokenizer.save``) reads back with the same template, rebuilt one
    included (Gemma's add_bos_token flag), and the same chat template."""
    for name in ("gemma", "smollm2"):
        tok = Tokenizer.from_file(folders(name) / "tokenizer.json", 64)
        out = tmp_path / name
        out.mkdir()
        tok.save(out / "tokenizer.json")
        back = Tokenizer.from_file(out / "tokenizer.json", 64)
        assert back.template == tok.template and back.id == tok.id
        assert back.chat_template == tok.chat_template
        text = "The capital of France is"
        assert back.encode(text).tolist() == tok.encode(text).tolist()


def test_add_bos_flag_rebuilds_the_template(folders, tmp_path):
    """``add_bos_token: false`` in tokenizer_config.json turns Gemma's <bos> off (transformers does)."""
    src = folders("gemma3")
    out = tmp_path / "nobos"
    shutil.copytree(src, out)
    cfg = json.loads((out / "tokenizer_config.json").read_text())
    (out / "tokenizer_config.json").write_text(json.dumps({**cfg, "add_bos_token": False}))
    tok = Tokenizer.from_file(out / "tokenizer.json", 64)
    assert tok.template == EMPTY_TEMPLATE
    assert tok.id != Tokenizer.from_file(src / "tokenizer.json", 64).id


def test_check_template_refuses_data_tokenized_without_the_bos(folders):
    tok = Tokenizer.from_file(folders("gemma3") / "tokenizer.json", 64)
    check_template({"prefix": [2], "suffix": []}, tok, "data")
    for recorded in (None, EMPTY_TEMPLATE):
        with pytest.raises(TokenizerError, match="run `memlm prepare` again"):
            check_template(recorded, tok, "data")


def test_memlm_bpe_has_no_template():
    from memlm.data.tokenizer import train_bpe

    tok = train_bpe(["the quick brown fox jumps over the lazy dog"] * 20, 300, 8)
    assert tok.template == EMPTY_TEMPLATE
    assert np.array_equal(tok.encode("the fox"), tok.encode_plain("the fox"))


def test_multiple_choice_rows_put_the_bos_on_the_question_only(folders):
    """A choice continues its question: the template (BOS) starts the question, never a choice."""
    from memlm.eval.choice import ChoiceItem, _rows

    tok = Tokenizer.from_file(folders("gemma3") / "tokenizer.json", 64)
    item = ChoiceItem("The capital of France is", ("Paris", "Rome"), 0, None)
    rows = _rows(tok, [item], None)
    assert [q[0] for _, q, _ in rows] == [2, 2]
    for (_, q, c), choice in zip(rows, item.choices, strict=True):
        assert 2 not in c and q + c == tok.encode(f"The capital of France is {choice}").tolist()
