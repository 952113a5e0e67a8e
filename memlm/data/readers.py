"""Streaming corpus readers: ``.jsonl`` (plain, ``.gz`` or ``.zst``), parquet and ``.txt`` shards.

A corpus source is a single file, a folder (every supported file inside, recursively, in order of
relative path) or a glob pattern (``corpus/*.jsonl.gz``, ``gs://bucket/dclm/shard-*.jsonl.zst``);
:func:`corpus_shards` resolves it to :class:`Shard` objects and :func:`iter_shard` streams one of
them, so a pipeline can split the corpus by shard. Paths go through ``etils.epath``, so URLs work.

Each reader yields :class:`Document` objects one at a time (compressed shards are decompressed as a
stream), so a corpus never has to fit in memory. Bad input never vanishes silently: empty documents
are skipped and counted, lines (or files) whose bytes are not UTF-8 or not JSON are skipped, counted
and reported with file and line, a truncated or corrupt compressed shard keeps the documents read
before the damage and is counted and reported, and a record without a ``text`` field is a
:class:`CorpusError` naming file and line. The counts (in total and per shard) end up in the
prepared data's manifest. Reading is deterministic, so a second pass yields the same documents in
the same order (``prepare`` reads the corpus more than once instead of holding it).
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import gzip
import io
import json
import os
import posixpath
import re
import sys
import zlib
from collections.abc import Callable, Iterator
from typing import Any, BinaryIO

from etils import epath

from memlm.corpora.generated import is_generated
from memlm.run.paths import LocationError, is_local, location

MAX_REPORTED = 100  # problem locations kept in the stats (all are counted)
SHARD_COUNTS = ("documents", "skipped_empty", "undecodable")  # the per-shard counts in ReadStats.shards
SUPPORTED = ".jsonl, .json (lines or an array), .jsonl.gz, .jsonl.zst, .parquet, .pq, .txt, .csv, .tsv, .arrow"
_GLOB_CHARS = "*?["
_COMPRESSIONS = ((".gz", "gz"), (".zst", "zst"), (".zstd", "zst"))


class CorpusError(ValueError):
    """The corpus cannot be read as documents; the message names the file (and line)."""


@dataclasses.dataclass(frozen=True)
class Document:
    """One corpus document: its text, the record's other fields, and where it came from."""

    text: str
    fields: dict[str, Any]
    origin: str  # "file:line" (jsonl), "file:row" (parquet) or "file" (txt)


TEXT_FALLBACKS = ("text", "content", "body")  # tried in order when data.text_field is the default "text"
TXT_SPLITS = ("file", "paragraph", "line")
HF_PREFIX = "hf://datasets/"


@dataclasses.dataclass(frozen=True)
class ReadOptions:
    """How a record's text is found: ``data.text_field`` and, for ``.txt`` files, ``data.txt_split``."""

    text_field: str = "text"
    txt_split: str = "file"  # a .txt file is one document, one per paragraph (blank lines) or per line

    def key(self) -> list[str]:
        """For stage keys: empty at the defaults (data prepared before these options keeps its keys)."""
        return [] if self == ReadOptions() else [self.text_field, self.txt_split]


@dataclasses.dataclass(frozen=True)
class Shard:
    """One file of a corpus: where it is, how to read it and, when known, the corpus root above it."""

    path: str  # a local absolute path or a URL
    kind: str  # 'jsonl' | 'parquet' | 'txt' | 'csv' | 'arrow' | 'hf'
    compression: str | None = None  # None | 'gz' | 'zst' (jsonl only)
    root: str | None = None  # the folder (or the fixed part of a glob) the shard was found under
    options: ReadOptions = ReadOptions()

    @property
    def name(self) -> str:
        """The path relative to the corpus root when known, else the file's basename."""
        if self.root is not None:
            prefix = self.root.rstrip("/") + "/"
            if self.path.startswith(prefix):
                return self.path[len(prefix):]
        return posixpath.basename(self.path.rstrip("/"))


