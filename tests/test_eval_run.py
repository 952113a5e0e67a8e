"""memlm eval / generate on a trained run, with a probe file that is not the built-in one."""

import functools
import json

import pytest

from memlm.config import load_config
from memlm.demo import demo_configs
from memlm.model.accounting import accounting


@functools.cache
def forward(fn):
    """``fn.apply(params, tokens, segments, positions, memory=memory)`` as one jitted program (one compile
    per shape): the references below call it token by token, where each eager op would compile alone."""
    import jax

    return jax.jit(lambda params, tokens, segments, positions, memory: fn.apply(params, tokens, segments, positions,
                                                                                   memory=memory))


@pytest.fixture(scope="module")
def trained_run(facts_data, tmp_path_factory):
    from helpers import train_small_run

    return train_small_run(facts_data, tmp_path_factory.mktemp("run"), batch_size=4, max_new_tokens=4,
                           heldout_documents=4)


def test_eval_on_a_custom_probe_file_writes_every_condition(trained_run, tmp_path, capsys):
    from memlm.eval.run import evaluate

    probes = tmp_path / "islands.jsonl"
    items = [
        {"prompt": "The capital of Iceland is", "answer": "Reykjavik", "bucket": "rare"},
        {"prompt": "The atomic number of tin is", "answer": "50", "bucket": "rare", "context": "tin element"},
        {"prompt": "The capital of France is", "answer": "Paris", "bucket": "common", "entity": "France"},
        {"prompt": "The capital of Peru is", "answer": "Lima", "bucket": "common", "documents": [0, 1]},
    ]
    probes.write_text("".join(json.dumps(i) + "\n" for i in items))
    results = evaluate(trained_run, probes=str(probes))
    res = results["islands"]
    assert set(res["conditions"]) == {"none", "generic", "fetched", "blocked"}
    for r in res["conditions"].values():
        assert r["n"] == 4 and set(r["by_bucket"]) == {"rare", "common"}
        assert 0.0 <= r["accuracy"] <= 1.0
    # the two probes naming their documents: routing agreement per level and bucket
    routing = res["routing"]
    assert routing["n"] == 2 and set(routing["by_bucket"]) == {"common"} and set(routing["levels"]) == {"1", "2"}
    assert "islands: routing agreement" in capsys.readouterr().out
    saved = json.loads((trained_run / "eval" / "islands.json").read_text())
    assert saved["conditions"] == res["conditions"] and saved["routing"] == routing
    assert set(saved["perplexity"]) == {"none", "generic", "fetched", "blocked"}
    assert (trained_run / "eval" / "islands.png").exists()


def test_blocked_routing_never_uses_the_texts_own_level1_node(trained_run):
    from memlm.infer.run import load_run

    run = load_run(trained_run)
    texts = ["The capital of Iceland is", "The atomic number of tin is", "oxygen is a gas"]
    fetched = run.memory.paths(texts, "fetched")
    blocked = run.memory.paths(texts, "blocked")
    level = run.cfg.eval.block_level
    assert (fetched[:, level - 1] != blocked[:, level - 1]).all()


def test_route_gate_gives_the_generic_memory_only_to_queries_far_from_their_centroid(trained_run):
    import numpy as np

    from memlm.infer.run import load_run
    from memlm.retrieval.confidence import path_scores

    texts = ["The capital of Iceland is", "The atomic number of tin is", "oxygen is a gas"]
    plain = load_run(trained_run)
    fetched, generic = plain.memory(texts, "fetched"), plain.memory(texts, "generic")
    dist, _ = path_scores(plain.memory.tree, plain.memory._embed(texts), plain.memory.paths(texts))
    threshold = float(np.sort(dist[:, 0])[1])  # the middle distance: only the farthest text is beyond it
    gate = {"eval.route_gate": "distance", "eval.route_gate_threshold": repr(threshold)}
    gated = load_run(trained_run, overrides=gate).memory
    far = dist[:, 0] > threshold
    assert far.sum() == 1 and gated.gated(texts).tolist() == far.tolist()
    got = gated(texts, "fetched")
    for name in fetched:
        want = np.where(far.reshape((-1,) + (1,) * (fetched[name].ndim - 1)), np.asarray(generic[name]),
                        np.asarray(fetched[name]))
        np.testing.assert_array_equal(np.asarray(got[name]), want, err_msg=name)
    blocked, plain_blocked = gated(texts, "blocked"), plain.memory(texts, "blocked")  # the gate is on "fetched" only
    for name in blocked:
        np.testing.assert_array_equal(np.asarray(blocked[name]), np.asarray(plain_blocked[name]), err_msg=name)


