"""MiniLM embedding on CPU: memlm's JAX path beside sentence-transformers (torch) and onnxruntime.

The same texts (natural text: paragraphs of the Python documentation that ships with CPython, each
short enough to be one 256-piece window, so every library does the same work), the same batch
size, the same threads, in one call. memlm runs in this interpreter; the peers run in
``--peer-python`` (an environment with torch, transformers, sentence-transformers, onnx and onnxruntime), fed the same
texts. Prints texts/s (median of ``--repeats`` timed passes after a warm-up pass), the ratio of
memlm's median to the best peer's, and the cosine between memlm's and sentence-transformers'
vectors.

    .venv/bin/python bench/embed_peers.py --peer-python /path/to/torch-env/bin/python [--texts 512]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

BATCH = 64


def texts_of(n: int, max_pieces: int = 254) -> list[str]:
    """``n`` documentation paragraphs that fit one MiniLM window (at most ``max_pieces`` word pieces)."""
    from pydoc_data.topics import topics

    from tokenizers import Tokenizer

    from memlm.retrieval.minilm import model_dir

    tok = Tokenizer.from_file(str(model_dir() / "tokenizer.json"))
    tok.no_truncation()
    tok.no_padding()
    paras = [p.strip() for _, t in sorted(topics.items()) for p in t.split("\n\n") if len(p.strip()) >= 100]
    out = [p for p in paras if len(tok.encode(p, add_special_tokens=False).ids) <= max_pieces]
    return out[:n]


def timed(fn, texts: list[str], repeats: int) -> tuple[float, list[float]]:
    fn(texts)  # warm-up: compilation, caches
    rates = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn(texts)
        rates.append(len(texts) / (time.perf_counter() - t))
    return statistics.median(rates), rates


def run_memlm(texts: list[str], repeats: int):
    from memlm.retrieval.minilm import MiniLMEmbedder

    emb = MiniLMEmbedder(batch=BATCH, max_tokens=256)
    median, rates = timed(emb.embed, texts, repeats)
    return median, rates, emb.embed(texts)


def run_peers(texts_file: str, out_file: str, repeats: int, model: str, threads: int) -> None:
    """In the peer interpreter: sentence-transformers and onnxruntime on the same texts."""
    import numpy as np
    import onnxruntime as ort
    import torch
    from sentence_transformers import SentenceTransformer
    from transformers import AutoTokenizer

    torch.set_num_threads(threads)
    texts = json.loads(Path(texts_file).read_text())
    st = SentenceTransformer(model, device="cpu")
    st.max_seq_length = 256
    res = {"versions": {"torch": torch.__version__, "onnxruntime": ort.__version__}}

    def st_embed(t):
        return st.encode(t, batch_size=BATCH, normalize_embeddings=True, convert_to_numpy=True)

    res["sentence-transformers"] = timed(st_embed, texts, repeats)
    np.save(out_file + ".st.npy", st_embed(texts))

    bert = st[0].auto_model.eval()
    tok = AutoTokenizer.from_pretrained(model)
    onnx_path = os.path.join(os.path.dirname(out_file), "minilm.onnx")
    sample = tok(["a b"], return_tensors="pt")

    class Encoder(torch.nn.Module):  # keyword arguments only: BertModel's positional order varies by release
        def __init__(self):
            super().__init__()
            self.bert = bert

        def forward(self, input_ids, attention_mask):
            return self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    with torch.no_grad():
        torch.onnx.export(Encoder().eval(), (sample["input_ids"], sample["attention_mask"]), onnx_path,
                          input_names=["input_ids", "attention_mask"], output_names=["last_hidden_state"],
                          dynamic_axes={"input_ids": {0: "b", 1: "l"}, "attention_mask": {0: "b", 1: "l"},
                                        "last_hidden_state": {0: "b", 1: "l"}}, opset_version=17, dynamo=False)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    sess = ort.InferenceSession(onnx_path, opts, providers=["CPUExecutionProvider"])

    def ort_embed(t):
        order = sorted(range(len(t)), key=lambda i: len(t[i]))  # length-sorted batches, as sentence-transformers
        out = np.empty((len(t), 384), np.float32)
        for a in range(0, len(t), BATCH):
            idx = order[a:a + BATCH]
            enc = tok([t[i] for i in idx], padding=True, truncation=True, max_length=256, return_tensors="np")
            h = sess.run(None, {"input_ids": enc["input_ids"].astype(np.int64),
                                "attention_mask": enc["attention_mask"].astype(np.int64)})[0]
            m = enc["attention_mask"][..., None].astype(np.float32)
            v = (h * m).sum(1) / m.sum(1)
            out[idx] = v / np.linalg.norm(v, axis=1, keepdims=True)
        return out

    res["onnxruntime"] = timed(ort_embed, texts, repeats)
    Path(out_file).write_text(json.dumps(res))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--peer-python", required=False, help="interpreter with torch, sentence-transformers, onnxruntime")
    ap.add_argument("--texts", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--peers-only", nargs=2, metavar=("TEXTS_JSON", "OUT_JSON"), help=argparse.SUPPRESS)
    ap.add_argument("--model", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.peers_only:
        run_peers(*args.peers_only, args.repeats, args.model, args.threads)
        return
    import numpy as np

    from memlm.retrieval.minilm import model_dir

    texts = texts_of(args.texts)
    print(f"{len(texts)} texts of the Python documentation, {sum(map(len, texts)):,} characters, batch {BATCH}, "
          f"{args.threads} threads")
    median, rates, vecs = run_memlm(texts, args.repeats)
    rows = {"memlm (jax)": (median, rates)}
    if args.peer_python:
        with tempfile.TemporaryDirectory() as d:
            tf, of = os.path.join(d, "texts.json"), os.path.join(d, "out.json")
            Path(tf).write_text(json.dumps(texts))
            subprocess.run([args.peer_python, __file__, "--peers-only", tf, of, "--repeats", str(args.repeats),
                            "--threads", str(args.threads), "--model", str(model_dir())], check=True)
            peers = json.loads(Path(of).read_text())
            st = np.load(of + ".st.npy")
        print(f"peers: torch {peers['versions']['torch']}, onnxruntime {peers['versions']['onnxruntime']}")
        for name in ("sentence-transformers", "onnxruntime"):
            rows[name] = tuple(peers[name])
        cos = (vecs * st).sum(1)
        print(f"cosine memlm vs sentence-transformers: min {cos.min():.7f}, mean {cos.mean():.7f}")
    for name, (m, r) in rows.items():
        print(f"{name:<22} median {m:8.1f} texts/s   runs {', '.join(f'{x:.1f}' for x in r)}")
    if len(rows) > 1:
        best = max((v[0], k) for k, v in rows.items() if k != "memlm (jax)")
        print(f"memlm / best peer ({best[1]}): {median / best[0]:.2f}x")


if __name__ == "__main__":
    main()
