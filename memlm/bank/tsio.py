"""tensorstore plumbing for the bank store: locations, zarr3 array specs, small JSON keys.

A location is a local path (the ``file`` kvstore), a URL tensorstore understands
(``gs://bucket/bank/``, ``s3://...``, ``file:///...``) or any kvstore spec dict
(``{"driver": "ocdbt", "base": "gs://bucket/bank/"}``...). Block arrays are zarr3 with the
sharding codec: the outer chunk (one key) holds ``shard_nodes`` nodes and every inner chunk is
exactly one node's block, so reading one block is one contiguous read (STACK.md §2). Writing
part of a shard rewrites the whole shard (one key): the shard size trades file count against
the write amplification of incremental saves. With one node per shard, every block is its own
key (the layout for OCDBT, which packs small keys itself, or object stores).
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np
import tensorstore as ts

SCALAR_CHUNK = 1 << 16  # nodes per chunk of the per-node scalar arrays (counters, flags)


def kvstore_spec(location: str | os.PathLike | dict) -> dict:
    """A kvstore spec dict for a location whose path ends in '/' (a directory of keys)."""
    if isinstance(location, dict):
        spec = ts.KvStore.Spec(location).to_json()
    else:
        text = os.fspath(location)
        if "://" in text:
            spec = ts.KvStore.Spec(text).to_json()
        else:
            spec = {"driver": "file", "path": os.path.abspath(text)}
    path = spec.get("path", "")
    if path and not path.endswith("/"):
        spec["path"] = path + "/"
    return spec


def join(spec: dict, sub: str) -> dict:
    """The kvstore spec of a sub-directory (``sub`` ends in '/')."""
    return (ts.KvStore.Spec(spec) / sub).to_json()


def describe(spec: dict) -> str:
    """A short human name for a location, for error messages."""
    try:
        return ts.KvStore.Spec(spec).url
    except Exception:  # noqa: BLE001 - not every driver has a URL form
        return json.dumps(spec, sort_keys=True)


def array_spec(kv: dict, shape: tuple[int, ...], dtype: str, shard_nodes: int) -> dict:
    """zarr3 spec of a ``[nodes, *block]`` array: outer chunks of ``shard_nodes`` nodes, one inner
    chunk per node (block arrays; ``shard_nodes = 1``: one plain chunk, one key, per node), or
    plain chunks of ``SCALAR_CHUNK`` (1-d per-node scalars)."""
    n = max(int(shape[0]), 1)
    if len(shape) == 1:
        metadata = {"chunk_grid": {"name": "regular", "configuration": {"chunk_shape": [min(n, SCALAR_CHUNK)]}}}
    elif shard_nodes <= 1:
        metadata = {"chunk_grid": {"name": "regular", "configuration": {"chunk_shape": [1, *shape[1:]]}}}
    else:
        block = list(shape[1:])
        inner = {"name": "sharding_indexed", "configuration": {
            "chunk_shape": [1, *block],
            "codecs": [{"name": "bytes", "configuration": {"endian": "little"}}],
            "index_codecs": [{"name": "bytes", "configuration": {"endian": "little"}}, {"name": "crc32c"}],
            "index_location": "end"}}
        metadata = {"chunk_grid": {"name": "regular", "configuration": {"chunk_shape": [min(n, shard_nodes), *block]}},
                    "codecs": [inner]}
    metadata.update(shape=list(shape), data_type=dtype, fill_value=0)
    return {"driver": "zarr3", "kvstore": kv, "metadata": metadata}


def create_array(kv: dict, shape: tuple[int, ...], dtype: str, shard_nodes: int, context: ts.Context) -> ts.TensorStore:
    return ts.open(array_spec(kv, shape, dtype, shard_nodes), create=True, delete_existing=True,
                   context=context).result()


def open_array(kv: dict, context: ts.Context) -> ts.TensorStore:
    return ts.open({"driver": "zarr3", "kvstore": kv}, open=True, context=context).result()


def read_json(kv: ts.KvStore, key: str) -> Any | None:
    """The JSON value under ``key``, or None when the key is missing."""
    r = kv.read(key).result()
    if r.state != "value":
        return None
    return json.loads(bytes(r.value).decode())


def write_json(kv: ts.KvStore, key: str, value: Any) -> None:
    """Write one key; a single-key write is all-or-nothing on every kvstore driver."""
    kv.write(key, json.dumps(value, indent=1, sort_keys=True).encode()).result()


def delete_prefix(kv: ts.KvStore, prefix: str, upto: str | None = None, wait: bool = True) -> ts.Future:
    """Delete every key in [prefix, upto) or, without ``upto``, every key starting with ``prefix``.
    With ``wait=False`` the deletion runs in the background (for garbage nobody will write again)."""
    end = upto if upto is not None else prefix[:-1] + chr(ord(prefix[-1]) + 1)
    future = kv.delete_range(ts.KvStore.KeyRange(prefix, end))
    if wait:
        future.result()
    return future


def contiguous(nodes: np.ndarray) -> bool:
    """Whether sorted node indices form one run (read as a slice instead of an index array)."""
    return nodes.size > 0 and int(nodes[-1]) - int(nodes[0]) + 1 == nodes.size