def test_generate_prints_the_prompt_and_its_continuation(trained_run, capsys):
    from memlm.serve.generate import generate_cli

    text = generate_cli(str(trained_run), "The capital of France is", max_new_tokens=4)
    out = capsys.readouterr().out
    assert out.startswith("The capital of France is" + text)
    assert "fetched memory [path" in out


def test_generate_routes_as_eval_does_with_the_likelihood_descent(trained_run, capsys):
    from memlm.infer.beam import BeamRouting
    from memlm.infer.generate import generate_text
    from memlm.infer.run import load_run
    from memlm.serve.generate import generate_cli

    prompt, over = "The atomic number of tin is", {"eval.route_descent": "likelihood"}
    text = generate_cli(str(trained_run), prompt, max_new_tokens=4, overrides=over)
    run = load_run(trained_run, overrides=over)
    beam = BeamRouting(run.fn, run.params, run.tokenizer, run.memory, run.cfg)
    assert f"[path {beam.paths([prompt])[0].tolist()}]" in capsys.readouterr().out
    assert text == generate_text(run.fn, run.params, run.tokenizer, [prompt], beam([prompt], "fetched"), 4)[0]
    generate_cli(str(trained_run), prompt, max_new_tokens=4,
                 overrides={**over, "eval.route_posterior": "1.0", "eval.route_fallback": "none"})
    assert "[fallback: none]" in capsys.readouterr().out  # posterior 1 is never reached: every text falls back


def test_demo_dense_baseline_has_anchor_plus_fetched_parameters():
    cfgs = demo_configs(load_config("experiments/tiny.py"))
    anchor, memory, dense = (accounting(cfgs[k]) for k in ("anchor", "memory", "dense"))
    assert dense["anchor_params"] == anchor["anchor_params"] + memory["fetched_params"]
    assert cfgs["dense"].train.steps == cfgs["memory"].train.steps and cfgs["dense"].train.lr == cfgs["memory"].train.lr


STREAMED = {"bank.device_levels": "0", "bank.replicate_levels": "0", "bank.host_cache_bytes": "300000"}


@pytest.mark.parametrize("tiers", [{"bank.device_levels": "1"}, STREAMED])
def test_eval_and_generate_with_deep_levels_off_device_equal_the_all_device_bank(trained_run, tmp_path, tiers):
    """Level 2 in host memory, or every level read from the store through a bounded block cache:
    the fetched memory, eval results and generated text equal those of the bank loaded whole."""
    import numpy as np

    from memlm.eval.run import evaluate
    from memlm.infer.run import load_run
    from memlm.serve.generate import generate_cli

    whole, tiered = load_run(trained_run), load_run(trained_run, overrides=tiers)
    assert whole.memory.tiers is None and tiered.memory.tiers is not None
    texts = ["The capital of Iceland is", "The atomic number of tin is", "oxygen is a gas", "The capital of Iceland is"]
    for cond in ("fetched", "blocked"):
        a, b = whole.memory(texts, cond), tiered.memory(texts, cond)
        for name in a:
            np.testing.assert_array_equal(np.asarray(a[name]), np.asarray(b[name]), err_msg=f"{cond} {name}")
    if "bank.host_cache_bytes" in tiers:
        st = tiered.memory.tiers.stats
        misses = st["cache_misses"]
        tiered.memory(texts[:1], "fetched")  # every block of this path was read above: all from the cache
        assert misses > 0 and st["cache_misses"] == misses and st["cache_hits"] >= 2, st
        assert tiered.memory.tiers._cache_used <= 300000
    prompt = "The capital of France is"
    assert generate_cli(str(trained_run), prompt, max_new_tokens=4) == generate_cli(
        str(trained_run), prompt, max_new_tokens=4, overrides=tiers)
    probes = tmp_path / "p.jsonl"
    probes.write_text(json.dumps({"prompt": "The atomic number of tin is", "answer": "50", "bucket": "rare"}) + "\n")
    want = evaluate(trained_run, probes=str(probes))["p"]
    got = evaluate(trained_run, probes=str(probes), overrides=tiers)["p"]
    assert got["conditions"] == want["conditions"] and got["perplexity"] == want["perplexity"]


