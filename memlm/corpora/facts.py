"""The embedded default corpus ``facts``: a GENERATED corpus of REAL facts, with a natural long tail.

Nothing here is invented: every fact comes from a table shipped in a PyPI package
(``periodictable`` for the 118 elements' names, symbols, atomic weights and densities;
``mendeleev``'s bundled sqlite database for crustal abundance, discovery, periodic-table position
and name origins; ``countryinfo`` for countries' capitals, populations, areas, regions, language
and currency codes, demonyms, calling codes, domains and borders). What is generated is the prose:
each document talks about one entity and states a few of its facts through varied sentence
templates, so documents about one topic cluster together in the retrieval tree.

How often an entity is written about follows its real-world prominence: an element's crustal
abundance (mg/kg; synthetic elements with no natural abundance get the minimum), a country's
population. An entity gets ``MIN_DOCUMENTS`` documents plus a share of the rest proportional to
``prominence ** alpha`` (alpha per table, below), so rare entities are mentioned a few times and
common ones hundreds: the long tail the paper's memories are meant for.

Probes come with the corpus: the paper's atomic-number probe ("The atomic number of {element} is",
all 118 elements) and a capital probe ("The capital of {country} is"). The first document about an
entity always states its probe fact in exactly the probe's words; later documents use that phrasing
or others at random. Each probe item's frequency bucket ("0" rarest .. "4" most frequent, five
groups of about equal size, as the paper) comes from counting the entity's mentions in the corpus
the model trains on (:func:`count_mentions`), not from the allocation above.

The data packages are optional: they are imported only here, inside functions, and a missing one is
a :class:`FactsError` naming it.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import importlib.util
import json
import math
import os
import re
import sqlite3
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

MIN_DOCUMENTS = 2  # every entity is written about at least this often: a rare fact is still learnable
ELEMENT_ALPHA = 0.25  # crustal abundance spans 18 orders of magnitude: a strong compression
COUNTRY_ALPHA = 0.4  # population spans 8
N_BUCKETS = 5
GENERATOR_VERSION = 1  # bump when templates or allocation change: invalidates cached corpora


class FactsError(ValueError):
    """The facts corpus cannot be built (a data package is missing); the message names it."""


@dataclasses.dataclass
class Entity:
    """One thing the corpus talks about, with the fields its sentence templates use."""

    kind: str  # "element" or "country"
    name: str  # the bare name, as counted in the corpus
    prominence: float
    fields: dict[str, Any]


# ----------------------------------------------------------------------------------------------
# Fact tables


def _require(package: str, why: str) -> None:
    if importlib.util.find_spec(package) is None:
        raise FactsError(f"the facts corpus needs the '{package}' package ({why}); "
                         f"install it with: pip install {'--no-deps ' if package == 'mendeleev' else ''}{package}")


def _mendeleev_db() -> sqlite3.Connection:
    """mendeleev's bundled element database, opened read-only without importing mendeleev
    (whose import pulls pandas and SQLAlchemy; ``pip install --no-deps mendeleev`` is enough)."""
    _require("mendeleev", "crustal abundance and discovery of the elements")
    spec = importlib.util.find_spec("mendeleev")
    assert spec is not None and spec.submodule_search_locations
    db = Path(list(spec.submodule_search_locations)[0]) / "elements.db"
    if not db.is_file():
        raise FactsError(f"mendeleev is installed but its database {str(db)!r} is missing")
    return sqlite3.connect(f"file:{db}?mode=ro", uri=True)


def _clean(text: str | None) -> str | None:
    if text is None:
        return None
    text = " ".join(str(text).split()).strip().rstrip(".")
    return text or None


def _number(x: float, digits: int = 4) -> str:
    """A measured value as written in prose: significant digits, thousands separators."""
    if x >= 1000:
        return f"{round(x):,}"
    return f"{x:.{digits}g}"


def load_elements() -> list[Entity]:
    """The 118 elements: periodictable's basic data joined with mendeleev's database."""
    _require("periodictable", "names, symbols, atomic weights and densities of the elements")
    import periodictable

    con = _mendeleev_db()
    rows = con.execute(
        "select e.atomic_number, e.abundance_crust, e.discovery_year, e.discoverers, e.discovery_location, "
        "e.period, e.group_id, e.block, s.name, e.name_origin from elements e "
        "left join series s on e.series_id = s.id order by e.atomic_number").fetchall()
    con.close()
    extra = {r[0]: r[1:] for r in rows}
    names = {el.number: el.name for el in periodictable.elements if el.number > 0}
    out = []
    for el in periodictable.elements:
        z = el.number
        if z == 0:
            continue  # periodictable's free neutron
        abundance, year, discoverers, location, period, group, block, series, origin = extra[z]
        f: dict[str, Any] = dict(name=el.name, Name=el.name.capitalize(), Z=z, symbol=el.symbol,
                                 mass=_number(float(el.mass), 6))
        if el.density is not None and not el.density_caveat:
            f["density"] = _number(float(el.density))
        if abundance:
            f["abundance"] = _number(float(abundance), 3)
        discoverers = _clean(discoverers)
        if discoverers and discoverers.lower().startswith("known to the ancients"):
            f["ancient"] = True
        elif year:
            f["year"] = int(year)
            if discoverers:
                f["discoverers"] = discoverers
            if _clean(location):
                f["location"] = _clean(location)
        if period:
            f["period"] = int(period)
        if group:
            f["group"] = int(group)
        if block:
            f["block"] = block
            f["a_block"] = ("an " if block in "sf" else "a ") + block
        if series:
            f["series"] = series.lower()
        if _clean(origin):
            f["origin"] = _clean(origin)
        if z - 1 in names:
            f["prev"] = names[z - 1]
        if z + 1 in names:
            f["next"] = names[z + 1]
        out.append(Entity("element", el.name, float(abundance or 0.0), f))
    if len(out) != 118:
        raise FactsError(f"periodictable lists {len(out)} elements, expected 118")
    return out


_ARTICLE_START = ("United ", "Republic of", "Democratic Republic", "Federated States", "British ", "French Southern",
                  "Holy See")
_ARTICLE_END = ("Islands", "Republic", "Netherlands", "Philippines", "Emirates", "Lands", "Territory")


def _country_forms(name: str) -> tuple[str, str, str]:
    """(bare name, form inside a sentence, form at its start): 'the Netherlands', 'The Netherlands'."""
    if name.startswith("The "):
        bare = name[4:]
        return bare, f"the {bare}", f"The {bare}"
    if name.startswith(_ARTICLE_START) or name.endswith(_ARTICLE_END):
        return name, f"the {name}", f"The {name}"
    return name, name, name


def _join(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def load_countries() -> list[Entity]:
    """countryinfo's countries and territories that have a capital and a population (one per ISO code)."""
    _require("countryinfo", "capitals, populations and other facts of countries")
    from countryinfo import CountryInfo

    table = CountryInfo.all()
    by_code: dict[str, dict] = {}
    for key in sorted(table):
        c = table[key]
        capital = c.get("capital")
        if isinstance(capital, list):
            capital = capital[0] if capital else None
        if not capital or not c.get("population"):
            continue
        code = (c.get("ISO") or {}).get("alpha3") or c["name"]
        if code not in by_code or c["population"] > by_code[code]["population"]:  # duplicates: Burma/Myanmar
            by_code[code] = dict(c, capital=capital)
    alpha3_name = {code: _country_forms(c["name"])[1] for code, c in by_code.items()}
    out = []
    for code in sorted(by_code):
        c = by_code[code]
        bare, mid, start = _country_forms(c["name"])
        f: dict[str, Any] = dict(name=mid, Name=start, capital=c["capital"], population=f"{int(c['population']):,}")
        if c.get("area"):
            f["area"] = _number(float(c["area"]))
        if c.get("region"):
            f["region"] = c["region"]
        if c.get("subregion"):
            f["subregion"] = c["subregion"]
        if c.get("languages"):
            f["languages"] = _join(list(c["languages"]))
        if c.get("currencies"):
            f["currency"] = c["currencies"][0]
        if c.get("demonym"):
            f["demonym"] = c["demonym"]
        if c.get("callingCodes") and c["callingCodes"][0]:
            f["calling_code"] = c["callingCodes"][0]
        if c.get("tld"):
            f["tld"] = c["tld"][0]
        borders = [alpha3_name[b] for b in c.get("borders") or [] if b in alpha3_name]
        if borders:
            f["borders"] = _join(borders)
        out.append(Entity("country", bare, float(c["population"]), f))
    return out