@dataclasses.dataclass
class ReadStats:
    """What a pass over the corpus saw: kept documents and everything skipped, in total and per shard."""

    documents: int = 0
    skipped_empty: int = 0
    undecodable: int = 0
    files: int = 0
    corrupt_shards: int = 0
    problems: list[str] = dataclasses.field(default_factory=list)
    shards: dict[str, dict[str, int]] = dataclasses.field(default_factory=dict)  # name -> SHARD_COUNTS

    def note(self, message: str, report: Callable[[str], None] | None) -> None:
        if len(self.problems) < MAX_REPORTED:
            self.problems.append(message)
            if report is not None:
                report(message)

    def shard_counts(self, name: str) -> dict[str, int]:
        """The per-shard counts of ``name`` (created at zero)."""
        return self.shards.setdefault(name, dict.fromkeys(SHARD_COUNTS, 0))

    def _count(self, counts: dict[str, int], what: str) -> None:
        setattr(self, what, getattr(self, what) + 1)
        counts[what] += 1

    def merge(self, other: ReadStats) -> ReadStats:
        """Add ``other`` into this one (counts summed, problems kept up to MAX_REPORTED, shards merged)."""
        for f in ("documents", "skipped_empty", "undecodable", "files", "corrupt_shards"):
            setattr(self, f, getattr(self, f) + getattr(other, f))
        self.problems.extend(other.problems[:max(0, MAX_REPORTED - len(self.problems))])
        for name, counts in list(other.shards.items()):
            mine = self.shard_counts(name)
            for k, v in counts.items():
                mine[k] = mine.get(k, 0) + v
        return self

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _stderr(message: str) -> None:
    print(f"memlm: skipped {message}", file=sys.stderr)


# -- resolving a source to shards -------------------------------------------------------------------


def _classify(filename: str) -> tuple[str, str | None] | None:
    """(kind, compression) from a file name, or None for an unsupported type."""
    n = filename.lower()
    compression = None
    for ext, comp in _COMPRESSIONS:
        if n.endswith(ext):
            n, compression = n[: -len(ext)], comp
            break
    ext = posixpath.splitext(n)[1]
    if ext in (".jsonl", ".json"):
        return "jsonl", compression
    if compression is None and ext in (".parquet", ".pq"):
        return "parquet", None
    if compression is None and ext == ".txt":
        return "txt", None
    if compression is None and ext in (".csv", ".tsv"):
        return "csv", None
    if compression is None and ext == ".arrow":  # a Hugging Face datasets folder (save_to_disk) holds these
        return "arrow", None
    return None


def _type_of(filename: str) -> str:
    """The file type as an error message names it: '.csv', '.txt.gz'."""
    n = filename.lower()
    ext = posixpath.splitext(n)[1]
    if any(n.endswith(c) for c, _ in _COMPRESSIONS):
        ext = posixpath.splitext(n[: -len(ext)])[1] + ext
    return ext


def _in_folder(filename: str) -> tuple[str, str | None] | None:
    """The type of a file found in a folder: as _classify, but a bare ``.json`` is taken for metadata
    (dataset_info.json, state.json next to the shards), not for a JSON-lines shard."""
    if filename.lower().endswith(".json"):
        return None
    return _classify(filename)


def _order(shard: Shard) -> tuple[str, ...]:
    """Sort key: the relative path's parts (the order pathlib gave the .txt folders before)."""
    return tuple(shard.name.split("/"))


def _walk(top: epath.Path, root: str) -> list[Shard]:
    shards = []
    for folder, _, files in top.walk():
        for f in files:
            kind = _in_folder(f)
            if kind is not None:
                shards.append(Shard(os.fspath(folder / f), *kind, root=root))
    return shards


def _glob(pattern: str) -> list[Shard]:
    cut = min(pattern.index(c) for c in _GLOB_CHARS if c in pattern)
    root = pattern[:cut].rsplit("/", 1)[0] or "/"
    rest = pattern[len(root):].lstrip("/")
    try:
        matches = sorted(os.fspath(p) for p in location(root).glob(rest))
    except NotImplementedError as e:  # epath refuses '**'
        raise CorpusError(f"corpus pattern {pattern!r}: '**' is not supported; give the folder instead "
                          "(folders are read recursively)") from e
    shards = []
    for m in matches:
        kind = _classify(posixpath.basename(m))
        if kind is not None:
            shards.append(Shard(m, *kind, root=root))
        elif location(m).is_dir():
            shards.extend(_walk(location(m), root))
    if not shards:
        found = f"matches {len(matches)} paths, none a supported corpus file" if matches else "matches nothing"
        raise CorpusError(f"corpus pattern {pattern!r} {found} (supported: {SUPPORTED})")
    return shards


