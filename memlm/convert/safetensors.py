"""Reading and writing Hugging Face safetensors checkpoints: memory-mapped, any dtype, sharded.

A safetensors file is an 8-byte little-endian header length N, N bytes of JSON
(``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}``, offsets
relative to the end of the header) and the raw little-endian tensor bytes. A checkpoint folder
holds one ``model.safetensors`` or shards listed by ``model.safetensors.index.json``
(``{"metadata": {"total_size": ...}, "weight_map": {name: file}}``).

Reading maps each file once (``numpy.memmap``) and returns zero-copy views, so converting a
checkpoint never holds more than the tensors being transformed; bfloat16 and float8 come from
``ml_dtypes``. Writing streams tensors one at a time into shards of at most ``max_shard_bytes``.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import ml_dtypes
import numpy as np

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
DEFAULT_MAX_SHARD_BYTES = 5 * 10**9  # Hugging Face's default shard size ("5GB")

DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"),
    "BF16": np.dtype(ml_dtypes.bfloat16), "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2), "I64": np.dtype("<i8"), "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"), "I8": np.dtype("i1"), "U8": np.dtype("u1"), "U16": np.dtype("<u2"),
    "U32": np.dtype("<u4"), "U64": np.dtype("<u8"), "BOOL": np.dtype("?"),
}
_CODES = {v: k for k, v in DTYPES.items()}


class SafetensorsError(ValueError):
    """A checkpoint file or folder is missing, malformed or inconsistent; the message names it."""


def dtype_code(dtype: np.dtype | str) -> str:
    """The safetensors dtype code (``"BF16"``...) of a numpy dtype (or of a code / numpy name)."""
    if isinstance(dtype, str) and dtype in DTYPES:
        return dtype
    dt = np.dtype(dtype)
    if dt not in _CODES:
        raise SafetensorsError(f"dtype {dt} has no safetensors code")
    return _CODES[dt]


def read_header(path: str | os.PathLike) -> tuple[dict, int]:
    """(header JSON, byte offset of the data) of one safetensors file."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise SafetensorsError(f"{path}: too short to be a safetensors file")
        n = int.from_bytes(raw, "little")
        if n <= 0 or 8 + n > size:
            raise SafetensorsError(f"{path}: header length {n} does not fit a file of {size} bytes")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise SafetensorsError(f"{path}: the header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise SafetensorsError(f"{path}: the header is not a JSON object")
    data_bytes = size - 8 - n
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info.get("dtype") not in DTYPES:
            raise SafetensorsError(f"{path}: tensor {name!r} has unsupported dtype {info.get('dtype')!r}")
        begin, end = info["data_offsets"]
        want = int(np.prod(info["shape"], dtype=np.int64)) * DTYPES[info["dtype"]].itemsize
        if not 0 <= begin <= end <= data_bytes or end - begin != want:
            raise SafetensorsError(f"{path}: tensor {name!r} has offsets {[begin, end]} inconsistent with its "
                                   f"shape {info['shape']} / {info['dtype']} or the file size")
    return header, 8 + n


class Checkpoint:
    """The tensors of a checkpoint folder (or one file), memory-mapped: ``get(name)`` is a read-only view."""

    def __init__(self, location: str | os.PathLike):
        loc = Path(location)
        if loc.is_file():
            files = {None: loc}
            folder = loc.parent
        elif (loc / INDEX).is_file():
            folder = loc
            try:
                index = json.loads((loc / INDEX).read_text())
                weight_map = index["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise SafetensorsError(f"{loc / INDEX}: not a safetensors index ({e})") from None
            files = {f: loc / f for f in sorted(set(weight_map.values()))}
        elif (loc / SINGLE).is_file():
            folder, files = loc, {None: loc / SINGLE}
        else:
            found = sorted(p.name for p in loc.glob("*.safetensors")) if loc.is_dir() else []
            if len(found) == 1:
                folder, files = loc, {None: loc / found[0]}
            else:
                raise SafetensorsError(f"{location}: no {SINGLE} or {INDEX} here"
                                       + (f" (found {found})" if found else ""))
        self.folder = folder
        self._where: dict[str, tuple[Path, dict, int]] = {}
        self._maps: dict[Path, np.memmap] = {}
        for path in files.values():
            if not path.is_file():
                raise SafetensorsError(f"{path}: shard named in {INDEX} is missing")
            header, start = read_header(path)
            for name, info in header.items():
                if name == "__metadata__":
                    continue
                if name in self._where:
                    raise SafetensorsError(f"tensor {name!r} appears in both {self._where[name][0].name} and "
                                           f"{path.name}")
                self._where[name] = (path, info, start)

    def names(self) -> list[str]:
        return sorted(self._where)

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._info(name)["shape"])

    def dtype(self, name: str) -> np.dtype:
        return DTYPES[self._info(name)["dtype"]]

    def _info(self, name: str) -> dict:
        if name not in self._where:
            raise SafetensorsError(f"{self.folder}: the checkpoint has no tensor {name!r}")
        return self._where[name][1]

    def get(self, name: str) -> np.ndarray:
        """The tensor as a read-only memory-mapped array (no copy)."""
        self._info(name)
        path, info, start = self._where[name]
        if path not in self._maps:
            self._maps[path] = np.memmap(path, dtype=np.uint8, mode="r")
        begin, end = info["data_offsets"]
        raw = self._maps[path][start + begin:start + end]
        return raw.view(DTYPES[info["dtype"]]).reshape(info["shape"])


def _shard_names(n: int) -> list[str]:
    return [SINGLE] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]