def test_route_beam_keeps_per_text_the_candidate_under_which_the_anchor_finds_the_text_most_likely(trained_run):
    import jax.numpy as jnp
    import numpy as np

    from memlm.infer.beam import BeamRouting
    from memlm.infer.run import load_run
    from memlm.retrieval import route_beam

    texts = ["The capital of Iceland is", "The atomic number of tin is", "oxygen is a gas", "Peru"]
    run = load_run(trained_run, overrides={"eval.route_beam": "3", "eval.route_beam_generic": "true"})
    beam = BeamRouting(run.fn, run.params, run.tokenizer, run.memory, run.cfg)
    got_paths, got_generic = beam.paths(texts), beam.gated(texts)
    cand = route_beam(run.memory.tree, run.memory._embed(texts), 3)
    generic = run.memory(texts, "generic")

    def loglik(text, memory):  # one text alone, from the logits, in numpy
        ids = np.asarray(run.tokenizer.encode(text), np.int32)
        t = len(ids) - 1
        logits = forward(run.fn)(run.params, jnp.asarray(ids[None, :-1]), jnp.ones((1, t), jnp.int32),
                              jnp.arange(t, dtype=jnp.int32)[None], memory)
        logits = np.asarray(logits, np.float64)[0]
        logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
            - logits.max(-1, keepdims=True)
        return logp[np.arange(t), ids[1:]].sum()

    fetched_all = run.memory(texts, "fetched")
    for i, text in enumerate(texts):
        scores = [loglik(text, run.memory._gather(run.memory.bank, jnp.asarray(cand[i, w][None]))) for w in range(3)]
        scores.append(loglik(text, generic))
        best = int(np.argmax(scores))
        assert got_generic[i] == (best == 3), (text, scores)
        np.testing.assert_array_equal(got_paths[i], cand[i, 0] if best == 3 else cand[i, best])
    memory = beam(texts, "fetched")
    for name in memory:
        want = np.where(got_generic.reshape((-1,) + (1,) * (memory[name].ndim - 1)), np.asarray(generic[name]),
                        np.asarray(run.memory._gather(run.memory.bank, jnp.asarray(got_paths))[name]))
        np.testing.assert_array_equal(np.asarray(memory[name]), want, err_msg=name)
    # width 1 without the generic candidate is plain greedy routing
    plain = load_run(trained_run)
    np.testing.assert_array_equal(BeamRouting(plain.fn, plain.params, plain.tokenizer, plain.memory,
                                              plain.cfg).paths(texts), plain.memory.paths(texts))
    for name in fetched_all:
        assert memory[name].shape == fetched_all[name].shape


def test_likelihood_descent_keeps_per_level_the_children_under_which_the_text_is_likeliest(trained_run):
    """``eval.route_descent=likelihood`` (widths 1 and 2) against a numpy brute force: per level, each
    child of every kept node, completed below by nearest centroid, scored by the text's log-likelihood;
    the ``width`` likeliest kept."""
    import functools

    import jax.numpy as jnp
    import numpy as np

    from memlm.infer.beam import BeamRouting
    from memlm.infer.run import load_run

    texts = ["The capital of Iceland is", "The atomic number of tin is", "oxygen is a gas", "Peru"]
    run = load_run(trained_run)
    tree = run.memory.tree
    k, depth = tree.k, tree.depth
    emb = np.asarray(run.memory._embed(texts), np.float64)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)

    @functools.cache
    def loglik(text, path):
        ids = np.asarray(run.tokenizer.encode(text), np.int32)
        t = len(ids) - 1
        memory = run.memory._gather(run.memory.bank, jnp.asarray(np.asarray(path, np.int32)[None]))
        logits = np.asarray(forward(run.fn)(run.params, jnp.asarray(ids[None, :-1]), jnp.ones((1, t), jnp.int32),
                                         jnp.arange(t, dtype=jnp.int32)[None], memory), np.float64)[0]
        logp = logits - logits.max(-1, keepdims=True)
        logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
        return logp[np.arange(t), ids[1:]].sum()

    def nearest(x, parent, level):  # level is 1-based
        children = parent * k + np.arange(k)
        return int(children[np.argmin(np.linalg.norm(tree.centroids[level - 1][children] - x, axis=1))])

    for width in (1, 2):
        got = BeamRouting(run.fn, run.params, run.tokenizer, run.memory,
                          load_run(trained_run, overrides={"eval.route_descent": "likelihood",
                                                           "eval.route_descent_width": str(width)}).cfg).paths(texts)
        for i, text in enumerate(texts):
            kept = [()]
            for level in range(1, depth + 1):
                scored = []
                for prefix in kept:
                    for child in (prefix[-1] if prefix else 0) * k + np.arange(k):
                        cand = [*prefix, int(child)]
                        while len(cand) < depth:
                            cand.append(nearest(emb[i], cand[-1], len(cand) + 1))
                        scored.append((loglik(text, tuple(cand)), tuple(cand[:level])))
                scored.sort(key=lambda c: -c[0])  # the float32 kernel vs float64 here: no near-ties expected
                kept = [c[1] for c in scored[:width]]
            assert tuple(got[i].tolist()) == kept[0], (width, text, got[i], kept)
        if width == 1:
            assert (got != run.memory.paths(texts)).any(), "the likelihood descent should leave the greedy path"


