"""Log-likelihood scoring: multiple choice and perplexity against direct numpy computations."""

import math
from pathlib import Path

import numpy as np
import pytest
from helpers import CharTokenizer, DictMemoryProvider, jit_forward, small_model

from memlm.eval.choice import _rows, evaluate_choice, load_choice_items
from memlm.eval.perplexity import evaluate_perplexity
from memlm.eval.probes import ProbeFileError
from memlm.infer.conditions import ConditionError
from memlm.memspec import fetched_shapes

FIXTURES = Path(__file__).parent / "fixtures"
REF_LEN = 64  # the reference forward's fixed length; causality makes right padding inert


Chars = CharTokenizer


@pytest.fixture(scope="module")
def model():
    return small_model()


def memory_table(cfg, texts, seed):
    """Per text, a FetchedMemory row of standard normals (numpy: no device compile for each shape)."""
    rng = np.random.default_rng(seed)
    shapes = fetched_shapes(cfg, 1)
    return {t: {n: rng.standard_normal(s[1:]).astype(np.float32) for n, s in shapes.items()} for t in texts}


def log_softmax(logits):
    x = np.asarray(logits, np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def reference_logprobs(f, params, seq, memory):
    """log p(seq[i+1] | seq[:i+1]) for every i, from one full forward in numpy float64."""
    forward = jit_forward(f)
    padded = np.zeros((1, REF_LEN), np.int32)
    padded[0, : len(seq)] = seq
    m = None if memory is None else {k: v[None] for k, v in memory.items()}
    lp = log_softmax(forward(params, padded, m)[0])
    return np.array([lp[i, seq[i + 1]] for i in range(len(seq) - 1)])


def test_multiple_choice_scores_equal_direct_log_likelihoods(model):
    cfg, f, params = model
    items = load_choice_items(FIXTURES / "eval_choice_islands.jsonl")
    keys = [it.key for it in items]
    assert keys[1] == "Oskany is an island nation."
    fetched = memory_table(cfg, keys, 3)
    provider = DictMemoryProvider(per_text={"fetched": fetched})
    result = evaluate_choice(f, params, Chars(), items, provider, ["none", "fetched"], batch_size=2,
                             return_scores=True)
    tok = Chars()
    for cond in ("none", "fetched"):
        sums, means = [], []
        for it, got in zip(items, result["scores"][cond], strict=True):
            memory = fetched[it.key] if cond == "fetched" else None
            q = tok.encode(it.question)
            want = []
            for c in it.choices:
                cont = c if it.question.endswith(" ") or c.startswith(" ") else " " + c
                lp = reference_logprobs(f, params, q + tok.encode(cont), memory)
                want.append(lp[len(q) - 1:].sum())
            np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
            lengths = [len(tok.encode(c if c.startswith(" ") or it.question.endswith(" ") else " " + c))
                       for c in it.choices]
            sums.append(int(np.argmax(want)) == it.gold)
            means.append(int(np.argmax(np.array(want) / lengths)) == it.gold)
        assert result["conditions"][cond] == {"accuracy": np.mean(sums), "accuracy_norm": np.mean(means),
                                              "n": len(items)}
    assert result["scores"]["none"] != result["scores"]["fetched"]
    assert [n for c, n in provider.calls if c == "fetched"] == [2, 2, 2]  # the last batch padded to 2 items


def test_long_questions_are_cut_from_the_left():
    rows = _rows(Chars(), load_choice_items(FIXTURES / "eval_choice_islands.jsonl")[:1], max_len=13)
    assert [(i, "".join(map(chr, q)), "".join(map(chr, c))) for i, q, c in rows] == [
        (0, "the", " north sea"), (0, "in the", " desert"), (0, "es in the", " sky")]
    with pytest.raises(ValueError, match="more than max_len - 1 = 9"):
        _rows(Chars(), load_choice_items(FIXTURES / "eval_choice_islands.jsonl")[:1], max_len=10)


@pytest.mark.parametrize("line,message", [
    ('{"question": "q", "choices": ["a"], "gold": 0}', "two or more"),
    ('{"question": "q", "choices": ["a", "b"], "gold": 2}', "'gold' = 2"),
    ('{"question": "q", "choices": ["a", "b"], "gold": "0"}', "'gold' must be int"),
    ('{"choices": ["a", "b"], "gold": 0}', "missing field 'question'"),
])
def test_bad_choice_lines_name_file_and_line(tmp_path, line, message):
    path = tmp_path / "task.jsonl"
    path.write_text(line + "\n")
    with pytest.raises(ProbeFileError, match=message) as e:
        load_choice_items(path)
    assert f"{path}:1" in str(e.value)


def test_perplexity_equals_exp_of_direct_nll(model):
    cfg, f, params = model
    rng = np.random.default_rng(7)
    seq_len = 16
    docs = [rng.integers(1, cfg.model.vocab_size, size=n).tolist() for n in (1, 5, 40, 17, 70)]
    texts = [f"document {i}" for i in range(len(docs))]
    fetched = memory_table(cfg, texts, 11)
    provider = DictMemoryProvider(per_text={"fetched": fetched})
    result = evaluate_perplexity(f, params, docs, texts, provider, "none,fetched", seq_len=seq_len, batch_size=4)
    for cond in ("none", "fetched"):
        nll, count = 0.0, 0
        for doc, text in zip(docs, texts, strict=True):
            memory = fetched[text] if cond == "fetched" else None
            for s in range(0, len(doc) - 1, seq_len):  # each chunk of seq_len inputs is its own context
                chunk = doc[s: s + seq_len + 1]
                lp = reference_logprobs(f, params, chunk, memory)
                nll -= lp.sum()
                count += len(lp)
        got = result["conditions"][cond]
        assert got["tokens"] == count == sum(len(d) - 1 for d in docs)
        assert got["documents"] == len(docs)
        np.testing.assert_allclose(got["nll"], nll / count, rtol=1e-5)
        np.testing.assert_allclose(got["perplexity"], math.exp(nll / count), rtol=1e-5)
    assert result["conditions"]["none"]["nll"] != result["conditions"]["fetched"]["nll"]


def test_memory_of_the_wrong_size_is_rejected(model):
    cfg, f, params = model

    def wrong(texts, condition):
        return {"w1": np.zeros((len(texts) - 1, 3, 32, 8), np.float32)}

    with pytest.raises(ConditionError, match="has 3 rows for 4 texts"):
        evaluate_perplexity(f, params, [[1, 2, 3]] * 3, ["a", "b", "c"], wrong, "fetched", seq_len=8, batch_size=4)