def corpus_shards(source: str | os.PathLike, options: ReadOptions = ReadOptions()) -> list[Shard]:
    """:func:`_shards` of a source, each read with ``options``; ``hf://datasets/NAME[/CONFIG][:SPLIT]``
    is one shard streamed through Hugging Face ``datasets``."""
    if os.fspath(source).startswith(HF_PREFIX):
        return [Shard(os.fspath(source), "hf", options=options)]
    return [dataclasses.replace(s, options=options) for s in _shards(source)]


def _shards(source: str | os.PathLike) -> list[Shard]:
    """Resolve a corpus source (a file, a folder read recursively, or a glob pattern; local or URL) to
    its shards in a deterministic order (by path relative to the folder or the pattern's fixed part).

    Raises CorpusError when the path does not exist, a folder or pattern holds no supported file, or
    a single file has an unknown type. In a folder, unsupported files and bare ``.json`` files
    (metadata) are passed over; name ``.json`` shards as a file or a pattern.
    """
    try:
        path = location(source)
    except LocationError as e:
        raise CorpusError(f"corpus {os.fspath(source)!r}: {e}") from e
    text = os.fspath(path)
    if path.is_dir():
        shards = _walk(path, text)
        if not shards:
            raise CorpusError(f"corpus folder {text!r} holds no .txt files nor any other corpus file "
                              f"(supported: {SUPPORTED}; bare .json files in a folder are taken for metadata)")
    elif path.exists():
        kind = _classify(posixpath.basename(text))
        if kind is None:
            raise CorpusError(f"corpus {text!r}: unknown file type {_type_of(posixpath.basename(text))!r} "
                              f"(supported: {SUPPORTED})")
        return [Shard(text, *kind)]
    elif any(c in text for c in _GLOB_CHARS):
        shards = _glob(text)
    else:
        raise CorpusError(f"corpus {text!r} does not exist (give a corpus file ({SUPPORTED}), a folder of "
                          "them, a glob pattern, 'facts' or 'bios')")
    return sorted(shards, key=_order)


# -- reading one shard ------------------------------------------------------------------------------


class _CorruptStream(Exception):
    """A compressed stream that cannot be decompressed further (after ``lines`` complete lines)."""

    def __init__(self, lines: int, reason: str):
        super().__init__(reason)
        self.lines = lines


class _ZstdStream(io.RawIOBase):
    """Decompresses a .zst file as a stream, frame after frame, and raises at a truncated frame
    (zstandard's own stream reader ends quietly there)."""

    def __init__(self, f: BinaryIO, chunk: int = 1 << 18):
        import zstandard

        self._f, self._chunk, self._error = f, chunk, zstandard.ZstdError
        self._dctx = zstandard.ZstdDecompressor()
        self._obj = None  # the decompressor of the frame in progress
        self._buf, self._pos, self._done = b"", 0, False

    def readable(self) -> bool:
        return True

    def _fill(self) -> None:
        data = self._f.read(self._chunk)
        if not data:
            if self._obj is not None:
                raise _CorruptStream(0, "the stream ends inside a zstd frame")
            self._done = True
            return
        out = []
        try:
            while data:
                if self._obj is None:
                    self._obj = self._dctx.decompressobj()
                out.append(self._obj.decompress(data))
                if self._obj.eof:
                    data, self._obj = self._obj.unused_data, None
                else:
                    data = b""
        except self._error as e:
            raise _CorruptStream(0, str(e)) from e
        self._buf, self._pos = b"".join(out), 0

    def readinto(self, b) -> int:
        while self._pos >= len(self._buf) and not self._done:
            self._fill()
        n = min(len(b), len(self._buf) - self._pos)
        b[:n] = memoryview(self._buf)[self._pos:self._pos + n]
        self._pos += n
        return n


_GZIP_ERRORS = (EOFError, zlib.error, gzip.BadGzipFile)