def test_route_posterior_falls_back_unless_one_candidate_holds_the_asked_posterior(trained_run):
    """``eval.route_posterior`` with ``route_fallback=none`` against numpy: the softmax of the beam
    candidates' and the anchor alone's log-likelihoods; a text keeps its likeliest path only when that
    posterior reaches q, and a text that falls back reads blocks that change no logit (the anchor alone)."""
    import jax.numpy as jnp
    import numpy as np

    from memlm.infer.beam import BeamRouting
    from memlm.infer.run import load_run
    from memlm.retrieval import route_beam

    texts = ["The capital of Iceland is", "The atomic number of tin is", "oxygen is a gas", "Peru", "tin"]
    base = load_run(trained_run)
    cand = route_beam(base.memory.tree, base.memory._embed(texts), 3)

    def logits(text, memory):
        ids = np.asarray(base.tokenizer.encode(text), np.int32)
        t = len(ids) - 1
        out = forward(base.fn)(base.params, jnp.asarray(ids[None, :-1]), jnp.ones((1, t), jnp.int32),
                            jnp.arange(t, dtype=jnp.int32)[None], memory)
        return np.asarray(out, np.float64)[0], ids

    def loglik(text, memory):
        lg, ids = logits(text, memory)
        lp = lg - lg.max(-1, keepdims=True)
        lp -= np.log(np.exp(lp).sum(-1, keepdims=True))
        return lp[np.arange(len(ids) - 1), ids[1:]].sum()

    scores = np.array([[loglik(s, base.memory._gather(base.memory.bank, jnp.asarray(cand[i, w][None])))
                        for w in range(3)] + [loglik(s, None)] for i, s in enumerate(texts)])
    post = np.exp(scores - scores.max(1, keepdims=True))
    post /= post.sum(1, keepdims=True)
    best = scores.argmax(1)
    top = np.sort(post.max(1))
    m = int(np.argmax(np.diff(top)))  # this barely trained model's posteriors are near uniform: q in their widest gap
    split = float(top[m] + top[m + 1]) / 2
    for q in (split, 0.9):
        run = load_run(trained_run, overrides={"eval.route_beam": "3", "eval.route_posterior": str(q),
                                               "eval.route_fallback": "none"})
        beam = BeamRouting(run.fn, run.params, run.tokenizer, run.memory, run.cfg)
        gated, paths = beam.gated(texts), beam.paths(texts)
        want = (best == 3) | (post[np.arange(len(texts)), best] < q)
        assert want.any() and (q == 0.9 or not want.all()), "the test needs texts on both sides of q"
        np.testing.assert_array_equal(gated, want, err_msg=f"q={q}: posteriors {post.round(3)}")
        for i in np.flatnonzero(~want):
            np.testing.assert_array_equal(paths[i], cand[i, best[i]])
        memory = beam(texts, "fetched")
        for i in np.flatnonzero(want):
            row = {n: a[i:i + 1] for n, a in memory.items()}
            np.testing.assert_allclose(logits(texts[i], row)[0], logits(texts[i], None)[0], rtol=1e-5, atol=1e-5)