# ----------------------------------------------------------------------------------------------
# Sentence templates: (fact, fields it needs, phrasings). The first phrasing of a probe fact is the
# probe prompt followed by the answer.

ELEMENT_FACTS: list[tuple[str, tuple[str, ...], tuple[str, ...]]] = [
    ("atomic_number", ("Z",), (
        "The atomic number of {name} is {Z}.",
        "{Name} has the atomic number {Z}.",
        "{Name} is element {Z} of the periodic table.",
        "An atom of {name} has {Z} protons in its nucleus.",
    )),
    ("symbol", ("symbol",), (
        "The chemical symbol of {name} is {symbol}.",
        "{Name} is written with the symbol {symbol}.",
        "The symbol {symbol} stands for {name}.",
    )),
    ("mass", ("mass",), (
        "The standard atomic weight of {name} is {mass}.",
        "{Name} has an atomic mass of about {mass} daltons.",
    )),
    ("density", ("density",), (
        "{Name} has a density of {density} grams per cubic centimetre.",
        "The density of {name} is {density} g/cm3.",
    )),
    ("abundance", ("abundance",), (
        "The Earth's crust holds about {abundance} milligrams of {name} per kilogram.",
        "{Name} makes up about {abundance} mg/kg of the Earth's crust.",
    )),
    ("discovery", ("year", "discoverers"), (
        "{Name} was discovered in {year} by {discoverers}.",
        "{discoverers} discovered {name} in {year}.",
    )),
    ("discovery_year", ("year",), (
        "The discovery of {name} dates to {year}.",
        "{Name} was first identified in {year}.",
    )),
    ("location", ("location",), (
        "{Name} was discovered in {location}.",
    )),
    ("ancient", ("ancient",), (
        "{Name} has been known since ancient times.",
        "People have known {name} since antiquity.",
    )),
    ("position", ("period", "group"), (
        "{Name} is in period {period} and group {group} of the periodic table.",
        "In the periodic table, {name} sits in group {group}, period {period}.",
    )),
    ("period", ("period",), (
        "{Name} belongs to period {period}.",
    )),
    ("block", ("a_block",), (
        "{Name} is {a_block}-block element.",
    )),
    ("series", ("series",), (
        "{Name} is one of the {series}.",
        "{Name} belongs to the {series}.",
    )),
    ("neighbours", ("prev", "next"), (
        "In the periodic table, {name} comes after {prev} and before {next}.",
        "{Name} lies between {prev} and {next} in the periodic table.",
    )),
    ("origin", ("origin",), (
        "On the name {name}: {origin}.",
    )),
]

