"""A run's training documents: its prepared data plus what ``memlm learn`` added, minus the forgotten.

Documents are numbered across sources in order: the run's data directory first (the numbering of
``memlm prepare``, that of the RAG index), then each ``learn`` edit's data directory. Every edit is
a line of ``RUN/edits/log.jsonl`` (written last, so an interrupted edit leaves no line and the run
as it was); ``forget`` lines list the documents they removed. What is kept per document is what
prepare already keeps (its units, their paths, its text in the RAG index, its source file and line):
bounded by the corpus, nothing per token.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

EDITS_DIR = "edits"
LOG_NAME = "log.jsonl"


class EditError(ValueError):
    """An edit cannot be done (unknown run, bad ids, a corpus of another tokenizer); one line, nothing changed."""


@dataclasses.dataclass(frozen=True)
class Source:
    """One prepared data directory of a run's documents: ``documents`` of them from number ``first``."""

    data_dir: Path
    first: int
    documents: int
    edit: int  # 0: the run's own data; n: learn edit n


@dataclasses.dataclass(frozen=True)
class EncodeUnit:
    """One prepare work unit of a source: its directory, first document (global) and units."""

    source: Source
    index: int
    first_document: int

    @property
    def encode_dir(self) -> Path:
        return self.source.data_dir / ".units" / "encode" / f"{self.index:05d}"

    @property
    def route_dir(self) -> Path:
        return self.source.data_dir / ".units" / "route" / f"{self.index:05d}"

    def documents(self) -> np.ndarray:
        """Global document number of each of the unit's units (windows or documents)."""
        return np.load(self.encode_dir / "spans.npz")["doc"].astype(np.int64) + self.first_document

    def paths(self) -> np.ndarray:
        return np.load(self.route_dir / "paths.npy")


