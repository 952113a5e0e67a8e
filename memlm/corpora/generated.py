"""The corpora memlm generates itself, by name: ``facts`` (real fact tables) and ``bios`` (invented
people asked about in words their documents never use).

Each is a module with ``GENERATOR_VERSION``, ``source_versions()``, ``generate(n_documents, seed)``
(documents ``{"text", "entity", "kind"}``), ``entities(seed)`` (objects with a ``name``) and
``probe_items(entities, mention_counts)``. ``prepare`` writes the corpus as JSONL, then the
probes with frequency buckets counted in the training documents.
"""

from __future__ import annotations

import importlib
import json
import os
from types import ModuleType

NAMES = ("facts", "bios")


def is_generated(corpus: str | os.PathLike) -> bool:
    """Whether ``corpus`` names a generated corpus rather than a file or folder."""
    return str(corpus) in NAMES


def module(name: str) -> ModuleType:
    """The generator module of corpus ``name`` (imported on demand: facts needs its data packages)."""
    if name not in NAMES:
        raise ValueError(f"{name!r} is not a generated corpus ({', '.join(NAMES)})")
    return importlib.import_module(f"memlm.corpora.{name}")


def write_corpus(name: str, path: str | os.PathLike, n_documents: int, seed: int) -> int:
    """Write corpus ``name`` as JSONL (one ``{"text", "entity", "kind"}`` a line); returns the count."""
    tmp = f"{path}.tmp"
    n = 0
    with open(tmp, "w", encoding="utf-8") as f:
        for doc in module(name).generate(n_documents, seed):
            f.write(json.dumps(doc, ensure_ascii=False) + "\n")
            n += 1
    os.replace(tmp, path)
    return n
