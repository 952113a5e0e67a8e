"""The second generated corpus ``bios``: invented people whose probe questions never use their documents' words.

The facts corpus states every probe fact, in an entity's first document, in the probe's own
words, so a probe's retrieval key is nearly a copy of a training document. Real questions are not.
``bios`` is built so that they are not either:

- **Documents** are short biographies of invented people (names, towns and works made of
  syllables, so nothing can be known before training). Each person has a trade (painter,
  astronomer, ...), and a document mixes sentences about the trade, with that trade's own
  vocabulary, with the person's hometown and birth year, in several phrasings, in random order.
  A person's first document states both facts.
- **Questions** ask for the hometown and the birth year in words no biography uses
  (:data:`QUESTIONS`: "What place does X call home?", "In what year did X first see daylight?").
  The question form is learnable only from *tutor* people: every other person (by frequency
  rank) is a tutor, and a tutor also has question-and-answer documents (a sentence about the trade,
  then the questions with their answers, never the biography sentence that states them). The
  probes ask about the other people only, whose documents never hold a question: answering needs
  the fact stored from the biographies and the question form learnt from others (knowledge
  extraction), and the retrieval key shares only the name with the documents.
- **Long tail**: a person gets ``MIN_DOCUMENTS`` documents plus a share of the rest proportional
  to ``(rank + ZIPF_OFFSET) ** -ZIPF`` (a random rank per person), so the rarest fifth have two or
  three documents and the most frequent fifth dozens to hundreds. Buckets come from counting each
  name in the training documents (:func:`memlm.corpora.facts.count_mentions`), as for facts.

Deterministic for (n_documents, seed): the people (names, towns, years, trades, ranks) come from
:data:`TABLE_SEED` for seed 0 (the documented corpus) and from (TABLE_SEED, seed) for any other
seed, so ``data.seed`` draws a fresh corpus of other people (a held-out check of settings chosen on
seed 0); each document's text depends only on (seed, person, its index among the person's
documents). No package data is read.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Any

import numpy as np

from memlm.corpora.facts import allocate, buckets

N_PEOPLE = 500
N_TOWNS = 40
MIN_DOCUMENTS = 2
ZIPF = 2.0  # documents beyond the floor fall off as (rank + ZIPF_OFFSET) ** -ZIPF
ZIPF_OFFSET = 20
TABLE_SEED = 20261202
GENERATOR_VERSION = 2  # bump when templates, tables or allocation change: invalidates cached corpora
FIRST_YEAR, LAST_YEAR = 1620, 1960


@dataclasses.dataclass
class Person:
    """One invented person: the fields the templates use, and the frequency rank (0 = most written about)."""

    name: str
    rank: int
    tutor: bool  # has question-and-answer documents; never probed
    fields: dict[str, Any]


# ----------------------------------------------------------------------------------------------
# Tables

_ONSETS = ("b", "br", "c", "d", "dr", "f", "g", "gr", "h", "j", "k", "kl", "l", "m", "n", "p", "pr", "r", "s",
           "st", "t", "tr", "v", "w", "z")
_VOWELS = ("a", "e", "i", "o", "u", "a", "e", "o", "ei", "ou")
_CODAS = ("", "", "n", "r", "l", "s", "th", "nd", "m", "k")


def _word(rng: np.random.Generator, syllables: int) -> str:
    parts = [_ONSETS[rng.integers(len(_ONSETS))] + _VOWELS[rng.integers(len(_VOWELS))] for _ in range(syllables)]
    return ("".join(parts) + _CODAS[rng.integers(len(_CODAS))]).capitalize()


def _unique_words(rng: np.random.Generator, n: int, syllables: tuple[int, ...], taken: set[str]) -> list[str]:
    out = []
    while len(out) < n:
        w = _word(rng, int(rng.choice(syllables)))
        if 4 <= len(w) <= 9 and w.lower() not in taken:
            taken.add(w.lower())
            out.append(w)
    return out


# trade: (noun, sentences about the work; {work} is the person's best-known work)
TRADES: dict[str, tuple[str, tuple[str, ...]]] = {
    "painter": ("painter", (
        "{Name} painted harbour scenes in oil on large canvases.",
        "The canvas {work} by {name} hangs in a gallery of portraits and landscapes.",
        "{Name} mixed pigments by hand and worked with a palette knife and fine brushes.",
        "Critics praised the light and colour of {work}, a painting by {name}.",
    )),
    "astronomer": ("astronomer", (
        "{Name} observed comets and variable stars through a brass telescope.",
        "The star catalogue {work} by {name} lists the orbits of many planets and moons.",
        "{Name} measured the parallax of nearby stars at an observatory on a hill.",
        "Night after night {name} charted eclipses and the phases of the moon for {work}.",
    )),
    "sailor": ("sea captain", (
        "{Name} commanded a three-masted ship across stormy oceans.",
        "The logbook {work} by {name} records voyages, harbours, tides and trade winds.",
        "{Name} navigated by compass and sextant along dangerous coasts.",
        "Sailors under {name} crossed the ocean with cargo, charts and the journal {work}.",
    )),
    "composer": ("composer", (
        "{Name} wrote symphonies and string quartets for the concert hall.",
        "The opera {work} by {name} was first performed with a full orchestra and choir.",
        "{Name} played the violin and the organ and taught harmony to young musicians.",
        "Audiences still hear the melodies and chords of {work}, a sonata by {name}.",
    )),
    "botanist": ("botanist", (
        "{Name} collected ferns, mosses and flowering plants in the mountains.",
        "The herbarium {work} by {name} describes the seeds, roots and leaves of rare species.",
        "{Name} grew orchids in a glasshouse and studied how pollen reaches the flower.",
        "Gardeners use {work}, the plant guide by {name}, to name trees and shrubs.",
    )),
    "architect": ("architect", (
        "{Name} designed bridges, towers and arched stone buildings.",
        "The cathedral plan {work} by {name} shows vaults, columns and tall windows.",
        "{Name} drew floor plans and facades and supervised masons on the building site.",
        "Engineers still study the domes and beams of {work}, a building by {name}.",
    )),
    "chess": ("chess master", (
        "{Name} won chess tournaments with bold openings and patient endgames.",
        "The chess book {work} by {name} analyses gambits, pawn structures and checkmates.",
        "{Name} played simultaneous exhibitions against dozens of opponents on many boards.",
        "Players still study the rook and bishop manoeuvres in {work}, a match by {name}.",
    )),
    "physician": ("physician", (
        "{Name} treated fevers and wounds in a hospital for the poor.",
        "The medical treatise {work} by {name} describes the heart, the lungs and the pulse.",
        "{Name} examined patients, prescribed remedies and taught surgery to students.",
        "Doctors used {work}, the handbook by {name}, to diagnose disease and heal injuries.",
    )),
}

_TITLE_ADJ = ("Silver", "Quiet", "Northern", "Golden", "Hidden", "Distant", "Crimson", "Winter", "Broken", "Green",
              "Evening", "Last", "Iron", "Little", "Great", "Seventh")
_TITLE_NOUN = ("Orchard", "Tide", "Lantern", "Garden", "Crossing", "Bell", "River", "Compass", "Mirror", "Harvest",
               "Gate", "Window", "Voyage", "Letter", "Spiral", "Meadow")


def people(seed: int = 0) -> list[Person]:
    """The table of invented people of corpus seed ``seed`` (0: the fixed default table), in name order."""
    rng = np.random.default_rng(TABLE_SEED if seed == 0 else [TABLE_SEED, seed])
    taken: set[str] = set()
    towns = _unique_words(rng, N_TOWNS, (2, 3), taken)
    firsts = _unique_words(rng, N_PEOPLE, (1, 2), taken)
    lasts = _unique_words(rng, N_PEOPLE, (2,), taken)
    ranks = rng.permutation(N_PEOPLE)
    trades = list(TRADES)
    out = []
    for i in range(N_PEOPLE):
        name = f"{firsts[i]} {lasts[i]}"
        trade = trades[int(rng.integers(len(trades)))]
        work = f"The {_TITLE_ADJ[rng.integers(len(_TITLE_ADJ))]} {_TITLE_NOUN[rng.integers(len(_TITLE_NOUN))]}"
        fields = dict(name=name, Name=name, town=towns[int(rng.integers(N_TOWNS))],
                      year=int(rng.integers(FIRST_YEAR, LAST_YEAR + 1)), trade=trade, noun=TRADES[trade][0],
                      a_noun=("an " if TRADES[trade][0][0] in "aeiou" else "a ") + TRADES[trade][0], work=work)
        rank = int(ranks[i])
        out.append(Person(name, rank, tutor=rank % 2 == 0, fields=fields))
    return sorted(out, key=lambda p: p.name)


# ----------------------------------------------------------------------------------------------
# Templates. Biography phrasings of the two probe facts; QUESTIONS use none of their words but the name.

HOMETOWN = (
    "{Name} was born in the town of {town}.",
    "{town} is the birthplace of {name}.",
    "{Name} is a native of {town}.",
    "The {noun} {name} came into the world in {town}.",
)
BIRTH_YEAR = (
    "{Name} was born in {year}.",
    "The birth of {name} took place in {year}.",
    "{Name}, born {year}, later became {a_noun}.",
    "Records give {year} as the year of birth of {name}.",
)
BOTH = (
    "{Name} was born in {town} in {year}.",
    "Born in {town} in {year}, {name} grew up to be {a_noun}.",
)
INTROS = ("{Name} was {a_noun}.", "This is a short biography of the {noun} {name}.", "Some notes on {name} follow.")

QUESTIONS = {
    # probe name: (question, answer field)
    "hometown": ("Q: What place does {name} call home? A:", "town"),
    "birth_year": ("Q: In what year did {name} first see daylight? A:", "year"),
}
QA_SHARE = 0.2  # a tutor's documents after the second are question-and-answer documents this often


def _sentence(s: str) -> str:
    return s[0].upper() + s[1:]


def _biography(p: Person, rng: np.random.Generator, first: bool) -> str:
    f = p.fields
    work = list(TRADES[f["trade"]][1])
    facts: list[str] = []
    if first or rng.random() < 0.3:
        facts.append(BOTH[int(rng.integers(len(BOTH)))])
    else:
        if rng.random() < 0.6:
            facts.append(HOMETOWN[int(rng.integers(len(HOMETOWN)))])
        if rng.random() < 0.6:
            facts.append(BIRTH_YEAR[int(rng.integers(len(BIRTH_YEAR)))])
    picked = [work[i] for i in rng.choice(len(work), size=int(rng.integers(1, 4)), replace=False)]
    sentences = facts + picked
    sentences = [sentences[i] for i in rng.permutation(len(sentences))]
    if rng.random() < 0.5:
        sentences.insert(0, INTROS[int(rng.integers(len(INTROS)))])
    return " ".join(_sentence(s.format(**f)) for s in sentences)


def _questions(p: Person, rng: np.random.Generator) -> str:
    f = p.fields
    work = TRADES[f["trade"]][1]
    qa = [f"{q.format(**f)} {f[field]}." for q, field in QUESTIONS.values()]
    qa = [qa[i] for i in rng.permutation(len(qa))]
    return " ".join([_sentence(work[int(rng.integers(len(work)))].format(**f)), *qa])


def render(p: Person, j: int, seed: int) -> tuple[str, str]:
    """(text, kind) of person ``p``'s ``j``-th document for ``seed``; kind "biography" or "questions"."""
    rng = np.random.default_rng([seed, TABLE_SEED, p.rank, j])
    if p.tutor and (j == 1 or (j > 1 and rng.random() < QA_SHARE)):
        return _questions(p, rng), "questions"
    return _biography(p, rng, first=j == 0), "biography"


