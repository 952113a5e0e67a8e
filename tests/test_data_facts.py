"""The generated facts corpus: real facts, a long tail, probes answerable from the corpus, buckets
computed from the corpus itself."""

import importlib.util
import re

import numpy as np
import pytest

pytestmark = pytest.mark.skipif(
    any(importlib.util.find_spec(p) is None for p in ("periodictable", "countryinfo", "mendeleev")),
    reason="the facts corpus needs periodictable, countryinfo and mendeleev (data extras)")

from memlm.corpora import facts  # noqa: E402

N_DOCS = 4000


@pytest.fixture(scope="module")
def corpus():
    return list(facts.generate(N_DOCS, seed=0))


@pytest.fixture(scope="module")
def ents():
    return facts.entities()


@pytest.fixture(scope="module")
def counts(corpus, ents):
    return facts.count_mentions((d["text"] for d in corpus), [e.name for e in ents])


def reference_counts(texts, names):
    """Longest name first; an occurrence inside an already counted longer name does not count."""
    counts = dict.fromkeys(names, 0)
    for text in texts:
        low = text.lower()
        taken = np.zeros(len(low), bool)
        for name in sorted(names, key=len, reverse=True):
            for m in re.finditer(r"(?<!\w)" + re.escape(name.lower()) + r"(?!\w)", low):
                if not taken[m.start():m.end()].any():
                    taken[m.start():m.end()] = True
                    counts[name] += 1
    return counts


def test_tables_hold_the_real_facts(ents):
    elements = {e.name: e.fields for e in ents if e.kind == "element"}
    countries = {e.name: e.fields for e in ents if e.kind == "country"}
    assert len(elements) == 118
    assert (elements["iron"]["Z"], elements["iron"]["symbol"], elements["gold"]["Z"]) == (26, "Fe", 79)
    assert elements["oganesson"]["Z"] == 118 and "abundance" not in elements["oganesson"]
    assert countries["France"]["capital"] == "Paris" and countries["Japan"]["capital"] == "Tokyo"
    assert 200 < len(countries) < 260
    assert len({e.name.lower() for e in ents}) == len(ents), "entity names are unique"


def test_generation_is_deterministic_for_a_seed(corpus):
    again = list(facts.generate(N_DOCS, seed=0))
    assert again == corpus
    other = list(facts.generate(N_DOCS, seed=1))
    assert other != corpus and len(other) == N_DOCS


def test_each_document_talks_about_its_one_entity(corpus):
    for doc in corpus[:500]:
        assert re.search(r"\b" + re.escape(doc["entity"]) + r"\b", doc["text"], re.IGNORECASE)
        assert doc["kind"] in ("element", "country")


def test_documents_per_entity_follow_prominence_with_a_floor(ents):
    docs = facts.documents_per_entity(ents, N_DOCS)
    assert docs.sum() == N_DOCS and docs.min() >= facts.MIN_DOCUMENTS
    by = {e.name: int(n) for e, n in zip(ents, docs, strict=True)}
    assert by["oxygen"] > by["iron"] > by["gold"] >= by["oganesson"] == facts.MIN_DOCUMENTS
    assert by["China"] > by["France"] > by["Iceland"] > by["Tokelau"]


def test_mentions_show_a_long_tail(counts):
    values = np.array(sorted(counts.values()))
    assert values[0] >= 2, "every entity is mentioned a few times"
    assert values[-1] >= 50 * values[0], "the most mentioned entity is far more frequent than the rarest"
    assert np.median(values) < values.mean(), "a right-skewed (long-tail) distribution"
    hist = facts.mention_histogram(counts)
    assert sum(hist.values()) == len(counts)
    text = facts.format_histogram(counts)
    assert "mentions per entity" in text and "rarest:" in text


def test_mention_counting_matches_an_independent_count(corpus, ents, counts):
    names = [e.name for e in ents]
    texts = [d["text"] for d in corpus[:800]]
    assert facts.count_mentions(texts, names) == reference_counts(texts, names)
    assert facts.count_mentions(["Guinea and Papua New Guinea, Guinea-Bissau; GUINEA."], ["Guinea", "Papua New Guinea",
                                                                                         "Guinea-Bissau"]) == {
        "Guinea": 2, "Papua New Guinea": 1, "Guinea-Bissau": 1}


def test_probe_buckets_come_from_corpus_counts(ents, counts):
    items = facts.probe_items(ents, counts)
    assert len(items["atomic_number"]) == 118 and len(items["capital"]) > 200
    for rows in items.values():
        sizes = np.bincount([int(r["bucket"]) for r in rows], minlength=5)
        assert len(sizes) == 5 and sizes.max() - sizes.min() <= 1, sizes
        for r in rows:
            assert r["mentions"] == counts[r["entity"]]
        for b in range(4):  # every item of a rarer bucket is mentioned no more often than any of the next
            lo = max(r["mentions"] for r in rows if r["bucket"] == str(b))
            hi = min(r["mentions"] for r in rows if r["bucket"] == str(b + 1))
            assert lo <= hi
    iron = next(r for r in items["atomic_number"] if r["entity"] == "iron")
    assert (iron["prompt"], iron["answer"], iron["context"]) == ("The atomic number of iron is", "26",
                                                                  "The atomic number of iron is")
    assert next(r for r in items["capital"] if r["entity"] == "France")["prompt"] == "The capital of France is"


def test_every_probe_answer_appears_in_the_corpus_in_the_probe_words(corpus, ents, counts):
    text = "\n".join(d["text"] for d in corpus)
    for rows in facts.probe_items(ents, counts).values():
        for r in rows:
            assert f"{r['prompt']} {r['answer']}." in text, r["prompt"]


def test_too_few_documents_and_missing_packages_fail_clearly(monkeypatch):
    with pytest.raises(facts.FactsError, match="facts_documents = 100 is too small"):
        list(facts.generate(100, seed=0))
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "countryinfo" else real(name, *a))
    with pytest.raises(facts.FactsError, match="needs the 'countryinfo' package"):
        facts.load_countries()


def test_the_reader_streams_the_generated_corpus(corpus):
    from memlm.data.readers import ReadStats, iter_documents

    stats = ReadStats()
    docs = list(iter_documents("facts", stats, facts_documents=N_DOCS, facts_seed=0))
    assert [d.text for d in docs] == [c["text"] for c in corpus] and stats.documents == N_DOCS
    assert docs[0].fields == {"entity": corpus[0]["entity"], "kind": corpus[0]["kind"]}
