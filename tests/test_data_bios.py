"""The generated ``bios`` corpus: deterministic, long-tailed, and asked about in words its documents
never use (word n-gram overlap of probe and documents, against the facts corpus as the contrast)."""

import importlib.util
import json
import re
from collections import defaultdict

import numpy as np
import pytest

from memlm.corpora import bios
from memlm.corpora.facts import count_mentions

N_DOCS = 8000


@pytest.fixture(scope="module")
def corpus():
    return list(bios.generate(N_DOCS, seed=0))


@pytest.fixture(scope="module")
def people():
    return {p.name: p for p in bios.people()}


@pytest.fixture(scope="module")
def items(corpus, people):
    counts = count_mentions((d["text"] for d in corpus), list(people))
    return bios.probe_items(list(people.values()), counts)


def words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", text.lower())


def ngram_overlap(prompt: str, documents: list[str], name: str, n: int = 3) -> float:
    """Share of the prompt's word n-grams that occur in any of the documents, leaving out n-grams made
    only of the entity's own name (the one thing a question must share with its documents)."""
    own = set(words(name))
    grams = [tuple(g) for g in zip(*(words(prompt)[i:] for i in range(n)), strict=False)]
    grams = [g for g in grams if not set(g) <= own]
    seen = set()
    for d in documents:
        w = words(d)
        seen.update(zip(*(w[i:] for i in range(n)), strict=False))
    return sum(g in seen for g in grams) / max(1, len(grams))


def mean_overlap(docs: list[dict], rows: list[dict]) -> float:
    by_entity = defaultdict(list)
    for d in docs:
        by_entity[d["entity"]].append(d["text"])
    return float(np.mean([ngram_overlap(r["prompt"], by_entity[r["entity"]], r["entity"]) for r in rows]))


def test_generation_is_deterministic_for_a_seed(corpus):
    assert list(bios.generate(N_DOCS, seed=0)) == corpus
    other = list(bios.generate(N_DOCS, seed=1))
    assert other != corpus and len(other) == N_DOCS
    assert [p.fields for p in bios.people()] == [p.fields for p in bios.people()]
    fresh = {p.name for p in bios.people(1)}  # another seed: another corpus of other people
    assert {d["entity"] for d in other} <= fresh and len(fresh & {p.name for p in bios.people()}) < 5
    assert [p.name for p in bios.entities(1)] == [p.name for p in bios.people(1)]


def test_people_are_distinct_and_every_document_is_about_its_person(corpus, people):
    assert len(people) == bios.N_PEOPLE
    assert len({n.lower() for n in people}) == bios.N_PEOPLE
    towns = {p.fields["town"] for p in people.values()}
    assert not {t.lower() for t in towns} & {w.lower() for n in people for w in n.split()}
    for d in corpus[:1000]:
        assert d["entity"] in d["text"] and d["kind"] in ("biography", "questions")


def test_questions_appear_only_in_tutors_documents_and_never_beside_their_answer_sentence(corpus, people):
    asked = {d["entity"] for d in corpus if d["kind"] == "questions"}
    assert asked == {n for n, p in people.items() if p.tutor}
    for d in corpus:
        has_q = " Q: " in f" {d['text']}"
        assert has_q == (d["kind"] == "questions")
        if has_q:  # the answers follow "A:" only: no biography sentence stating them to copy from
            f = people[d["entity"]].fields
            assert d["text"].count(f["town"]) == 1 and d["text"].count(str(f["year"])) == 1


def test_every_probe_fact_is_stated_in_its_persons_biographies(corpus, items):
    by_entity = defaultdict(str)
    for d in corpus:
        by_entity[d["entity"]] += " " + d["text"]
    for rows in items.values():
        for r in rows:
            assert r["answer"] in by_entity[r["entity"]]


def test_probes_ask_only_untutored_people_in_words_their_documents_do_not_use(corpus, people, items):
    for rows in items.values():
        assert len(rows) == bios.N_PEOPLE // 2
        assert all(not people[r["entity"]].tutor and r["context"] == r["prompt"] for r in rows)
    overlap = mean_overlap(corpus, items["hometown"] + items["birth_year"])
    assert overlap == 0.0, overlap
    # the measure can fail: a probe written in its documents' words overlaps fully
    r = items["hometown"][0]
    assert ngram_overlap(f"{r['entity']} was born in the town of", [f"{r['entity']} was born in the town of X."],
                         r["entity"]) == 1.0


@pytest.mark.skipif(any(importlib.util.find_spec(p) is None for p in ("periodictable", "countryinfo", "mendeleev")),
                    reason="the facts corpus needs periodictable, countryinfo and mendeleev (data extras)")
def test_facts_probes_repeat_their_documents_wording_where_bios_probes_do_not():
    from memlm.corpora import facts

    docs = list(facts.generate(4000, seed=0))
    ents = facts.entities()
    rows = [r for rs in facts.probe_items(ents, count_mentions((d["text"] for d in docs), [e.name for e in ents]))
            .values() for r in rs]
    assert mean_overlap(docs, rows) > 0.9


def test_buckets_split_a_long_tail_into_equal_fifths(items):
    rows = items["hometown"]
    sizes = np.bincount([int(r["bucket"]) for r in rows], minlength=5)
    assert len(sizes) == 5 and sizes.max() - sizes.min() <= 1, sizes
    for b in range(4):
        assert max(r["mentions"] for r in rows if r["bucket"] == str(b)) <= min(
            r["mentions"] for r in rows if r["bucket"] == str(b + 1))
    median = [np.median([r["mentions"] for r in rows if r["bucket"] == str(b)]) for b in range(5)]
    assert median[4] >= 8 * median[0], median
    mentions = np.array([r["mentions"] for r in rows])
    assert np.median(mentions) < mentions.mean(), "right-skewed"
    assert [r["bucket"] for r in items["birth_year"]] == [r["bucket"] for r in rows]


def test_documents_per_person_keep_the_floor_and_fall_with_rank(people):
    ps = list(people.values())
    docs = bios.documents_per_person(ps, N_DOCS)
    assert docs.sum() == N_DOCS and docs.min() == bios.MIN_DOCUMENTS
    by_rank = docs[np.argsort([p.rank for p in ps])]
    assert np.all(np.diff(by_rank) <= 0) and by_rank[0] > 100


def test_reader_and_prepare_take_the_name(tmp_path):
    from rich.console import Console

    from memlm.config import load_config
    from memlm.data import prepare
    from memlm.data.readers import iter_documents

    docs = list(iter_documents("bios", facts_documents=1200, facts_seed=0))
    assert [d.text for d in docs] == [d["text"] for d in bios.generate(1200, seed=0)]
    cfg = load_config(None)
    cfg.tree.update(embedder="hash", k=2, depth=2, kmeans_steps=3, kmeans_batch=64)
    cfg.data.update(seq_len=64, tokenizer_vocab=320, records_per_shard=64, facts_documents=1200)
    cfg.eval.heldout_documents = 20
    manifest = prepare(cfg, "bios", tmp_path / "out", console=Console(quiet=True))
    assert set(manifest["probes"]) == {"hometown", "birth_year"}
    rows = [json.loads(x) for x in (tmp_path / "out" / manifest["probes"]["hometown"]).read_text().splitlines()]
    assert len(rows) == bios.N_PEOPLE // 2 and {r["bucket"] for r in rows} == {"0", "1", "2", "3", "4"}
    assert manifest["entities"]["values"] == bios.N_PEOPLE