COUNTRY_FACTS: list[tuple[str, tuple[str, ...], tuple[str, ...]]] = [
    ("capital", ("capital",), (
        "The capital of {name} is {capital}.",
        "{capital} is the capital of {name}.",
        "{Name} is governed from its capital, {capital}.",
        "The seat of government of {name} is in {capital}.",
    )),
    ("population", ("population",), (
        "{Name} has a population of about {population}.",
        "About {population} people live in {name}.",
        "The population of {name} is roughly {population}.",
    )),
    ("area", ("area",), (
        "{Name} covers {area} square kilometres.",
        "The area of {name} is {area} km2.",
    )),
    ("region", ("subregion", "region"), (
        "{Name} lies in {subregion}, a part of {region}.",
        "{Name} is in {region}, in the {subregion} subregion.",
    )),
    ("languages", ("languages",), (
        "The ISO 639-1 codes of the languages of {name} are {languages}.",
        "Languages of {name} (ISO 639-1): {languages}.",
    )),
    ("currency", ("currency",), (
        "The currency of {name} has the ISO 4217 code {currency}.",
        "Prices in {name} are given in {currency}.",
    )),
    ("demonym", ("demonym",), (
        "People from {name} are called {demonym}.",
        "The demonym for {name} is {demonym}.",
    )),
    ("calling_code", ("calling_code",), (
        "The international dialling code of {name} is +{calling_code}.",
    )),
    ("tld", ("tld",), (
        "Internet addresses in {name} end in {tld}.",
    )),
    ("borders", ("borders",), (
        "{Name} shares borders with {borders}.",
        "The neighbours of {name} are {borders}.",
    )),
]

INTROS = {
    "element": ("{Name} ({symbol}) is a chemical element.", "Here are some facts about {name}.",
                "{Name} is a chemical element."),
    "country": ("Here are some facts about {name}.", "{Name} is a place on Earth with its own government.",
                "This note is about {name}."),
}

