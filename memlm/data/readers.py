"""Streaming corpus readers: a ``.jsonl`` file, a parquet file, or a folder of ``.txt`` files.

Each reader yields :class:`Document` objects one at a time, so a corpus never has to fit in memory.
Bad input never vanishes silently: empty documents are skipped and counted, lines (or files) whose
bytes are not UTF-8 or not JSON are skipped, counted and reported with file and line, and a record
without a ``text`` field is a :class:`CorpusError` naming file and line. The counts end up in the
prepared data's manifest. Reading is deterministic, so a second pass yields the same documents in
the same order (``prepare`` reads the corpus more than once instead of holding it).
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from memlm.data.generated import is_generated

MAX_REPORTED = 100  # problem locations kept in the stats (all are counted)


class CorpusError(ValueError):
    """The corpus cannot be read as documents; the message names the file (and line)."""


@dataclasses.dataclass(frozen=True)
class Document:
    """One corpus document: its text, the record's other fields, and where it came from."""

    text: str
    fields: dict[str, Any]
    origin: str  # "file:line" (jsonl), "file:row" (parquet) or "file" (txt)


@dataclasses.dataclass
class ReadStats:
    """What a pass over the corpus saw: kept documents and everything skipped."""

    documents: int = 0
    skipped_empty: int = 0
    undecodable: int = 0
    files: int = 0
    problems: list[str] = dataclasses.field(default_factory=list)

    def note(self, message: str, report: Callable[[str], None] | None) -> None:
        if len(self.problems) < MAX_REPORTED:
            self.problems.append(message)
            if report is not None:
                report(message)

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _stderr(message: str) -> None:
    print(f"memlm: skipped {message}", file=sys.stderr)


def corpus_files(source: str | os.PathLike) -> tuple[str, list[Path]]:
    """Resolve a corpus path to (kind, files); kind is 'jsonl', 'parquet' or 'txt'."""
    path = Path(source)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*.txt") if p.is_file())
        if not files:
            raise CorpusError(f"corpus folder {str(path)!r} holds no .txt files")
        return "txt", files
    if not path.exists():
        raise CorpusError(f"corpus {str(path)!r} does not exist (give a .jsonl file, a parquet file, "
                          "a folder of .txt files, 'facts' or 'bios')")
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json"):
        return "jsonl", [path]
    if suffix in (".parquet", ".pq"):
        return "parquet", [path]
    raise CorpusError(f"corpus {str(path)!r}: unknown file type {suffix!r} (expected .jsonl or .parquet)")


def _read_jsonl(path: Path, stats: ReadStats, report) -> Iterator[Document]:
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            if not raw.strip():
                continue  # blank lines separate nothing; they are not documents
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                stats.undecodable += 1
                stats.note(f"{path}:{lineno}: not UTF-8 ({e.reason} at byte {e.start})", report)
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                stats.undecodable += 1
                stats.note(f"{path}:{lineno}: not JSON ({e.msg})", report)
                continue
            if not isinstance(record, dict) or "text" not in record:
                raise CorpusError(f"{path}:{lineno}: record has no 'text' field")
            text = record.pop("text")
            if not isinstance(text, str):
                raise CorpusError(f"{path}:{lineno}: 'text' is {type(text).__name__}, expected a string")
            if not text.strip():
                stats.skipped_empty += 1
                continue
            stats.documents += 1
            yield Document(text, record, f"{path}:{lineno}")


def _read_txt(path: Path, stats: ReadStats, report) -> Iterator[Document]:
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        stats.undecodable += 1
        stats.note(f"{path}:{line}: not UTF-8 ({e.reason} at byte {e.start}); file skipped", report)
        return
    if not text.strip():
        stats.skipped_empty += 1
        return
    stats.documents += 1
    yield Document(text, {"file": str(path)}, str(path))


def _read_parquet(path: Path, stats: ReadStats, report, batch_rows: int = 4096) -> Iterator[Document]:
    try:
        import pyarrow.parquet as pq
    except ImportError as e:
        raise CorpusError(f"reading parquet corpus {str(path)!r} needs the 'pyarrow' package "
                          "(pip install pyarrow)") from e
    pf = pq.ParquetFile(path)
    if "text" not in pf.schema_arrow.names:
        raise CorpusError(f"{path}: parquet file has no 'text' column (columns: {pf.schema_arrow.names})")
    row = 0
    for batch in pf.iter_batches(batch_size=batch_rows):
        for record in batch.to_pylist():
            row += 1
            text = record.pop("text")
            if text is None or (isinstance(text, str) and not text.strip()):
                stats.skipped_empty += 1
                continue
            if not isinstance(text, str):
                raise CorpusError(f"{path}: row {row}: 'text' is {type(text).__name__}, expected a string")
            stats.documents += 1
            yield Document(text, record, f"{path}:{row}")


_READERS = {"jsonl": _read_jsonl, "txt": _read_txt, "parquet": _read_parquet}


def _read_generated(name: str, n_documents: int, seed: int, stats: ReadStats) -> Iterator[Document]:
    from memlm.data.generated import module

    for i, record in enumerate(module(name).generate(n_documents, seed), start=1):
        stats.documents += 1
        yield Document(record.pop("text"), record, f"{name}:{i}")


def iter_documents(source: str | os.PathLike, stats: ReadStats | None = None,
                   report: Callable[[str], None] | None = _stderr, *, facts_documents: int = 20_000,
                   facts_seed: int = 0) -> Iterator[Document]:
    """Stream the documents of a corpus file or folder (or of a generated corpus, ``"facts"`` or
    ``"bios"``, of ``facts_documents`` documents for ``facts_seed``), filling ``stats`` as it goes.

    ``report`` receives one message per skipped line or file (the first MAX_REPORTED of them);
    pass None on later passes to stay quiet. Raises CorpusError when nothing usable is found.
    """
    stats = stats if stats is not None else ReadStats()
    if is_generated(source):
        yield from _read_generated(str(source), facts_documents, facts_seed, stats)
        return
    kind, files = corpus_files(source)
    reader = _READERS[kind]
    for path in files:
        stats.files += 1
        yield from reader(path, stats, report)
    if stats.documents == 0:
        raise CorpusError(f"corpus {str(source)!r} has no documents ({stats.skipped_empty} empty skipped, "
                          f"{stats.undecodable} undecodable skipped)")


def corpus_fingerprint(source: str | os.PathLike) -> list[list[Any]]:
    """A cheap identity of a corpus on disk: (path, size, mtime) of each file, for stage caching."""
    _, files = corpus_files(source)
    out = []
    for p in files:
        st = p.stat()
        out.append([str(p.resolve()), st.st_size, st.st_mtime_ns])
    return out
