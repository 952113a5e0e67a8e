"""lm-evaluation-harness on a trained run, and perplexity keyed by a document's first N tokens.

Every number is checked against a plain forward (``fn.apply`` + ``log_softmax``) with the memory
fetched for the retrieval key through the run's memory, not through memlm's scoring code.
"""

import importlib.util
import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import jit_forward

needs_lm_eval = pytest.mark.skipif(importlib.util.find_spec("lm_eval") is None,
                                   reason="lm-eval is not installed (pip install 'memlm[eval]')")


@pytest.fixture(scope="module")
def run(facts_data, tmp_path_factory):
    from helpers import train_small_run

    from memlm.infer.run import load_run

    workdir = train_small_run(facts_data, tmp_path_factory.mktemp("run"), batch_size=4, max_new_tokens=4,
                              heldout_documents=6)
    return load_run(workdir)


def _forward(run, ids: list[int], memory) -> jax.Array:
    """The plain forward ``fn.apply(params, [ids], memory=memory)``, jitted (one program per length
    rather than each of its eager ops compiled for every length)."""
    return jit_forward(run.fn)(run.params, jnp.asarray([ids], jnp.int32), memory)


def _logp(run, ids: list[int], key: str, condition: str = "fetched") -> np.ndarray:
    """log p(ids[t+1] | ids[:t+1]) for every t: one plain forward under the key's memory."""
    memory = run.memory([key], condition)
    logits = _forward(run, ids, memory)
    logp = np.asarray(jax.nn.log_softmax(logits[0].astype(jnp.float32), axis=-1), np.float64)
    return logp[np.arange(len(ids) - 1), ids[1:]]


def _greedy_ids(run, ids: list[int], new: int, key: str, condition: str) -> list[int]:
    """Greedy continuation of ``ids`` by plain forwards under the key's memory, stopping at the EOT."""
    memory = run.memory([key], condition)
    out = []
    for _ in range(new):
        logits = _forward(run, ids + out, memory)
        nxt = int(jnp.argmax(logits[0, -1]))
        if nxt == run.tokenizer.eot_id:
            break
        out.append(nxt)
    return out


def _greedy(run, prompt: str, new: int, key: str) -> str:
    ids = [int(t) for t in run.tokenizer.encode(prompt)]
    return run.tokenizer.decode(_greedy_ids(run, ids, new, key, "fetched"))


MC = [{"question": "The capital of France is", "choices": ["Paris", "Lima", "Oslo"], "gold": 0},
      {"question": "The atomic number of tin is", "choices": ["50", "8", "26", "1"], "gold": 0},
      {"question": "The capital of Peru is", "choices": ["Oslo", "Lima"], "gold": 1}]
DOCS = [{"text": "Tin is a chemical element. The atomic number of tin is 50."},
        {"text": "The capital of Peru is Lima. Peru is a country in South America."}]
GEN = [{"prompt": "The capital of France is", "answer": "Paris"},
       {"prompt": "The atomic number of tin is", "answer": "50"}]


def _task(folder: Path, name: str, rows: list, body: str) -> None:
    data = folder / f"{name}.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / f"{name}.yaml").write_text(f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
                                         f"    test: {json.dumps(str(data))}\ntest_split: test\n{body}")