PROBES = {
    # probe name: (entity kind, probe fact, prompt template, answer field)
    "atomic_number": ("element", "atomic_number", "The atomic number of {name} is", "Z"),
    "capital": ("country", "capital", "The capital of {name} is", "capital"),
}
_KEY_FACT = {kind: fact for kind, fact, _, _ in PROBES.values()}


# ----------------------------------------------------------------------------------------------
# Generation


def allocate(prominence: np.ndarray, total: int, alpha: float, floor: int = MIN_DOCUMENTS) -> np.ndarray:
    """Documents per entity: ``floor`` each plus the rest in proportion to ``prominence ** alpha``
    (largest-remainder rounding, so the counts sum to ``total`` exactly)."""
    n = len(prominence)
    if total < floor * n:
        raise FactsError(f"{total} documents are too few: {n} entities need at least {floor} each ({floor * n})")
    w = np.power(np.maximum(prominence, 0.0), alpha)
    w = w / w.sum() if w.sum() > 0 else np.full(n, 1.0 / n)
    share = (total - floor * n) * w
    counts = np.floor(share).astype(np.int64)
    rest = total - floor * n - int(counts.sum())
    order = np.lexsort((np.arange(n), -(share - counts)))  # largest remainders first, ties by index
    counts[order[:rest]] += 1
    return counts + floor


def entities(seed: int = 0) -> list[Entity]:
    """All entities of the corpus, elements first (the same for every seed: real tables)."""
    return load_elements() + load_countries()


def _render(entity: Entity, rng: np.random.Generator, first: bool) -> str:
    facts = ELEMENT_FACTS if entity.kind == "element" else COUNTRY_FACTS
    f = entity.fields
    usable = [(key, phrasings) for key, needs, phrasings in facts if all(k in f for k in needs)]
    key_fact = _KEY_FACT[entity.kind]
    n = int(rng.integers(2, 6))
    picked = [usable[i] for i in rng.choice(len(usable), size=min(n, len(usable)), replace=False)]
    if first and all(key != key_fact for key, _ in picked):
        picked[0] = next(u for u in usable if u[0] == key_fact)
    sentences = []
    for key, phrasings in picked:
        if key == key_fact:  # the probe's phrasing half the time (always in an entity's first document)
            i = 0 if first or rng.random() < 0.5 else int(rng.integers(1, len(phrasings)))
        else:
            i = int(rng.integers(len(phrasings)))
        sentences.append(phrasings[i].format(**f))
    if rng.random() < 0.5:
        intros = INTROS[entity.kind]
        sentences.insert(0, intros[int(rng.integers(len(intros)))].format(**f))
    return " ".join(s[0].upper() + s[1:] for s in sentences)


def documents_per_entity(ents: list[Entity], n_documents: int) -> np.ndarray:
    """Split ``n_documents`` over the two tables by entity count, then by prominence within each."""
    if n_documents < MIN_DOCUMENTS * len(ents):
        raise FactsError(f"data.facts_documents = {n_documents} is too small: {len(ents)} entities need at least "
                         f"{MIN_DOCUMENTS} documents each ({MIN_DOCUMENTS * len(ents)})")
    kinds = np.array([e.kind for e in ents])
    prom = np.array([e.prominence for e in ents])
    counts = np.zeros(len(ents), dtype=np.int64)
    n_el = int(round(n_documents * (kinds == "element").mean()))
    for kind, alpha, total in (("element", ELEMENT_ALPHA, n_el), ("country", COUNTRY_ALPHA, n_documents - n_el)):
        sel = kinds == kind
        counts[sel] = allocate(prom[sel], total, alpha)
    return counts


def generate(n_documents: int, seed: int) -> Iterator[dict[str, Any]]:
    """Yield ``n_documents`` documents ``{"text", "entity", "kind"}`` in a seeded random order.

    Deterministic for (n_documents, seed, package data): each document's text depends only on
    (seed, entity, its index among the entity's documents).
    """
    ents = entities()
    counts = documents_per_entity(ents, n_documents)
    owner = np.repeat(np.arange(len(ents)), counts)
    nth = np.concatenate([np.arange(c) for c in counts])
    for i in np.random.default_rng(seed).permutation(len(owner)):
        e, j = int(owner[i]), int(nth[i])
        rng = np.random.default_rng([seed, e, j])
        yield {"text": _render(ents[e], rng, first=j == 0), "entity": ents[e].name, "kind": ents[e].kind}