def documents_per_person(ps: list[Person], n_documents: int) -> np.ndarray:
    """``MIN_DOCUMENTS`` each plus the rest in proportion to ``(rank + ZIPF_OFFSET) ** -ZIPF``."""
    prominence = np.array([(p.rank + float(ZIPF_OFFSET)) ** -ZIPF for p in ps])
    return allocate(prominence, n_documents, 1.0, MIN_DOCUMENTS)


def generate(n_documents: int, seed: int) -> Iterator[dict[str, Any]]:
    """Yield ``n_documents`` documents ``{"text", "entity", "kind"}`` in a seeded random order
    (``kind``: "biography" or "questions")."""
    ps = people(seed)
    counts = documents_per_person(ps, n_documents)
    owner = np.repeat(np.arange(len(ps)), counts)
    nth = np.concatenate([np.arange(c) for c in counts])
    for i in np.random.default_rng([seed, 7]).permutation(len(owner)):
        p, j = ps[int(owner[i])], int(nth[i])
        text, kind = render(p, j, seed)
        yield {"text": text, "entity": p.name, "kind": kind}


def source_versions() -> dict[str, str]:
    """Nothing is read from packages: the generator version is the whole identity."""
    return {"bios": str(GENERATOR_VERSION)}


def entities(seed: int = 0) -> list[Person]:
    """All people of the corpus of ``seed`` (the probes stage counts every name)."""
    return people(seed)


def probe_items(ps: list[Person], counts: dict[str, int]) -> dict[str, list[dict[str, Any]]]:
    """Probe files' items for the non-tutor people: prompt (the question), answer, bucket (from
    ``counts`` among the probed people), context, entity, mentions."""
    probed = [p for p in ps if not p.tutor]
    bucket = buckets({p.name: counts[p.name] for p in probed})
    out = {}
    for probe, (question, field) in QUESTIONS.items():
        items = []
        for p in probed:
            q = question.format(**p.fields)
            items.append(dict(prompt=q, answer=str(p.fields[field]), bucket=bucket[p.name], context=q,
                              entity=p.name, mentions=counts[p.name]))
        out[probe] = items
    return out