def _numbered_lines(f: BinaryIO) -> Iterator[tuple[int, bytes]]:
    """(line number, bytes) of each line; a damaged compressed stream raises _CorruptStream with the
    count of complete lines before it (a last line without newline counts only if the stream ends
    cleanly after it: before damage it is a fragment)."""
    lineno = 0
    try:
        for raw in f:
            if not raw.endswith(b"\n"):
                f.read(1)  # b"" at a clean end; raises at damage
            lineno += 1
            yield lineno, raw
    except _GZIP_ERRORS as e:
        raise _CorruptStream(lineno, str(e) or type(e).__name__) from e
    except _CorruptStream as e:
        raise _CorruptStream(lineno, str(e)) from e


@contextlib.contextmanager
def _open_lines(shard: Shard) -> Iterator[BinaryIO]:
    """The shard's bytes, decompressed as a stream."""
    with contextlib.ExitStack() as stack:
        f = stack.enter_context(location(shard.path).open("rb"))
        if shard.compression == "gz":
            f = stack.enter_context(gzip.GzipFile(fileobj=f, mode="rb"))
        elif shard.compression == "zst":
            try:
                raw = _ZstdStream(f)
            except ImportError as e:
                raise CorpusError(f"reading {shard.path!r} needs the 'zstandard' package "
                                  "(pip install zstandard)") from e
            f = stack.enter_context(io.BufferedReader(raw, buffer_size=1 << 20))
        yield f


def _text(record: Any, options: ReadOptions, where: str) -> tuple[Any, dict[str, Any]]:
    """(the record's text value, its other fields); ``data.text_field``, or the first of
    :data:`TEXT_FALLBACKS` a record has when the field is the default ``text``."""
    if not isinstance(record, dict):
        raise CorpusError(f"{where}: expected an object with a text field, got {type(record).__name__}")
    names = TEXT_FALLBACKS if options.text_field == "text" else (options.text_field,)
    for name in names:
        if name in record:
            fields = dict(record)
            return fields.pop(name), fields
    tried = " or ".join(repr(n) for n in names)
    hint = "" if options.text_field != "text" else " (set --config.data.text_field=NAME)"
    raise CorpusError(f"{where}: record has no {tried} field{hint}; its fields: {sorted(record)[:12]}")


def _document(value: Any, fields: dict[str, Any], where: str, stats: ReadStats,
              counts: dict[str, int]) -> Document | None:
    """A Document of a text value, or None (counted) when it is empty; a non-string fails naming ``where``."""
    if value is None or (isinstance(value, str) and not value.strip()):
        stats._count(counts, "skipped_empty")
        return None
    if not isinstance(value, str):
        raise CorpusError(f"{where}: the text is {type(value).__name__}, expected a string")
    stats._count(counts, "documents")
    return Document(value, fields, where)