def read_log(workdir: str | os.PathLike) -> list[dict[str, Any]]:
    """The run's edits, oldest first ([] when it has none)."""
    path = Path(workdir) / EDITS_DIR / LOG_NAME
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def append_log(workdir: str | os.PathLike, entry: dict[str, Any]) -> None:
    """Add an edit's line (the whole file rewritten and renamed: a reader never sees half a line)."""
    path = Path(workdir) / EDITS_DIR / LOG_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    old = path.read_text(encoding="utf-8") if path.is_file() else ""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(old + json.dumps(entry) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def parse_levels(spec: str, depth: int) -> list[int]:
    """``--levels "1,2"`` -> [1, 2], checked against the tree's levels."""
    try:
        out = sorted({int(x) for x in spec.split(",") if x.strip()})
    except ValueError:
        raise EditError(f"--levels {spec!r}: give level numbers, e.g. {depth} or 1,{depth}") from None
    if not out or out[0] < 1 or out[-1] > depth:
        raise EditError(f"--levels {spec!r}: the tree has levels 1..{depth}")
    return out


def _unit_count(data_dir: Path, manifest: dict) -> int:
    n = manifest.get("engine", {}).get("work_units")
    if n is None or not (data_dir / ".units" / "route").is_dir():
        raise EditError(f"{str(data_dir)!r} was prepared before memlm kept its work units: run `memlm prepare` "
                        "on it again")
    return int(n)


class RunDocuments:
    """The documents of run ``workdir`` (see the module docstring)."""

    def __init__(self, workdir: str | os.PathLike):
        from memlm.data.records import read_manifest
        from memlm.run.directory import RunDir
        from memlm.run.paths import location

        self.workdir = Path(os.fspath(location(workdir)))
        if not (self.workdir / "config.json").is_file():
            raise EditError(f"{str(workdir)!r} is not a memlm run directory (no config.json)")
        run = RunDir(self.workdir)
        self.cfg, record = run.load_config()
        if not record.get("data_dir"):
            raise EditError(f"{str(workdir)!r} records no data directory (a converted run): nothing to edit")
        self.data_dir = Path(os.fspath(location(record["data_dir"])))
        self.manifest = read_manifest(self.data_dir)
        self.log = read_log(self.workdir)
        self.sources = [Source(self.data_dir, 0, int(self.manifest["documents"]["training"]), 0)]
        forgotten: list[int] = []
        for entry in self.log:
            if entry["verb"] == "learn":
                d = self.workdir / entry["data"]
                last = self.sources[-1]
                self.sources.append(Source(d, last.first + last.documents, int(entry["documents"]), int(entry["edit"])))
            elif entry["verb"] == "forget":
                forgotten += entry["documents"]
        self.forgotten = np.unique(np.asarray(forgotten, np.int64))
        self._manifests: dict[Path, dict] = {}
        self._indexes: dict[Path, Any] = {}

    @property
    def total(self) -> int:
        """Documents ever trained on (forgotten ones included: numbers are never reused)."""
        return self.sources[-1].first + self.sources[-1].documents

    @property
    def next_edit(self) -> int:
        return len(self.log) + 1

    def manifest_of(self, source: Source) -> dict:
        from memlm.data.records import read_manifest

        if source.data_dir not in self._manifests:
            self._manifests[source.data_dir] = read_manifest(source.data_dir)
        return self._manifests[source.data_dir]

    def source_of(self, document: int) -> Source:
        for s in self.sources:
            if s.first <= document < s.first + s.documents:
                return s
        raise EditError(f"document {document} is out of range (the run has documents 0..{self.total - 1})")

    def units(self, sources: list[Source] | None = None) -> Iterator[EncodeUnit]:
        """Every prepare work unit of the given sources (all by default), in document order."""
        for s in sources or self.sources:
            man = self.manifest_of(s)
            first = s.first
            for i in range(_unit_count(s.data_dir, man)):
                d = s.data_dir / ".units" / "encode" / f"{i:05d}"
                n = len(np.load(d / "doc_offsets.npy", mmap_mode="r")) - 1
                yield EncodeUnit(s, i, first)
                first += n

    def index(self, source: Source):
        """The source's document index (texts, unit embeddings), built on first use as the RAG index is."""
        from memlm.data.tokenizer import load_tokenizer
        from memlm.infer.rag import DocumentIndex, build_index

        if source.data_dir not in self._indexes:
            man = self.manifest_of(source)
            tok = load_tokenizer(source.data_dir / man["tokenizer"]["path"], self.cfg.model.vocab_multiple)
            self._indexes[source.data_dir] = DocumentIndex(build_index(source.data_dir, man, tok))
        return self._indexes[source.data_dir]

    def text(self, document: int) -> str:
        s = self.source_of(document)
        return self.index(s).text(document - s.first)

    def origin(self, document: int) -> str | None:
        """``file:line`` the document was read from (None for data prepared before memlm kept it)."""
        for u in self.units([self.source_of(document)]):
            n = len(np.load(u.encode_dir / "doc_offsets.npy", mmap_mode="r")) - 1
            if u.first_document <= document < u.first_document + n:
                path = u.encode_dir / "origins.json"
                if not path.is_file():
                    return None
                o = json.loads(path.read_text(encoding="utf-8"))
                f, line = o["documents"][document - u.first_document]
                return o["files"][f] + (f":{line}" if line >= 0 else "")
        return None

    def texts(self) -> Iterator[tuple[int, str]]:
        """(document, text) of every document, streamed shard by shard of each source's index."""
        for s in self.sources:
            idx = self.index(s)
            for shard in idx.shards:
                offsets = np.load(idx.path / f"{shard['name']}.offsets.npy")
                data = (idx.path / f"{shard['name']}.text.bin").read_bytes()
                for i in range(len(offsets) - 1):
                    yield s.first + shard["first_document"] + i, data[offsets[i]:offsets[i + 1]].decode("utf-8")

    # ---- choosing documents ------------------------------------------------------------------------
    def parse_ids(self, spec: str) -> np.ndarray:
        """``"3,17,40-45"`` -> document numbers, each checked in range."""
        out: list[int] = []
        for part in filter(None, (p.strip() for p in spec.split(","))):
            a, dash, b = part.partition("-")
            if not a.isdigit() or (dash and not b.isdigit()):
                raise EditError(f"--documents {spec!r}: give numbers and ranges, e.g. 3,17,40-45")
            lo, hi = int(a), int(b) if dash else int(a)
            if hi < lo or hi >= self.total:
                raise EditError(f"--documents {spec!r}: {part} is out of range (the run has documents "
                                f"0..{self.total - 1})")
            out += range(lo, hi + 1)
        if not out:
            raise EditError(f"--documents {spec!r}: no document numbers given")
        return np.unique(np.asarray(out, np.int64))

    def mentioning(self, *names: str) -> np.ndarray:
        """The documents whose text names any of ``names`` (whole words, any case): one pass over the texts."""
        names = tuple(n.strip() for n in names)
        if not names or not all(names):
            raise EditError("--entity: give a name")
        alternatives = "|".join(re.escape(n) for n in sorted(names, key=len, reverse=True))
        pattern = re.compile(r"(?<!\w)(?:" + alternatives + r")(?!\w)", re.IGNORECASE)
        return np.asarray([d for d, text in self.texts() if pattern.search(text)], np.int64)

    def matching(self, texts: list[str]) -> np.ndarray:
        """The documents whose text is one of ``texts`` (compared with whitespace collapsed)."""
        want = {" ".join(t.split()) for t in texts}
        return np.asarray([d for d, text in self.texts() if " ".join(text.split()) in want], np.int64)

    def live(self, documents: np.ndarray) -> np.ndarray:
        """``documents`` without those already forgotten."""
        return np.setdiff1d(np.asarray(documents, np.int64), self.forgotten)