def plan_shards(specs: Sequence[tuple[str, tuple[int, ...], np.dtype]], max_shard_bytes: int) -> list[list[int]]:
    """Tensor indices per shard, in order: a new shard starts when the next tensor would pass the limit
    (a tensor larger than the limit gets a shard of its own)."""
    shards: list[list[int]] = [[]]
    size = 0
    for i, (_, shape, dtype) in enumerate(specs):
        n = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        if shards[-1] and size + n > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(i)
        size += n
    return shards


def write_checkpoint(folder: str | os.PathLike, specs: Sequence[tuple[str, tuple[int, ...], np.dtype]],
                     tensor: Callable[[str], np.ndarray], max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
                     metadata: dict[str, str] | None = None) -> list[str]:
    """Write tensors ``specs = [(name, shape, dtype)]`` (values from ``tensor(name)``, fetched one at a
    time) as ``model.safetensors`` or, above ``max_shard_bytes``, shards plus the index. Returns the files."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    names = [s[0] for s in specs]
    if len(set(names)) != len(names):
        raise SafetensorsError("duplicate tensor names in a checkpoint to write")
    groups = plan_shards(specs, max_shard_bytes)
    files = _shard_names(len(groups))
    weight_map, total = {}, 0
    for file, group in zip(files, groups, strict=True):
        header: dict = {"__metadata__": dict(metadata or {"format": "pt"})}
        offset = 0
        for i in group:
            name, shape, dtype = specs[i]
            n = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
            header[name] = {"dtype": dtype_code(dtype), "shape": [int(s) for s in shape],
                            "data_offsets": [offset, offset + n]}
            offset += n
            weight_map[name] = file
        total += offset
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned
        tmp = folder / f"{file}.tmp"
        with open(tmp, "wb") as f:
            f.write(len(raw).to_bytes(8, "little"))
            f.write(raw)
            for i in group:
                name, shape, dtype = specs[i]
                value = np.asarray(tensor(name))
                if value.shape != tuple(shape) or value.dtype != np.dtype(dtype):
                    raise SafetensorsError(f"tensor {name!r} is {value.shape} {value.dtype}, planned as "
                                           f"{tuple(shape)} {np.dtype(dtype)}")
                f.write(np.ascontiguousarray(value).astype(value.dtype.newbyteorder("<"), copy=False).tobytes())
        os.replace(tmp, folder / file)
    if len(files) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (folder / INDEX).write_text(json.dumps(index, indent=2) + "\n")
    return files


def parse_size(text: str | int) -> int:
    """Bytes of a size like ``5GB``, ``500MB``, ``2GiB`` or a plain integer."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B?)?\s*", str(text), re.IGNORECASE)
    if not m:
        raise SafetensorsError(f"cannot read size {text!r} (examples: 5GB, 500MB, 2GiB, 1000000)")
    unit = (m.group(2) or "").upper().rstrip("B")
    scale = {"": 1, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12,
             "KI": 2**10, "MI": 2**20, "GI": 2**30, "TI": 2**40}[unit]
    return int(float(m.group(1)) * scale)


def iter_weight_files(folder: str | os.PathLike) -> Iterator[Path]:
    """The weight files of a checkpoint folder (safetensors, the index, and torch / flax weights)."""
    for p in Path(folder).iterdir():
        if p.is_file() and (p.suffix in (".safetensors", ".bin", ".pt", ".pth", ".msgpack", ".h5", ".gguf")
                            or p.name in (INDEX, "pytorch_model.bin.index.json")):
            yield p