def source_versions() -> dict[str, str]:
    """Versions of the data packages the corpus is built from (part of the stage cache key)."""
    out = {}
    for pkg in ("periodictable", "mendeleev", "countryinfo"):
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            out[pkg] = "missing"
    return out


def write_corpus(path: str | os.PathLike, n_documents: int, seed: int) -> int:
    """Write the generated corpus as JSONL (one ``{"text", "entity", "kind"}`` a line); returns the count."""
    tmp = f"{path}.tmp"
    n = 0
    with open(tmp, "w", encoding="utf-8") as f:
        for doc in generate(n_documents, seed):
            f.write(json.dumps(doc, ensure_ascii=False) + "\n")
            n += 1
    os.replace(tmp, path)
    return n


# ----------------------------------------------------------------------------------------------
# Mentions, buckets, probes


def count_mentions(texts: Iterable[str], names: list[str]) -> dict[str, int]:
    """How often each name occurs in the texts (whole words, any case; the longest name wins where
    names overlap, so 'Guinea' is not counted inside 'Papua New Guinea')."""
    ordered = sorted(set(names), key=lambda s: (-len(s), s))
    pattern = re.compile(r"\b(?:" + "|".join(re.escape(n) for n in ordered) + r")\b", re.IGNORECASE)
    canonical = {n.lower(): n for n in ordered}
    counts = dict.fromkeys(names, 0)
    for text in texts:
        for m in pattern.finditer(text):
            counts[canonical[m.group(0).lower()]] += 1
    return counts


def buckets(counts: dict[str, int], n_buckets: int = N_BUCKETS) -> dict[str, str]:
    """Frequency buckets "0" (rarest) .. "n-1" of about equal size, by rank of mention count
    (ties broken by name, so the split is deterministic)."""
    ranked = sorted(counts, key=lambda n: (counts[n], n))
    return {name: str(i * n_buckets // len(ranked)) for i, name in enumerate(ranked)}


def probe_items(ents: list[Entity], counts: dict[str, int]) -> dict[str, list[dict[str, Any]]]:
    """Probe files' items: prompt, answer, bucket (from ``counts``), context, entity, mentions."""
    out = {}
    for probe, (kind, _, prompt, answer_field) in PROBES.items():
        members = [e for e in ents if e.kind == kind]
        bucket = buckets({e.name: counts[e.name] for e in members})
        items = []
        for e in members:
            p = prompt.format(**e.fields)
            items.append(dict(prompt=p, answer=str(e.fields[answer_field]), bucket=bucket[e.name], context=p,
                              entity=e.name, mentions=counts[e.name]))
        out[probe] = items
    return out


def write_probes(out_dir: str | os.PathLike, items: dict[str, list[dict[str, Any]]]) -> dict[str, str]:
    """Write each probe as ``<out_dir>/<name>.jsonl``; returns {name: path}."""
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, rows in items.items():
        path = Path(out_dir) / f"{name}.jsonl"
        with open(path, "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        paths[name] = str(path)
    return paths


def mention_histogram(counts: dict[str, int]) -> dict[str, int]:
    """Entities per power-of-two band of mention counts: {"0": .., "1": .., "2-3": .., "4-7": ..}."""
    hist: dict[str, int] = {}
    top = max(counts.values(), default=0)
    hist["0"] = sum(1 for c in counts.values() if c == 0)
    for b in range(int(math.log2(top)) + 1 if top else 0):
        lo, hi = 2**b, 2 ** (b + 1) - 1
        hist[str(lo) if lo == hi else f"{lo}-{hi}"] = sum(1 for c in counts.values() if lo <= c <= hi)
    return hist


def format_histogram(counts: dict[str, int], width: int = 40) -> str:
    """The mention histogram as text bars, with the rarest and most mentioned entities."""
    hist = mention_histogram(counts)
    peak = max(hist.values(), default=1) or 1
    lines = ["mentions per entity   entities"]
    for band, n in hist.items():
        lines.append(f"{band:>15}   {n:5d} {'#' * max(1 if n else 0, round(width * n / peak))}")
    ranked = sorted(counts, key=lambda n: (counts[n], n))
    lines.append("rarest: " + ", ".join(f"{n} ({counts[n]})" for n in ranked[:5]))
    lines.append("most mentioned: " + ", ".join(f"{n} ({counts[n]})" for n in ranked[::-1][:5]))
    return "\n".join(lines)