def test_anchor_gate_falls_back_exactly_where_the_anchor_is_confident_in_its_own_answer(trained_run):
    """``eval.route_anchor_confidence`` against a reference without the KV cache: the anchor's greedy
    answer with no memory, token by token from full forwards, cut before its first line break or
    sentence end; its confidence is the product of its tokens' softmax probabilities (0 for an empty
    answer). A text falls back exactly when that reaches c, the others keep their greedy path, and the
    fallback rows change no logit (the anchor alone). Under likelihood descent, the texts the gate
    sends back are never descended."""
    import jax.numpy as jnp
    import numpy as np

    from memlm.infer.beam import BeamRouting
    from memlm.infer.run import load_run

    texts = ["The capital of Iceland is", "The atomic number of tin is", "oxygen is a gas", "Peru", "tin",
             "The capital of Peru is", "Q: What is the atomic number of iron? A:", "gold"]
    base = load_run(trained_run)
    tok = base.tokenizer

    def logits(ids, memory):
        ids = np.asarray(ids, np.int32)
        t = len(ids)
        out = forward(base.fn)(base.params, jnp.asarray(ids[None]), jnp.ones((1, t), jnp.int32),
                            jnp.arange(t, dtype=jnp.int32)[None], memory)
        return np.asarray(out, np.float64)[0]

    def reference(text):
        prompt, answer, p = [int(i) for i in tok.encode(text)], [], 1.0
        for _ in range(base.cfg.eval.max_new_tokens):
            lg = logits(prompt + answer, None)[-1]
            probs = np.exp(lg - lg.max())
            probs /= probs.sum()
            nxt = int(np.argmax(probs))
            if nxt == tok.eot_id or any(c in "\n.?!;" for c in tok.decode(answer + [nxt])):
                break
            p, answer = p * probs[nxt], answer + [nxt]
        return p if answer else 0.0

    want = np.array([reference(s) for s in texts])
    over = {"eval.route_fallback": "none"}
    probe = load_run(trained_run, overrides={**over, "eval.route_anchor_confidence": "1e-30"})
    got = BeamRouting(probe.fn, probe.params, probe.tokenizer, probe.memory, probe.cfg).anchor_confidence(texts)
    # in log space: a barely trained model's confidences are far below any useful absolute tolerance
    np.testing.assert_array_equal(got > 0, want > 0)
    np.testing.assert_allclose(np.log(got[want > 0]), np.log(want[want > 0]), rtol=1e-4, atol=1e-4)
    top = np.sort(np.log(want[want > 0]))
    assert len(top) >= 2, f"the test needs two non-empty answers: confidences {want}"
    m = int(np.argmax(np.diff(top)))
    c = float(np.exp((top[m] + top[m + 1]) / 2))  # in the widest gap of this barely trained model's confidences
    run = load_run(trained_run, overrides={**over, "eval.route_anchor_confidence": repr(c)})
    beam = BeamRouting(run.fn, run.params, run.tokenizer, run.memory, run.cfg)
    gated = beam.gated(texts)
    np.testing.assert_array_equal(gated, want >= c, err_msg=f"c={c}: confidences {want}")
    assert gated.any() and not gated.all()
    np.testing.assert_array_equal(beam.paths(texts), base.memory.paths(texts))  # greedy routing otherwise
    memory = beam(texts, "fetched")
    for i in range(len(texts)):
        ids = [int(t) for t in tok.encode(texts[i])]
        row = {n: a[i:i + 1] for n, a in memory.items()}
        if gated[i]:
            np.testing.assert_allclose(logits(ids, row), logits(ids, None), rtol=1e-5, atol=1e-5)
        else:
            fetched = base.memory._gather(base.memory.bank, jnp.asarray(base.memory.paths([texts[i]])))
            np.testing.assert_allclose(logits(ids, row), logits(ids, fetched), rtol=1e-5, atol=1e-5)

    run = load_run(trained_run, overrides={**over, "eval.route_anchor_confidence": repr(c),
                                           "eval.route_descent": "likelihood"})
    descent = BeamRouting(run.fn, run.params, run.tokenizer, run.memory, run.cfg)
    scored, score = [], descent._score
    descent._score = lambda part, confidence: (scored.extend(part), score(part, confidence))
    np.testing.assert_array_equal(descent.gated(texts), want >= c)
    assert sorted(scored) == sorted(t for t, w in zip(texts, want, strict=True) if w < c)
    sure = want >= c
    np.testing.assert_array_equal(descent.paths(texts)[sure], base.memory.paths(texts)[sure])