def _read_json_array(shard: Shard, f: BinaryIO, stats: ReadStats, counts: dict[str, int]) -> Iterator[Document]:
    """A ``.json`` file holding one array of records (read whole: arrays cannot be streamed by line)."""
    try:
        records = json.loads(f.read().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CorpusError(f"{shard.path}: not a JSON array of records ({e})") from None
    if not isinstance(records, list):
        raise CorpusError(f"{shard.path}: expected a JSON array of records")
    for i, record in enumerate(records):
        doc = _document(*_text(record, shard.options, f"{shard.path}[{i}]"), f"{shard.path}[{i}]", stats, counts)
        if doc is not None:
            yield doc


def _read_jsonl(shard: Shard, stats: ReadStats, counts: dict[str, int], report) -> Iterator[Document]:
    path = shard.path
    with _open_lines(shard) as f:
        plain_json = shard.compression is None and shard.path.lower().endswith(".json")
        if plain_json and not hasattr(f, "peek"):
            f = io.BufferedReader(f)
        if plain_json and f.peek(64)[:64].lstrip().startswith(b"["):
            yield from _read_json_array(shard, f, stats, counts)
            return
        try:
            for lineno, raw in _numbered_lines(f):
                if not raw.strip():
                    continue  # blank lines separate nothing; they are not documents
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    stats._count(counts, "undecodable")
                    stats.note(f"{path}:{lineno}: not UTF-8 ({e.reason} at byte {e.start})", report)
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    stats._count(counts, "undecodable")
                    stats.note(f"{path}:{lineno}: not JSON ({e.msg})", report)
                    continue
                doc = _document(*_text(record, shard.options, f"{path}:{lineno}"), f"{path}:{lineno}", stats, counts)
                if doc is not None:
                    yield doc
        except _CorruptStream as e:
            stats.corrupt_shards += 1
            stats.note(f"shard {path}: truncated/corrupt compressed stream after line {e.lines} ({e})", report)


def _read_txt(shard: Shard, stats: ReadStats, counts: dict[str, int], report) -> Iterator[Document]:
    path = shard.path
    data = location(path).read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        stats._count(counts, "undecodable")
        stats.note(f"{path}:{line}: not UTF-8 ({e.reason} at byte {e.start}); file skipped", report)
        return
    if shard.options.txt_split == "file":
        pieces = [(text, path)]
    elif shard.options.txt_split == "paragraph":
        pieces, line = [], 1
        for para in re.split(r"(\n[ \t]*\n)", text):
            if para.strip() and not re.fullmatch(r"\n[ \t]*\n", para):
                pieces.append((para.strip("\n"), f"{path}:{line}"))
            line += para.count("\n")
    else:
        pieces = [(ln, f"{path}:{i}") for i, ln in enumerate(text.split("\n"), 1)]
    for piece, where in pieces:
        doc = _document(piece, {"file": path}, where, stats, counts)
        if doc is not None:
            yield doc


def _read_parquet(shard: Shard, stats: ReadStats, counts: dict[str, int], report,
                  batch_rows: int = 4096) -> Iterator[Document]:
    path = shard.path
    try:
        import pyarrow.parquet as pq
    except ImportError as e:
        raise CorpusError(f"reading parquet corpus {path!r} needs the 'pyarrow' package "
                          "(pip install pyarrow)") from e
    with contextlib.ExitStack() as stack:
        src = path if is_local(location(path)) else stack.enter_context(location(path).open("rb"))
        pf = stack.enter_context(pq.ParquetFile(src))
        yield from _rows(shard, (b.to_pylist() for b in pf.iter_batches(batch_size=batch_rows)), stats, counts)


def _rows(shard: Shard, batches: Iterator[list[dict]], stats: ReadStats, counts: dict[str, int]) -> Iterator[Document]:
    """Documents of table rows (parquet, CSV, Arrow, a Hugging Face dataset), ``path:row`` as origin."""
    row = 0
    for batch in batches:
        for record in batch:
            row += 1
            where = f"{shard.path}:{row}"
            doc = _document(*_text(record, shard.options, where), where, stats, counts)
            if doc is not None:
                yield doc


def _read_csv(shard: Shard, stats: ReadStats, counts: dict[str, int], report) -> Iterator[Document]:
    """CSV (``.csv``) or tab-separated (``.tsv``) with a header row; the text is a named column."""
    delimiter = "\t" if shard.path.lower().endswith(".tsv") else ","
    csv.field_size_limit(1 << 30)
    with location(shard.path).open("rb") as raw, io.TextIOWrapper(raw, encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f, delimiter=delimiter)
        try:
            yield from _rows(shard, iter([[row] for row in reader]), stats, counts)
        except UnicodeDecodeError as e:
            raise CorpusError(f"{shard.path}: not UTF-8 ({e.reason})") from None
        except csv.Error as e:
            raise CorpusError(f"{shard.path}:{reader.line_num}: not CSV ({e})") from None


def _read_arrow(shard: Shard, stats: ReadStats, counts: dict[str, int], report) -> Iterator[Document]:
    """An Arrow file of a Hugging Face ``datasets`` folder (``save_to_disk``: the Arrow stream format)."""
    import pyarrow as pa

    with location(shard.path).open("rb") as f:
        try:
            reader = pa.ipc.open_stream(f)
        except pa.ArrowInvalid:
            f.seek(0)
            reader = pa.ipc.open_file(f)
            batches = (reader.get_batch(i).to_pylist() for i in range(reader.num_record_batches))
        else:
            batches = (b.to_pylist() for b in reader)
        yield from _rows(shard, batches, stats, counts)


def _read_hf(shard: Shard, stats: ReadStats, counts: dict[str, int], report) -> Iterator[Document]:
    """``hf://datasets/OWNER/NAME[/CONFIG][:SPLIT]`` streamed by Hugging Face ``datasets`` (default split
    train); NAME may be a local folder of data files, as ``datasets.load_dataset`` takes it."""
    try:
        import datasets
    except ImportError:
        raise CorpusError(f"{shard.path}: reading a Hugging Face dataset needs the 'datasets' package "
                          "(pip install datasets)") from None
    spec, _, split = shard.path[len(HF_PREFIX):].partition(":")
    parts = spec.split("/")
    if os.path.isdir(spec) or len(parts) <= 2:  # a local dataset folder, NAME or OWNER/NAME
        name, config = spec, None
    else:  # OWNER/NAME/CONFIG
        name, config = "/".join(parts[:2]), "/".join(parts[2:])
    try:
        ds = datasets.load_dataset(name, config, split=split or "train", streaming=True)
        yield from _rows(shard, ([r] for r in ds), stats, counts)
    except (FileNotFoundError, ValueError, ConnectionError) as e:
        raise CorpusError(f"{shard.path}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None


_READERS = {"jsonl": _read_jsonl, "txt": _read_txt, "parquet": _read_parquet, "csv": _read_csv,
            "arrow": _read_arrow, "hf": _read_hf}


def iter_shard(shard: Shard, stats: ReadStats, report: Callable[[str], None] | None = _stderr) -> Iterator[Document]:
    """Stream the documents of one shard, counting them (in total and under ``shard.name``) in ``stats``.

    ``report`` receives one message per skipped line or file and per damaged compressed stream (the
    first MAX_REPORTED problems of ``stats``); a damaged stream keeps the documents before the damage.
    """
    if shard.kind not in _READERS:
        raise CorpusError(f"shard {shard.path!r}: unknown kind {shard.kind!r} (expected one of {sorted(_READERS)})")
    if shard.compression is not None and (shard.kind != "jsonl" or shard.compression not in ("gz", "zst")):
        raise CorpusError(f"shard {shard.path!r}: compression {shard.compression!r} is not supported for "
                          f"{shard.kind} (only 'gz' or 'zst' jsonl)")
    stats.files += 1
    yield from _READERS[shard.kind](shard, stats, stats.shard_counts(shard.name), report)


def _read_generated(name: str, n_documents: int, seed: int, stats: ReadStats) -> Iterator[Document]:
    from memlm.corpora.generated import module

    for i, record in enumerate(module(name).generate(n_documents, seed), start=1):
        stats.documents += 1
        yield Document(record.pop("text"), record, f"{name}:{i}")


def iter_documents(source: str | os.PathLike, stats: ReadStats | None = None,
                   report: Callable[[str], None] | None = _stderr, *, facts_documents: int = 20_000,
                   facts_seed: int = 0, options: ReadOptions = ReadOptions()) -> Iterator[Document]:
    """Stream the documents of a corpus (a file, a folder or a glob pattern; see corpus_shards) shard
    by shard, or of a generated corpus (``"facts"`` or ``"bios"``, of ``facts_documents`` documents for
    ``facts_seed``), filling ``stats`` as it goes.

    ``report`` receives one message per skipped line or file (the first MAX_REPORTED of them);
    pass None on later passes to stay quiet. Raises CorpusError when nothing usable is found.
    """
    stats = stats if stats is not None else ReadStats()
    if is_generated(source):
        yield from _read_generated(str(source), facts_documents, facts_seed, stats)
        return
    for shard in corpus_shards(source, options):
        yield from iter_shard(shard, stats, report)
    if stats.documents == 0:
        raise CorpusError(f"corpus {os.fspath(source)!r} has no documents ({stats.skipped_empty} empty skipped, "
                          f"{stats.undecodable} undecodable skipped, {stats.corrupt_shards} corrupt shards)")


def corpus_fingerprint(source: str | os.PathLike) -> list[list[Any]]:
    """A cheap identity of a corpus, for stage caching: per shard (path, size, mtime) — local files
    as os.stat gives them, URLs as epath's stat does (size only where it gives no mtime)."""
    out: list[list[Any]] = []
    if os.fspath(source).startswith(HF_PREFIX):  # a hub dataset: named, not stat-able
        return [[os.fspath(source)]]
    for shard in corpus_shards(source):
        path = location(shard.path)
        if is_local(path):
            st = os.stat(shard.path)
            out.append([os.path.realpath(shard.path), st.st_size, st.st_mtime_ns])
        else:
            st = path.stat()
            out.append([shard.path, st.length, st.mtime] if st.mtime else [shard.path, st.length])
    return out