@pytest.fixture(scope="module")
def tasks(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tasks")
    metric = "metric_list:\n  - metric: {m}\n"
    _task(folder, "t_mc", MC, 'output_type: multiple_choice\ndoc_to_text: "{{question}}"\n'
          'doc_to_choice: "{{choices}}"\ndoc_to_target: "{{gold}}"\n' + metric.format(m="acc"))
    _task(folder, "t_roll", DOCS, 'output_type: loglikelihood_rolling\ndoc_to_text: ""\n'
          'doc_to_target: "{{text}}"\n' + metric.format(m="word_perplexity"))
    _task(folder, "t_gen", GEN, 'output_type: generate_until\ndoc_to_text: "{{prompt}}"\ndoc_to_target: "{{answer}}"\n'
          'generation_kwargs:\n  until: ["\\n"]\n  max_gen_toks: 5\n  do_sample: false\n'
          + metric.format(m="exact_match"))
    return folder


@pytest.fixture(scope="module")
def task_manager(tasks):
    """lm-eval's index of the test tasks alone (its own thousands of task files take seconds to index)."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=str(tasks), include_defaults=False)


@needs_lm_eval
def test_simple_evaluate_equals_a_plain_forward_for_every_request_type(run, task_manager, monkeypatch):
    from lm_eval import simple_evaluate

    from memlm.eval.harness import MemlmLM

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    lm = MemlmLM(run=run, condition="fetched")
    calls = []
    provider = lm.provider
    lm.provider = lambda keys, cond: calls.append(list(keys)) or provider(keys, cond)
    lm.provider.paths, lm.provider.gated = provider.paths, provider.gated
    res = simple_evaluate(model=lm, tasks=["t_mc", "t_roll", "t_gen"], task_manager=task_manager, log_samples=True,
                          bootstrap_iters=0)
    tok = run.tokenizer
    assert [len(res["samples"][t]) for t in ("t_mc", "t_roll", "t_gen")] == [len(MC), len(DOCS), len(GEN)]
    for s in res["samples"]["t_mc"]:
        item = MC[s["doc_id"]]
        ctx = [int(t) for t in tok.encode(item["question"])]  # this BPE has no template: joined, then split
        for choice, got in zip(item["choices"], s["resps"], strict=True):
            whole = [int(t) for t in tok.encode(item["question"] + " " + choice)]
            assert whole[: len(ctx)] == ctx
            want = _logp(run, whole, item["question"])[len(ctx) - 1:].sum()
            np.testing.assert_allclose(got[0][0], want, rtol=1e-4, atol=1e-4)
    for s in res["samples"]["t_roll"]:
        text = DOCS[s["doc_id"]]["text"]
        ids = [tok.eot_id] + [int(t) for t in tok.encode_plain(text)]  # the EOT that ends the document before
        np.testing.assert_allclose(s["resps"][0][0], _logp(run, ids, text).sum(), rtol=1e-4, atol=1e-4)
    for s in res["samples"]["t_gen"]:
        prompt = GEN[s["doc_id"]]["prompt"]
        assert s["resps"][0][0] == _greedy(run, prompt, 5, prompt).split("\n")[0]
    # batched by routed path: each batch asks for a memory once, each path's key at most once
    paths = [tuple(p) for p in provider.paths([k for c in calls for k in dict.fromkeys(c)], "fetched")]
    start = 0
    for c in calls:
        distinct = list(dict.fromkeys(c))
        assert len({tuple(p) for p in paths[start: start + len(distinct)]}) == len(distinct)
        start += len(distinct)


@needs_lm_eval
def test_context_and_continuation_split_with_a_bos_template(run):
    from memlm.eval.harness import MemlmLM

    lm = MemlmLM(run=run, condition="none")
    bos = 7
    lm._prefix = [bos]
    ctx, cont = lm._encode_pair("The capital of France is ", "Paris")
    plain = [int(t) for t in run.tokenizer.encode_plain("The capital of France is Paris")]
    assert ctx[0] == bos and ctx[1:] + cont == plain and bos not in cont
    assert lm.prefix_token_id == bos


@needs_lm_eval
def test_memlm_eval_tasks_writes_one_file_per_condition(run, tasks, capsys, monkeypatch):
    from memlm.cli import main

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    args = ["eval", "--workdir", str(run.workdir), "--tasks", "t_mc", "--include-path", str(tasks), "--limit", "2"]
    assert main(args + ["--conditions", "none,generic"]) == 0
    assert main(args + ["--conditions", "fetched"]) == 0
    out = capsys.readouterr().out
    assert "t_mc" in out and "fetched" in out
    for c in ("none", "generic", "fetched"):
        saved = json.loads((run.workdir / "eval" / f"harness_{c}.json").read_text())
        assert saved["memlm"]["condition"] == c and "acc,none" in saved["results"]["t_mc"]


def test_tasks_without_lm_eval_fail_with_one_line_naming_the_extra(run, capsys, monkeypatch):
    from memlm.cli import main

    monkeypatch.setitem(sys.modules, "lm_eval", None)  # import lm_eval raises ImportError
    assert main(["eval", "--workdir", str(run.workdir), "--tasks", "t_mc"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "pip install 'memlm[eval]'" in err


def test_capital_task_building_is_deterministic_with_distinct_distractors(tmp_path):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
    from harness_capitals import build_capital_task

    probes = tmp_path / "capital.jsonl"
    rows = [{"prompt": f"The capital of {c} is", "answer": a, "bucket": str(i % 5), "context": "", "entity": c}
            for i, (c, a) in enumerate([("France", "Paris"), ("Peru", "Lima"), ("Norway", "Oslo"),
                                        ("Japan", "Tokyo"), ("Chile", "Santiago")])]
    probes.write_text("".join(json.dumps(r) + "\n" for r in rows))
    name = build_capital_task(probes, tmp_path / "a")
    build_capital_task(probes, tmp_path / "b")
    a = (tmp_path / "a" / f"{name}.jsonl").read_text()
    assert a == (tmp_path / "b" / f"{name}.jsonl").read_text()
    for row, item in zip(rows, map(json.loads, a.splitlines()), strict=True):
        assert item["question"] == row["prompt"] and item["choices"][item["gold"]] == row["answer"]
        assert len(item["choices"]) == 4 and len(set(item["choices"])) == 4
    assert "output_type: multiple_choice" in (tmp_path / "a" / f"{name}.yaml").read_text()


def test_prefix_keyed_perplexity_equals_a_plain_forward(run):
    from memlm.eval.ppl_key import parse_perplexity_key, prefix_perplexity

    n = 6
    assert parse_perplexity_key("prefix:6") == n and parse_perplexity_key("document") is None
    with pytest.raises(ValueError, match="prefix:N"):
        parse_perplexity_key("prefix:0")
    tok = run.tokenizer
    texts = [d["text"] for d in DOCS] + ["Tin."]  # the last is too short to score anything after 6 tokens
    docs = [np.concatenate([ids, [tok.eot_id]]).astype(np.int32) for ids in tok.encode_batch(texts)]
    res = prefix_perplexity(run.fn, run.params, tok, docs, texts, run.memory, ("none", "fetched"), n,
                            seq_len=run.cfg.data.seq_len, batch_size=4)
    assert res["documents"] == 2
    for cond in ("none", "fetched"):
        nll, count, nll_doc = 0.0, 0, 0.0
        for text, ids in zip(texts[:2], docs[:2], strict=True):
            ids = [int(t) for t in ids]
            key = tok.decode(ids[:n])
            assert key and key in text  # the key is the document's opening, never what is scored
            nll -= _logp(run, ids, key, cond)[n - 1:].sum()  # targets ids[n:]
            nll_doc -= _logp(run, ids, text, cond)[n - 1:].sum()
            count += len(ids) - n
        r = res["conditions"][cond]
        assert res["tokens"] == count
        np.testing.assert_allclose(r["perplexity"], np.exp(nll / count), rtol=1e-4)
        np.testing.assert_allclose(r["document_key_perplexity"], np.exp(nll_doc / count), rtol=1e-4)


def test_memlm_eval_reports_both_perplexity_keys(run, capsys):
    from memlm.eval.run import evaluate

    probes = run.workdir / "p.jsonl"
    probes.write_text(json.dumps({"prompt": "The capital of Peru is", "answer": "Lima", "bucket": "0"}) + "\n")
    res = evaluate(run.workdir, probes=str(probes), conditions="none,fetched",
                   overrides={"eval.perplexity_key": "prefix:4"})["p"]
    assert set(res["perplexity"]) == {"none", "fetched"}
    assert res["perplexity_prefix"]["key"] == "prefix:4"
    assert set(res["perplexity_prefix"]["conditions"]) == {"none", "fetched"}
    assert "prefix:4 key" in capsys.readouterr().out


def test_requests_group_by_the_memory_their_keys_fetch(run):
    from memlm.eval.harness_score import memory_groups

    keys = ["The capital of Peru is", "Tin is a metal.", "The capital of Peru is", "oxygen is a gas", "Lima"]
    groups, reps = memory_groups(run.memory, keys, "fetched")
    paths = [tuple(p) for p in run.memory.paths(keys, "fetched")]
    assert len(reps) == len(set(paths)) and groups[0] == groups[2]
    for i in range(len(keys)):
        assert paths[keys.index(reps[groups[i]])] == paths[i]
        assert all((groups[i] == groups[j]) == (paths[i] == paths[j]) for j in range(len(keys)))
    assert memory_groups(run.memory, keys, "generic") == ([0] * len(keys), [keys[0]])


# ---- the RAG baseline ------------------------------------------------------------------------------------
def _index_reference(data_dir: Path, queries: np.ndarray, k: int) -> list[list[int]]:
    """The k nearest training documents by a full numpy search over prepare's unit embeddings."""
    emb, doc, first = [], [], 0
    for d in sorted((data_dir / ".units" / "encode").iterdir()):
        emb.append(np.load(d / "embeddings.npy"))
        doc.append(np.load(d / "spans.npz")["doc"] + first)
        first += len(np.load(d / "doc_offsets.npy")) - 1
    scores = queries @ np.concatenate(emb).T
    doc = np.concatenate(doc)
    out = []
    for s in scores:
        best = {}
        for u in np.argsort(-s, kind="stable"):
            best.setdefault(int(doc[u]), s[u])
            if len(best) == k:
                break
        out.append(list(best))
    return out


def test_rag_retrieves_documents_naming_the_probe_entity_by_an_exact_search(run, monkeypatch):
    import memlm.infer.rag as rag

    monkeypatch.setattr(rag, "SEARCH_ROWS", 37)  # many blocks per shard: the running top-k merges
    probes = [json.loads(line) for line in (run.data_dir / "probes" / "capital.jsonl").read_text().splitlines()][:40]
    keys = [p["prompt"] for p in probes]
    ids = run.memory.documents(keys)
    found = run.memory._documents
    index = found.index
    named = [any(p["entity"] in index.text(d) for d, _ in found.retrieved[p["prompt"]]) for p in probes]
    assert sum(named) >= 0.9 * len(probes), sum(named)
    want = _index_reference(run.data_dir, run.memory.embed(keys), run.cfg.eval.rag_documents)
    assert [[d for d, _ in found.retrieved[k]] for k in keys] == want
    # what goes before the context: the documents best first, within the token budget
    first = run.tokenizer.encode_plain(index.text(want[0][0]) + "\n\n")
    assert 0 < len(ids[0]) <= run.cfg.eval.rag_tokens
    assert ids[0][: min(len(first), len(ids[0]))] == [int(t) for t in first][: len(ids[0])]
    # held-out documents are not in the index (perplexity cannot retrieve its own document)
    manifest = json.loads((run.data_dir / "manifest.json").read_text())
    assert index.documents == manifest["documents"]["training"]
    held = [json.loads(line)["text"] for line in (run.data_dir / "heldout.jsonl").read_text().splitlines()]
    texts = {index.text(d) for d in range(index.documents)}
    assert held and not texts & set(held)


def test_rag_index_is_rebuilt_when_the_data_is_prepared_again(run):
    from memlm.data.records import read_manifest
    from memlm.infer.rag import build_index

    path = build_index(run.data_dir, read_manifest(run.data_dir), run.tokenizer)
    info = json.loads((path / "index.json").read_text())
    (path / "index.json").write_text(json.dumps({**info, "key": "stale"}))
    (path / "00000.text.bin").write_bytes(b"")
    build_index(run.data_dir, read_manifest(run.data_dir), run.tokenizer)
    assert json.loads((path / "index.json").read_text())["key"] == info["key"]
    assert (path / "00000.text.bin").stat().st_size > 0


@pytest.mark.parametrize("condition", ["rag", "rag+fetched"])
def test_rag_perplexity_and_probes_equal_a_plain_forward_with_the_documents_first(run, condition):
    from memlm.eval.perplexity import evaluate_perplexity
    from memlm.eval.probes import Probe, evaluate_probes

    memory = {"rag": "none", "rag+fetched": "fetched"}[condition]
    tok = run.tokenizer
    assert tok.template["prefix"] == []  # memlm's BPE: the documents go first
    texts = [d["text"] for d in DOCS]
    docs = [np.concatenate([ids, [tok.eot_id]]).astype(np.int32) for ids in tok.encode_batch(texts)]
    res = evaluate_perplexity(run.fn, run.params, docs, texts, run.memory, (condition, memory),
                              seq_len=run.cfg.data.seq_len, batch_size=4)["conditions"]
    nll, count = 0.0, 0
    for text, ids in zip(texts, docs, strict=True):
        pre = run.memory.documents([text])[0]
        assert pre
        nll -= _logp(run, pre + [int(t) for t in ids], text, memory)[len(pre):].sum()  # the document's own targets
        count += len(ids) - 1
    assert res[condition]["tokens"] == res[memory]["tokens"] == count
    np.testing.assert_allclose(res[condition]["nll"], nll / count, rtol=1e-4)
    assert abs(res[condition]["nll"] - res[memory]["nll"]) > 1e-3  # the documents change the scores
    probes = [Probe(g["prompt"], g["answer"]) for g in GEN]
    out = evaluate_probes(run.fn, run.params, tok, probes, run.memory, (condition,), max_new_tokens=4, batch_size=4,
                          return_outputs=True)["outputs"][condition]
    for p, o in zip(probes, out, strict=True):
        pre = run.memory.documents([p.key])[0]
        want = _greedy_ids(run, pre + [int(t) for t in tok.encode(p.prompt)], 4, p.key, memory)
        assert o["output"] == tok.decode(want)


@needs_lm_eval
def test_harness_rag_scores_the_choices_after_the_retrieved_documents(run, task_manager, monkeypatch):
    from lm_eval import simple_evaluate

    from memlm.eval.harness import MemlmLM

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    res = simple_evaluate(model=MemlmLM(run=run, condition="rag"), tasks=["t_mc"], task_manager=task_manager,
                          log_samples=True, bootstrap_iters=0)
    tok = run.tokenizer
    for s in res["samples"]["t_mc"]:
        item = MC[s["doc_id"]]
        pre = run.memory.documents([item["question"]])[0]
        ctx = [int(t) for t in tok.encode(item["question"])]
        for choice, got in zip(item["choices"], s["resps"], strict=True):
            whole = [int(t) for t in tok.encode(item["question"] + " " + choice)]
            want = _logp(run, pre + whole, item["question"], "none")[len(pre) + len(ctx) - 1:].sum()
            np.testing.assert_allclose(got[0][0], want, rtol=1e-4, atol=1e-4)


@needs_lm_eval
def test_a_schema_question_is_keyed_by_the_part_its_choices_share():
    from lm_eval.api.instance import Instance

    from memlm.eval.harness import schema_keys

    def req(args, doc_id):
        return Instance("loglikelihood", {}, args, 0, ("t", doc_id, 1))

    reqs = [req(("Anna gave Mia her book because Anna", " was kind."), 0),
            req(("Anna gave Mia her book because Mia", " was kind."), 0),
            req(("The capital of Peru is", " Lima"), 1), req(("The capital of Peru is", " Oslo"), 1)]
    keys = schema_keys(reqs)
    assert keys == {reqs[0].args: " was kind.", reqs[1].args: " was kind."}


# ---- the paper's suite ------------------------------------------------------------------------------------
@needs_lm_eval
def test_the_paper_suite_runs_offline_with_its_shots_and_averages(run, tmp_path, monkeypatch, capsys):
    from suite_data import write_suite_data

    from memlm.eval.harness_run import evaluate_tasks
    from memlm.eval.suite import PAPER_SUITE, SUITE

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    data = write_suite_data(tmp_path / "suite")
    res = evaluate_tasks(run, [SUITE], ["none"], suite_data=str(data), limit=2)["none"]
    out = capsys.readouterr().out
    paper = {"lambada_openai": (0, "CK"), "boolq": (0, "CK"), "squad": (3, "CK"), "wsc273": (3, "CK"),
             "winogrande": (5, "CK"), "coqa": (0, "CK"), "hellaswag": (0, "SK"), "arc_easy": (3, "SK"),
             "arc_challenge": (3, "SK"), "triviaqa": (3, "SK"), "piqa": (0, "SK"), "openbookqa": (10, "SK"),
             "nq_open": (0, "SK")}  # docs/paper.md §5.1
    assert {t.task: (t.shots, t.group) for t in PAPER_SUITE} == paper
    ran = [t for t in PAPER_SUITE if t.derived in res["results"]]
    has_transformers = importlib.util.find_spec("transformers") is not None
    assert len(ran) == 13 - (not has_transformers)
    if not has_transformers:
        assert "CoQA skipped" in out
    for t in ran:
        assert res["n-shot"][t.derived] == t.shots, t.task
        assert res["n-samples"][t.derived]["effective"] == min(2, len(_rows(data, t)))
    suite = res["memlm"]["suite"]
    for group in ("CK", "SK"):
        names = [t.name for t in ran if t.group == group]
        want = np.mean([suite["tasks"][n] for n in names])
        np.testing.assert_allclose(suite[f"Avg-{group}"], want)
        assert suite[f"Avg-{group} tasks"] == f"{len(names)}/{sum(t.group == group for t in PAPER_SUITE)}"
    arc = res["results"][f"{SUITE}_arc_easy"]
    assert suite["tasks"]["ARC-Easy"] == 100 * arc["acc_norm,none"]
    assert "Avg-CK" in out and "Avg-SK" in out
    saved = json.loads((run.workdir / "eval" / "harness_none.json").read_text())
    assert saved["memlm"]["suite"] == suite


def _rows(data: Path, task) -> list:
    from suite_data import DATA

    splits = DATA[task.task]
    return splits.get("test") or splits["validation"]


@needs_lm_eval
def test_the_suite_without_local_data_fails_in_one_line(run, tmp_path, capsys):
    from memlm.cli import main

    (tmp_path / "empty").mkdir()
    code = main(["eval", "--workdir", str(run.workdir), "--tasks", "memlm_paper", "--suite-data",
                 str(tmp_path / "empty")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "no task of the suite" in err


# ---- results that stay ------------------------------------------------------------------------------------
def test_eval_results_merge_per_condition_and_a_bad_probe_file_fails_before_loading(run, capsys, monkeypatch):
    from memlm.cli import main
    from memlm.eval.run import evaluate

    probes = run.workdir / "merge.jsonl"
    probes.write_text(json.dumps({"prompt": "The capital of Peru is", "answer": "Lima", "bucket": "0"}) + "\n")
    first = evaluate(run.workdir, probes=str(probes), conditions="none,fetched")["merge"]
    evaluate(run.workdir, probes=str(probes), conditions="rag")
    saved = json.loads((run.workdir / "eval" / "merge.json").read_text())
    assert set(saved["conditions"]) == {"none", "fetched", "rag"} and set(saved["perplexity"]) == {"none", "fetched",
                                                                                                   "rag"}
    assert saved["conditions"]["fetched"] == first["conditions"]["fetched"]
    outputs = json.loads((run.workdir / "eval" / "merge.outputs.json").read_text())
    assert {"none", "fetched", "rag"} <= set(outputs)
    # results of another step are kept aside, not mixed in
    (run.workdir / "eval" / "merge.json").write_text(json.dumps({**saved, "step": 999}))
    evaluate(run.workdir, probes=str(probes), conditions="none")
    assert set(json.loads((run.workdir / "eval" / "merge.json").read_text())["conditions"]) == {"none"}
    assert json.loads((run.workdir / "eval" / "merge.step999.json").read_text())["step"] == 999
    assert "kept it as merge.step999.json" in capsys.readouterr().out
    # a probe file with a bad line fails in one line, before the run is loaded
    import memlm.eval.run as eval_run

    monkeypatch.setattr(eval_run, "load_run", lambda *a, **k: pytest.fail("loaded the run"))
    bad = run.workdir / "bad.jsonl"
    bad.write_text('{"prompt": "x"}\n')
    assert main(["eval", "--workdir", str(run.workdir), "--probes", str(bad)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "missing field 'answer'" in err[0]


def test_perplexity_only_writes_perplexity_without_probes(run, capsys):
    from memlm.cli import main

    assert main(["eval", "--workdir", str(run.workdir), "--perplexity-only", "--conditions", "none,fetched"]) == 0
    saved = json.loads((run.workdir / "eval" / "perplexity.json").read_text())
    assert set(saved["perplexity"]) == {"none", "fetched"} and saved["step"] == run.step
    assert "held-out perplexity" in capsys.readouterr().out


def test_heldout_documents_are_embedded_once_at_prepare_time(run, monkeypatch):
    from memlm.eval.run import evaluate
    from memlm.infer.run import load_run

    fresh = load_run(run.workdir)
    texts = [json.loads(line)["text"] for line in (run.data_dir / "heldout.jsonl").read_text().splitlines()]
    stored = np.load(run.data_dir / "heldout_embeddings.npy")
    np.testing.assert_array_equal(stored, fresh.memory.embedder.embed(texts))  # as evaluation embeds them
    embedded = []
    real = type(fresh.memory.embedder).embed
    monkeypatch.setattr(type(fresh.memory.embedder), "embed", lambda self, t: embedded.extend(t) or real(self, t))
    import memlm.eval.run as eval_run

    monkeypatch.setattr(eval_run, "load_run", lambda *a, **k: fresh)
    evaluate(run.workdir, conditions="fetched", perplexity_only=True)
    assert not set(embedded) & set(texts) and fresh.memory._emb_cache  # perplexity routed by stored vectors


# ---- lineage ------------------------------------------------------------------------------------------------
def test_trace_names_the_probed_entity_among_the_documents_of_the_fetched_leaf(run, capsys):
    from memlm.cli import main
    from memlm.infer.lineage import trace

    probes = [json.loads(line) for line in (run.data_dir / "probes" / "capital.jsonl").read_text().splitlines()][:20]
    paths = np.load(run.data_dir / "paths.npy")
    doc = np.concatenate([np.load(d / "spans.npz")["doc"] + off for d, off in _unit_dirs(run.data_dir)])
    emb = np.concatenate([np.load(d / "embeddings.npy") for d, _ in _unit_dirs(run.data_dir)])
    named = held = 0
    texts = {}
    for d, off in _unit_dirs(run.data_dir):  # document texts as the training documents hold them
        offsets, tokens = np.load(d / "doc_offsets.npy"), np.fromfile(d / "tokens.bin", np.uint16)
        texts.update({off + i: run.tokenizer.decode(tokens[offsets[i]:offsets[i + 1]])
                      for i in range(len(offsets) - 1)})
    for p in probes:
        res = trace(run, text=p["prompt"], limit=10_000)  # every document of each block
        leaf = res["levels"][-1]
        path = run.memory.paths([p["prompt"]], "fetched")[0]
        assert [(lv["level"], lv["node"]) for lv in res["levels"]] == [(1, int(path[0])), (2, int(path[1]))]
        want = np.unique(doc[paths[:, 1] == path[1]])  # independent: prepare's unit files and paths.npy
        assert leaf["documents"] == len(want) and {d["document"] for d in leaf["shown"]} <= set(want.tolist())
        assert sorted(d["document"] for d in leaf["shown"]) == want.tolist()
        if any(p["entity"] in texts[int(i)] for i in want):  # the leaf the probe fetches holds its entity
            held += 1
            named += any(p["entity"] in d["text"] for d in leaf["shown"])
        # nearest the text first: by the best cosine of a document's units, from prepare's embeddings
        q = run.memory.embed([p["prompt"]])[0]
        best = {}
        for u in np.nonzero(paths[:, 1] == path[1])[0]:
            best[int(doc[u])] = max(best.get(int(doc[u]), -9.0), float(emb[u] @ q))
        shown = [best[d["document"]] for d in leaf["shown"]]
        assert shown == sorted(shown, reverse=True)
    assert held >= 5 and named == held, (named, held)
    assert main(["trace", "--workdir", str(run.workdir), "--block", "1:2", "--limit", "2"]) == 0
    assert "level 1 node 2: trained by" in capsys.readouterr().out
    assert main(["trace", "--workdir", str(run.workdir), "--block", "3:0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "level must be in 1..2" in err[0]


def _unit_dirs(data_dir):
    first = 0
    for d in sorted((data_dir / ".units" / "encode").iterdir()):
        yield d, first
        first += len(np.load(d / "doc_offsets.npy")) - 1


def test_generate_refuses_the_rag_conditions_in_one_line(run, capsys):
    from memlm.cli import main

    assert main(["generate", "--workdir", str(run.workdir), "--prompt", "Lima is", "--condition", "rag"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "RAG baseline of `memlm eval`" in err[0]
