"""The bank's system of record: tensorstore arrays with a versioned, crash-safe manifest.

Layout of a bank location (any tensorstore kvstore; a local directory by default)::

    bank.json                     metadata: layout facts, tree id, init seed, shard sizes
    manifest.json                 versions: [{version, state, dirty}], next_version, rollback_to
    main/level{l}/{array}/params  [k**l, *block]  bank dtype     zarr3, sharding codec,
    main/level{l}/{array}/mu|nu   [k**l, *block]  float32        one inner chunk per node
    main/level{l}/count           [k**l] int32    per-node AdamW step
    main/level{l}/written         [k**l] uint8    1 once the node's block has been written
    before/v{N}/level{l}/p{i}/... before-images of the nodes process i wrote in version N (+ ``nodes``)
    after/v{N}/level{l}/p{i}/...  after-images of those nodes, kept only until N is applied

Lazy init. A node whose ``written`` flag is 0 has never been trained: its parameters are its
initial block, recomputed on read from (seed, level, array, node) (``bank.init``), and its
moments and counter are zero. Creating a bank therefore writes only metadata, and a 65k-leaf
bank costs nothing on disk until its nodes are trained.

Saving version N (only the nodes whose dirty flag is set). Every process of a run calls
:meth:`save` at the same step; each writes only the rows it *owns*: a node is owned by the
process of the first device (in the sharding's device order) that holds it, so a row that
several devices hold (a replicated level, a tensor-parallel peer) is written once.

1. parts: every process writes the before-images (read from ``main``, which holds the latest
   version) and after-images (from its own devices) of its nodes under ``before/vN/.../p{i}``
   and ``after/vN/.../p{i}``; barrier;
2. commit: process 0 writes ``manifest.json`` (one atomic write) appending N with state
   ``complete`` and every part's row count; barrier: N exists only now, and as a whole;
3. apply: the after-images go into ``main``; every zarr shard (one key) is rewritten by one
   process (shard index modulo the process count), so no two processes write the same key;
4. finish (after a barrier): process 0 marks N ``applied``, drops versions beyond the last
   ``keep`` and deletes the deltas nobody can need any more.

A crash before 2 leaves a delta the manifest does not name: it is ignored and deleted on the
next writable open, and version N-1 is read. A crash after 2 leaves a complete delta that may
be partly (or wholly) applied: the next open replays the after-images (idempotent). Every key
write is all-or-nothing, so no reader sees a torn block, and ``main`` is never read for a node
that a pending delta covers without going through that delta: never a silent mix.

A crash of any process before 2 leaves parts the manifest does not name: they are ignored and
deleted, and version N-1 is read. A crash after 2 leaves a complete version, replayed on open.

Writers and readers. One run (its processes together) writes at a time. A writable open is
done by the leader (process 0, ``leader=True``), which finishes or rolls back what a crash left
and collects garbage, and then by the other processes (``leader=False``), which only read.
Loading reads, per process, only the rows of the devices it holds. Read-only handles may be
open meanwhile but should not read while a save or rollback is being applied.

Older versions: ``open(version=M)`` reads ``main`` overlaid with, for every node changed after
M, its before-image from the first later version that changed it; a writable open of M rolls
``main`` back (recorded in the manifest first, so a crash mid-rollback is redone on open) and
forgets the later versions. Version numbers only grow, so an abandoned number is never reused.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import math
import os
from collections.abc import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import tensorstore as ts
from jax.sharding import Mesh

from memlm.bank import tsio
from memlm.bank.device import BankState, bank_shardings, clear_dirty, level_placement
from memlm.bank.init import bucket, init_rows
from memlm.bank.layout import BankLayout, LevelLayout

FORMAT = "memlm-bank"
FORMAT_VERSION = 2  # 2: per-process delta parts and the float32 master
META_KEY = "bank.json"
MANIFEST_KEY = "manifest.json"
KINDS = ("params", "mu", "nu")


class BankStoreError(ValueError):
    """A bank location is missing, damaged or used in a way it does not support."""


class BankMismatchError(BankStoreError):
    """A stored bank does not match the model or tree it is opened for; ``field`` names the fact."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


@dataclasses.dataclass(frozen=True)
class _Field:
    """One stored array of a level: a block array's params / mu / nu, or a per-node scalar."""

    array: str | None
    kind: str  # params, mu, nu, count, written

    @property
    def path(self) -> str:
        return f"{self.array}/{self.kind}" if self.array else self.kind

    def row_shape(self, layout: BankLayout, lv: LevelLayout) -> tuple[int, ...]:
        return layout.array(self.array).shape(lv.rank) if self.array else ()

    def dtype(self, layout: BankLayout) -> str:
        dtypes = {"params": layout.master_dtype, "mu": "float32", "nu": "float32", "count": "int32", "written": "uint8"}
        return dtypes[self.kind]


def _fields(layout: BankLayout) -> list[_Field]:
    return [_Field(a.name, k) for a in layout.arrays for k in KINDS] + [_Field(None, "count"), _Field(None, "written")]


def _vkey(version: int) -> str:
    return f"v{version:012d}"


def _row_bytes(layout: BankLayout, lv: LevelLayout) -> int:
    """Stored bytes of one node across all its fields."""
    return sum(math.prod(f.row_shape(layout, lv)) * np.dtype(jnp.dtype(f.dtype(layout))).itemsize
               for f in _fields(layout))


@jax.jit
def _take_rows(x: jax.Array, idx: jax.Array) -> jax.Array:
    return jnp.take(x, idx, axis=0)


def _barrier(name: str) -> None:
    """All processes reach this point before any goes on (nothing to wait for with one process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(f"memlm-bank-{name}")


def _allgather(values: np.ndarray) -> np.ndarray:
    """``[processes, *values.shape]``: every process's ``values``."""
    if jax.process_count() == 1:
        return values[None]
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(values))


def owned_ranges(x: jax.Array) -> list[tuple[int, int, jax.Device]]:
    """The node ranges ``[start, stop)`` of ``x`` (node axis first) this process writes, each with
    a local device holding it: a range is owned by the process of the first device holding it."""
    n = x.shape[0]
    first: dict[tuple[int, int], jax.Device] = {}
    for device, index in sorted(x.sharding.devices_indices_map(x.shape).items(), key=lambda kv: kv[0].id):
        start, stop, _ = index[0].indices(n)
        first.setdefault((start, stop), device)
    me = jax.process_index()
    return [(a, b, d) for (a, b), d in sorted(first.items()) if d.process_index == me]


def _local_rows(x: jax.Array, nodes: np.ndarray) -> np.ndarray:
    """Host copy of rows ``nodes`` (all in this process's owned ranges, sorted) of a sharded array."""
    out = np.empty((nodes.size, *x.shape[1:]), x.dtype)
    shards = {s.device: s for s in x.addressable_shards}
    for start, stop, device in owned_ranges(x):
        lo, hi = np.searchsorted(nodes, [start, stop])
        if hi == lo:
            continue
        data = shards[device].data
        idx = np.full(bucket(hi - lo), nodes[hi - 1] - start, np.int32)
        idx[:hi - lo] = nodes[lo:hi] - start
        out[lo:hi] = np.asarray(_take_rows(data, jnp.asarray(idx)))[:hi - lo]
    return out


@functools.partial(jax.jit, donate_argnums=0)
def _set_rows(buf: jax.Array, rows: jax.Array, start: jax.Array) -> jax.Array:
    """Write rows into a device buffer in place (the buffer is donated)."""
    return jax.lax.dynamic_update_slice_in_dim(buf, rows, start, axis=0)


def _batches(nodes: np.ndarray, shard_nodes: int, max_rows: int) -> list[tuple[int, int]]:
    """Split sorted node ids into [i, j) batches of whole shards, about ``max_rows`` rows each,
    so that every shard of the target array is rewritten once per pass."""
    if nodes.size == 0:
        return []
    shard = nodes // shard_nodes
    starts = np.flatnonzero(np.diff(shard)) + 1
    bounds = [0, *starts.tolist(), nodes.size]
    out, i = [], 0
    for b in bounds[1:]:
        if b - i >= max_rows or b == nodes.size:
            out.append((i, b))
            i = b
    return out


class BankStore:
    """A bank location opened at one version: save, load to device, read blocks.

    Use :meth:`create` or :meth:`open`. A writable handle holds ``main`` at its version and is
    the only writer; read-only handles never modify the location.
    """

    def __init__(self, kv_spec: dict, layout: BankLayout, meta: dict, *, writable: bool, batch_bytes: int):
        self._spec = kv_spec
        self._where = tsio.describe(kv_spec)
        self._context = ts.Context({"cache_pool": {"total_bytes_limit": 64 << 20}})
        self._kv = ts.KvStore.open(kv_spec, context=self._context).result()
        self.layout = dataclasses.replace(layout, init_std=float(meta["init_std"]))
        self.meta = meta
        self.writable = writable
        self.batch_bytes = int(batch_bytes)
        self.stats: collections.Counter = collections.Counter()
        self.on_phase: Callable[[str], None] | None = None  # fault-injection seam: called between save phases
        self._arrays: dict[str, ts.TensorStore] = {}
        self._background: list[ts.Future] = []  # garbage deletions still running
        self._interrupted = False  # a save on this handle raised: main may hold a partial version
        self._manifest: dict = {}
        self.version = -1
        self._count: dict[str, np.ndarray] = {}
        self._written: dict[str, np.ndarray] = {}
        self._overlay: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
        self._overlay_groups: list[str] = []

    # ---- creation and opening ------------------------------------------------------------------
    @classmethod
    def create(cls, location: str | os.PathLike | dict, layout: BankLayout, *, seed: int = 0, tree_id: str = "",
               keep: int = 3, shard_bytes: int = 16 << 20, overwrite: bool = False,
               batch_bytes: int = 256 << 20) -> BankStore:
        """Create a bank at ``location`` as version 0 (its lazy init: only metadata is written).

        ``keep``: how many versions stay restorable; ``shard_bytes``: target size of one outer
        zarr chunk (a key holding several nodes' blocks of one array; an incremental save rewrites
        every shard holding a dirty node; 0 gives one key per block).
        """
        if keep < 1:
            raise BankStoreError(f"keep = {keep}: at least the latest version must be kept")
        spec = tsio.kvstore_spec(location)
        kv = ts.KvStore.open(spec).result()
        if tsio.read_json(kv, META_KEY) is not None:
            if not overwrite:
                raise BankStoreError(f"{tsio.describe(spec)} already holds a bank (pass overwrite=True to replace it)")
            for key in (META_KEY, MANIFEST_KEY):  # metadata first: a half-deleted bank is no bank
                kv.write(key, None).result()
            for prefix in ("main/", "before/", "after/"):  # only the bank's own keys
                tsio.delete_prefix(kv, prefix)
        shards = {}
        for lv in layout.levels:
            biggest = max(a.size(lv.rank) for a in layout.arrays) * 4  # float32 moments: the largest rows
            shards[lv.key] = max(1, min(lv.nodes, shard_bytes // biggest))
        meta = {"format": FORMAT, "format_version": FORMAT_VERSION, **layout.metadata(), "init_std": layout.init_std,
                "seed": int(seed), "tree_id": str(tree_id), "keep": int(keep), "shard_nodes": shards}
        store = cls(spec, layout, meta, writable=True, batch_bytes=batch_bytes)
        for lv in layout.levels:
            store._create_group(f"main/{lv.key}/", lv, lv.nodes)
        store._manifest = {"versions": [{"version": 0, "state": "applied", "dirty": {}}], "next_version": 1,
                           "rollback_to": None}
        tsio.write_json(kv, MANIFEST_KEY, store._manifest)
        tsio.write_json(kv, META_KEY, meta)  # last: a bank exists once its metadata does
        store._build_view(0)
        return store

    @classmethod
    def open(cls, location: str | os.PathLike | dict, layout: BankLayout, *, tree_id: str | None = None,
             version: int | None = None, writable: bool = False, batch_bytes: int = 256 << 20,
             leader: bool = True) -> BankStore:
        """Open the bank at ``location`` at ``version`` (default: the last complete one).

        The stored metadata is checked against ``layout`` (and ``tree_id`` when given); a
        mismatch raises BankMismatchError naming the field. A writable open by the ``leader``
        first finishes or discards an interrupted save and rolls ``main`` back to ``version`` if
        it is older; the other processes of a run open writable with ``leader=False`` after it.
        """
        spec = tsio.kvstore_spec(location)
        kv = ts.KvStore.open(spec).result()
        where = tsio.describe(spec)
        meta = tsio.read_json(kv, META_KEY)
        if meta is None:
            raise BankStoreError(f"{where}: no bank here ({META_KEY} is missing)")
        if meta.get("format") != FORMAT or meta.get("format_version") != FORMAT_VERSION:
            raise BankMismatchError("format_version", f"{where}: field 'format_version' is "
                                    f"{meta.get('format_version')!r} in the bank but this code reads {FORMAT_VERSION}")
        for field, want in layout.metadata().items():
            if meta.get(field) != want:
                raise BankMismatchError(field, f"{where}: field {field!r} is {meta.get(field)!r} in the bank "
                                        f"but {want!r} in the config")
        if tree_id is not None and meta["tree_id"] != tree_id:
            raise BankMismatchError("tree_id", f"{where}: field 'tree_id' is {meta['tree_id']!r} in the bank "
                                    f"but {tree_id!r} for the tree in use")
        store = cls(spec, layout, meta, writable=writable, batch_bytes=batch_bytes)
        store._manifest = tsio.read_json(kv, MANIFEST_KEY)
        if store._manifest is None:
            raise BankStoreError(f"{where}: {MANIFEST_KEY} is missing")
        lead = writable and leader
        if lead:
            store._recover()
        target = store.latest if version is None else int(version)
        if target not in store.versions:
            raise BankStoreError(f"{where}: version {target} is not restorable; kept versions: {store.versions}")
        if lead and target != store.latest:
            store._rollback(target)
        if lead:
            store._collect_garbage()
        elif writable and (target != store.latest or store._manifest["versions"][-1]["state"] != "applied"):
            raise BankStoreError(f"{where}: version {target} is not the bank's applied latest; the leader opens "
                                 "the bank first")
        store._build_view(target)
        return store

    def close(self) -> None:
        """Wait for background garbage deletions (optional: a later writable open redoes them)."""
        for future in self._background:
            future.result()
        self._background = []

    # ---- versions ------------------------------------------------------------------------------
    @property
    def versions(self) -> list[int]:
        """Restorable versions, oldest first (a pending rollback hides the versions it drops)."""
        cut = self._manifest.get("rollback_to")
        return [e["version"] for e in self._manifest["versions"] if cut is None or e["version"] <= cut]

    @property
    def latest(self) -> int:
        return self.versions[-1]

    @property
    def seed(self) -> int:
        return int(self.meta["seed"])

    @property
    def tree_id(self) -> str:
        return str(self.meta["tree_id"])

    def _entry(self, version: int) -> dict:
        return next(e for e in self._manifest["versions"] if e["version"] == version)

    def _write_manifest(self) -> None:
        tsio.write_json(self._kv, MANIFEST_KEY, self._manifest)

    def _phase(self, name: str) -> None:
        if self.on_phase is not None:
            self.on_phase(name)

    # ---- arrays --------------------------------------------------------------------------------
    def _array(self, group: str, field: _Field | str) -> ts.TensorStore:
        path = group + (field if isinstance(field, str) else field.path) + "/"
        if path not in self._arrays:
            self._arrays[path] = tsio.open_array(tsio.join(self._spec, path), self._context)
        return self._arrays[path]

    def _create_group(self, group: str, lv: LevelLayout, rows: int, with_nodes: bool = False) -> None:
        shard = int(self.meta["shard_nodes"][lv.key])
        for f in _fields(self.layout):
            path = group + f.path + "/"
            self._arrays[path] = tsio.create_array(tsio.join(self._spec, path), (rows, *f.row_shape(self.layout, lv)),
                                                   f.dtype(self.layout), shard, self._context)
        if with_nodes:
            path = group + "nodes/"
            self._arrays[path] = tsio.create_array(tsio.join(self._spec, path), (rows,), "int32", shard, self._context)

    def _max_rows(self, lv: LevelLayout) -> int:
        return max(1, self.batch_bytes // _row_bytes(self.layout, lv))

    def _parts(self, version: int, lv: LevelLayout) -> list[tuple[str, np.ndarray]]:
        """``[(part suffix "p{i}/", its nodes)]`` of a committed version's delta at a level."""
        out = []
        for i, n in enumerate(self._entry(version).get("parts", {}).get(lv.key, [])):
            if n:
                part = f"p{i}/"
                nodes = self._array(f"before/{_vkey(version)}/{lv.key}/{part}", "nodes").read().result()
                out.append((part, nodes.astype(np.int64)))
        return out

    def _delta_nodes(self, version: int, lv: LevelLayout) -> np.ndarray:
        parts = self._parts(version, lv)
        return np.sort(np.concatenate([n for _, n in parts])) if parts else np.zeros((0,), np.int64)

    # ---- the view: what this handle reads ------------------------------------------------------
    def _build_view(self, target: int) -> None:
        """Per-node counters and written flags of version ``target``, and the overlay that maps
        nodes changed after it (or by an unapplied latest save) to the delta rows holding them."""
        self.version = target
        entries = [e for e in self._manifest["versions"] if e["version"] > target]
        groups: list[str] = []
        latest = self._manifest["versions"][-1]
        unapplied = latest["version"] == target and latest["state"] == "complete"
        for lv in self.layout.levels:
            main = f"main/{lv.key}/"
            count = self._array(main, "count").read().result()
            written = self._array(main, "written").read().result()
            seen = np.zeros(lv.nodes, bool)
            ov_nodes, ov_src, ov_row = [], [], []
            sources = [(e["version"], "before") for e in entries]
            if unapplied:
                sources = [(target, "after")]
            for version, kind in sources:
                for part, nodes in self._parts(version, lv):
                    fresh = np.flatnonzero(~seen[nodes])
                    seen[nodes] = True
                    group = f"{kind}/{_vkey(version)}/{lv.key}/{part}"
                    groups.append(group)
                    ov_nodes.append(nodes[fresh])
                    ov_src.append(np.full(fresh.size, len(groups) - 1, np.int32))
                    ov_row.append(fresh)
                    count[nodes[fresh]] = self._array(group, "count")[fresh].read().result()
                    written[nodes[fresh]] = self._array(group, "written")[fresh].read().result()
            if ov_nodes:
                nodes = np.concatenate(ov_nodes)
                order = np.argsort(nodes)
                self._overlay[lv.key] = (nodes[order], np.concatenate(ov_src)[order], np.concatenate(ov_row)[order])
            else:
                self._overlay[lv.key] = (np.zeros(0, np.int64), np.zeros(0, np.int32), np.zeros(0, np.int64))
            self._count[lv.key], self._written[lv.key] = count, written
        self._overlay_groups = groups

    def _plan_rows(self, lv: LevelLayout, field: _Field, nodes: np.ndarray) -> Callable[[], np.ndarray]:
        """Issue the reads for ``field`` of ``nodes`` (sorted) in this view; returns the finisher."""
        if field.kind == "count":
            return lambda: self._count[lv.key][nodes].copy()
        if field.kind == "written":
            return lambda: self._written[lv.key][nodes].copy()
        written = self._written[lv.key][nodes].astype(bool)
        ov_nodes, ov_src, ov_row = self._overlay[lv.key]
        pos = np.searchsorted(ov_nodes, nodes)
        hit = (pos < ov_nodes.size) & (ov_nodes[np.minimum(pos, max(ov_nodes.size - 1, 0))] == nodes) \
            if ov_nodes.size else np.zeros(nodes.size, bool)
        futures = []
        from_main = np.flatnonzero(written & ~hit)
        if from_main.size:
            arr = self._array(f"main/{lv.key}/", field)
            sel = nodes[from_main]
            src = arr[int(sel[0]):int(sel[-1]) + 1] if tsio.contiguous(sel) else arr[sel]
            futures.append((from_main, src.read()))
        from_delta = np.flatnonzero(written & hit)
        for g in np.unique(ov_src[pos[from_delta]]):
            local = from_delta[ov_src[pos[from_delta]] == g]
            arr = self._array(self._overlay_groups[int(g)], field)
            futures.append((local, arr[ov_row[pos[local]]].read()))
        self.stats["rows_read"] += int(from_main.size + from_delta.size)
        fresh = np.flatnonzero(~written)

        def finish() -> np.ndarray:
            shape = field.row_shape(self.layout, lv)
            out = np.zeros((nodes.size, *shape), jnp.dtype(field.dtype(self.layout)))
            for where, fut in futures:
                out[where] = fut.result()
            if field.kind == "params" and fresh.size:
                out[fresh] = init_rows(self.layout, self.seed, lv.level, field.array, nodes[fresh])
            return out

        return finish

    def read_rows(self, level: int, name: str, nodes: Sequence[int], kind: str = "params") -> np.ndarray:
        """``[len(nodes), *block]`` of array ``name`` (``kind``: params, mu or nu) at this version."""
        lv = self.layout.level(level)
        self.layout.array(name)
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        nodes = np.asarray(nodes, np.int64)
        order = np.argsort(nodes)
        out = np.empty((nodes.size, *self.layout.array(name).shape(lv.rank)), jnp.dtype(_Field(name, kind).dtype(
            self.layout)))
        out[order] = self._plan_rows(lv, _Field(name, kind), nodes[order])()
        return out

    def read_blocks(self, requests: Sequence[tuple[int, int]]) -> list[dict[str, np.ndarray]]:
        """Parameter blocks ``{name: block}`` for (level, node) pairs, all reads issued at once."""
        plans = []
        for level, node in requests:
            lv = self.layout.level(level)
            if not 0 <= node < lv.nodes:
                raise ValueError(f"level {level} has nodes [0, {lv.nodes}); got node {node}")
            idx = np.array([node], np.int64)
            plans.append({a.name: self._plan_rows(lv, _Field(a.name, "params"), idx) for a in self.layout.arrays})
        return [{name: plan()[0] for name, plan in p.items()} for p in plans]

    def written_nodes(self, level: int) -> np.ndarray:
        """The nodes of a level that were ever trained at this version (the rest read as their init)."""
        return np.flatnonzero(self._written[self.layout.level(level).key]).astype(np.int64)

    def read_fields(self, level: int, nodes: np.ndarray) -> dict[str, np.ndarray]:
        """Every stored field (parameters, moments, counter, written flag) of sorted ``nodes``."""
        lv = self.layout.level(level)
        nodes = np.asarray(nodes, np.int64)
        return {f.path: self._plan_rows(lv, f, nodes)() for f in _fields(self.layout)}

    def save_rows(self, rows: Mapping[int, tuple[np.ndarray, Callable[[np.ndarray], Mapping[str, np.ndarray]]]]) -> int:
        """A new version from host rows, in one process: ``{level: (sorted nodes, fields_of(nodes))}``
        with ``fields_of`` returning every field as :meth:`read_fields` does (e.g. merging banks)."""
        if not self.writable or jax.process_count() > 1:
            raise BankStoreError(f"{self._where}: save_rows needs a writable handle in a single process")
        version = int(self._manifest["next_version"])
        parts = {}
        for level, (nodes, fn) in rows.items():
            lv = self.layout.level(level)
            if len(nodes):
                self._write_delta(version, lv, np.asarray(nodes, np.int64), fn, part="p0/")
                parts[lv.key] = [len(nodes)]
        self._manifest["versions"].append({"version": version, "state": "complete",
                                           "dirty": {k: v[0] for k, v in parts.items()}, "parts": parts})
        self._manifest["next_version"] = version + 1
        self._write_manifest()
        for lv in self.layout.levels:
            self._apply_version(version, lv, None)
        self._mark_applied(version)
        self.version = version
        return version

    def counts(self, level: int) -> np.ndarray:
        """Per-node update counters of a level at this version."""
        return self._count[self.layout.level(level).key].copy()

    # ---- load to device ------------------------------------------------------------------------
    def load(self, mesh: Mesh | None = None, *, replicate_levels: int = 1,
             rules: Mapping[str, Sequence[str]] | None = None, inference: bool = False,
             slots: Mapping[str, int] | None = None) -> BankState:
        """This version on device with the bank's placement (``bank_shardings``: node axis padded to
        the shard count), streamed: each device shard is filled chunk by chunk of nodes (at most
        ``batch_bytes`` of host memory per chunk), never through one host array of a whole level.

        ``inference=True`` loads the parameters only, cast to the compute dtype (moments and
        counters are left as empty ``[0]`` arrays): what evaluation and generation need.
        """
        if mesh is None:
            mesh = Mesh(np.array(jax.local_devices()[:1]), ("data",))
        sh = bank_shardings(self.layout, mesh, replicate_levels=replicate_levels, rules=rules, slots=slots)
        placement = level_placement(self.layout, mesh, replicate_levels, slots)
        params, mu, nu, count, dirty = {}, {}, {}, {}, {}
        for lv in self.layout.levels:
            key, rows = lv.key, placement[lv.key].padded
            if placement[key].slots:  # off device: empty slot buffers, filled per step by memlm.bank.tiers
                shape = lambda a, key=key, r=lv.rank: (placement[key].device_rows, *a.shape(r))  # noqa: E731
                params[key] = {a.name: jax.device_put(np.zeros(shape(a), self.layout.master_dtype),
                                                      sh.params[key][a.name]) for a in self.layout.arrays}
                mu[key] = {a.name: jax.device_put(np.zeros(shape(a), np.float32), sh.mu[key][a.name])
                           for a in self.layout.arrays}
                nu[key] = {a.name: jax.device_put(np.zeros(shape(a), np.float32), sh.nu[key][a.name])
                           for a in self.layout.arrays}
                count[key] = jax.device_put(np.zeros(placement[key].device_rows, np.int32), sh.count[key])
                dirty[key] = jax.device_put(np.zeros(placement[key].device_rows, bool), sh.dirty[key])
                continue
            kinds = ("params",) if inference else KINDS
            trees = {"params": params, "mu": mu, "nu": nu}
            for kind in kinds:
                cast = self.layout.dtype if inference else None
                trees[kind][key] = {a.name: self._load_field(lv, _Field(a.name, kind), sh.params[key][a.name], rows,
                                                             cast) for a in self.layout.arrays}
            if inference:
                empty = jnp.zeros((0,), jnp.float32)
                mu[key] = {a.name: empty for a in self.layout.arrays}
                nu[key] = {a.name: empty for a in self.layout.arrays}
                count[key] = jnp.zeros((0,), jnp.int32)
                dirty[key] = jnp.zeros((0,), jnp.bool_)
                continue
            count[key] = self._load_field(lv, _Field(None, "count"), sh.count[key], rows)
            dirty[key] = jax.device_put(np.zeros(rows, bool), sh.dirty[key])
        return BankState(params=params, mu=mu, nu=nu, count=count, dirty=dirty, layout=self.layout)

    def _load_field(self, lv: LevelLayout, field: _Field, sharding: jax.sharding.Sharding, rows: int,
                    cast: str | None = None) -> jax.Array:
        """One field as a global array of ``rows`` (>= nodes; padding rows are zero) in ``sharding``,
        each addressable shard read from the store chunk by chunk."""
        dtype = cast or field.dtype(self.layout)
        shape = (rows, *field.row_shape(self.layout, lv))
        by_rows: dict[tuple[int, int], list] = collections.defaultdict(list)
        for device, index in sharding.addressable_devices_indices_map(shape).items():
            start, stop, _ = index[0].indices(rows)
            by_rows[(start, stop)].append((device, index[1:]))
        chunk = max(1, self.batch_bytes // max(1, math.prod(shape[1:]) * np.dtype(jnp.dtype(dtype)).itemsize))

        def read(a: int, b: int) -> np.ndarray:
            out = np.zeros((b - a, *shape[1:]), jnp.dtype(dtype))
            real = min(b, lv.nodes)
            if real > a:
                out[:real - a] = self._plan_rows(lv, field, np.arange(a, real))()
            return out

        buffers = {}
        for (start, stop), targets in by_rows.items():
            if stop - start <= chunk:
                block = read(start, stop)
                for device, rest in targets:
                    buffers[device] = jax.device_put(block[(slice(None), *rest)], device)
                continue
            for device, rest in targets:
                local = (stop - start, *(len(range(*s.indices(n))) for s, n in zip(rest, shape[1:], strict=True)))
                buffers[device] = jnp.zeros(local, dtype, device=device)
            for a in range(start, stop, chunk):
                block = read(a, min(a + chunk, stop))
                for device, rest in targets:
                    part = jax.device_put(block[(slice(None), *rest)], device)
                    buffers[device] = _set_rows(buffers[device], part, np.int32(a - start))
        arrays = [buffers[d] for d in sharding.addressable_devices_indices_map(shape)]
        return jax.make_array_from_single_device_arrays(shape, sharding, arrays)

    # ---- saving --------------------------------------------------------------------------------
    def save(self, state: BankState, host_rows: Mapping[str, tuple[np.ndarray, Callable]] | None = None
             ) -> tuple[int, BankState]:
        """Write the blocks dirty since the last save as a new version (module docstring, steps 1-4).

        Every process of the run calls this with its view of the same global state. ``host_rows``
        gives, for levels that live off device, this process's dirty nodes and a function returning
        their fields (``memlm.bank.tiers``); their device arrays in ``state`` are ignored. Returns the
        new version number (record it with the anchor checkpoint) and the state with its dirty
        flags cleared. Nodes never updated are not written: they read back as their init, which
        equals the state's values when it came from :meth:`load` (or ``init_state``).
        """
        if not self.writable:
            raise BankStoreError(f"{self._where}: opened read-only; open it with writable=True to save")
        if self._interrupted:
            raise BankStoreError(f"{self._where}: an earlier save on this handle was interrupted; open the bank "
                                 "again (writable) to recover before saving")
        self._interrupted = True  # cleared only when this save completes
        if state.layout.metadata() != self.layout.metadata():
            raise BankMismatchError("layout", f"{self._where}: the state's layout {state.layout.metadata()} differs "
                                    f"from the bank's {self.layout.metadata()}")
        me, procs = jax.process_index(), jax.process_count()
        version = int(self._manifest["next_version"])
        host_rows = dict(host_rows or {})
        mine, sources = {}, {}
        for lv in self.layout.levels:
            if lv.key in host_rows:  # a level off device: its dirty rows (this process's) come from the host tier
                mine[lv.key], sources[lv.key] = np.asarray(host_rows[lv.key][0], np.int64), host_rows[lv.key][1]
                continue
            sources[lv.key] = lambda sel, lv=lv: self._state_rows(state, lv, sel)
            dirty = state.dirty[lv.key]
            owned = [np.arange(a, min(b, lv.nodes)) for a, b, _ in owned_ranges(dirty)]
            owned = np.concatenate(owned) if owned else np.zeros(0, np.int64)
            flags = _local_rows(dirty, owned) if owned.size else np.zeros(0, bool)
            mine[lv.key] = owned[flags.astype(bool)]
        for lv in self.layout.levels:
            if mine[lv.key].size:
                self._write_delta(version, lv, mine[lv.key], sources[lv.key], part=f"p{me}/")
        self._phase("delta-written")
        counts = _allgather(np.array([mine[lv.key].size for lv in self.layout.levels], np.int64))
        _barrier(f"v{version}-parts")
        parts = {lv.key: [int(c) for c in counts[:, i]] for i, lv in enumerate(self.layout.levels)
                 if counts[:, i].any()}
        entry = {"version": version, "state": "complete", "dirty": {k: sum(v) for k, v in parts.items()},
                 "parts": parts}
        if me == 0:
            self._manifest["versions"].append(entry)
            self._manifest["next_version"] = version + 1
            self._write_manifest()
        _barrier(f"v{version}-commit")
        if me != 0:
            self._manifest = tsio.read_json(self._kv, MANIFEST_KEY)
        self._phase("committed")
        for lv in self.layout.levels:
            if lv.key in parts:
                direct = state if procs == 1 and lv.key not in host_rows else None
                self._apply_version(version, lv, direct, share=(me, procs))
        self._phase("applied")
        _barrier(f"v{version}-applied")
        if me == 0:
            self._mark_applied(version)
        _barrier(f"v{version}-done")
        if procs > 1:
            self._manifest = tsio.read_json(self._kv, MANIFEST_KEY)
            self._build_view(version)
        self.version = version
        self._interrupted = False
        return version, clear_dirty(state)

    def _state_rows(self, state: BankState, lv: LevelLayout, nodes: np.ndarray) -> dict[str, np.ndarray]:
        """All fields of ``nodes`` (sorted, owned by this process) read from this process's devices."""
        rows = {}
        for a in self.layout.arrays:
            for kind, tree in (("params", state.params), ("mu", state.mu), ("nu", state.nu)):
                rows[f"{a.name}/{kind}"] = _local_rows(tree[lv.key][a.name], nodes)
        rows["count"] = _local_rows(state.count[lv.key], nodes)
        rows["written"] = np.ones(nodes.size, np.uint8)
        return rows

    def _apply_version(self, version: int, lv: LevelLayout, state: BankState | None,
                       share: tuple[int, int] = (0, 1)) -> None:
        """Apply version ``version``'s after-images of a level into ``main``: the zarr shards whose
        index modulo ``share[1]`` is ``share[0]`` (one process per key). With ``state`` (a single
        process saving), the rows come straight from the devices instead of being read back."""
        parts = self._parts(version, lv)
        if not parts:
            return
        nodes = np.concatenate([n for _, n in parts])
        src = np.concatenate([np.full(n.size, i) for i, (_, n) in enumerate(parts)])
        row = np.concatenate([np.arange(n.size) for _, n in parts])
        order = np.argsort(nodes)
        nodes, src, row = nodes[order], src[order], row[order]
        shard_nodes = int(self.meta["shard_nodes"][lv.key])
        keep = (nodes // shard_nodes) % share[1] == share[0]
        nodes, src, row = nodes[keep], src[keep], row[keep]
        if not nodes.size:
            return
        groups = [f"after/{_vkey(version)}/{lv.key}/{part}" for part, _ in parts]

        def rows_fn(i: int, j: int) -> dict[str, np.ndarray]:
            if state is not None:
                return self._state_rows(state, lv, nodes[i:j])
            out: dict[str, np.ndarray] = {}
            for g in np.unique(src[i:j]):
                sel = np.flatnonzero(src[i:j] == g)
                got = self._delta_rows(groups[int(g)], row[i:j][sel])(0, sel.size)
                for path, value in got.items():
                    if path not in out:
                        out[path] = np.empty((j - i, *value.shape[1:]), value.dtype)
                    out[path][sel] = value
            return out

        self._apply(lv, nodes, rows_fn)

    def _pipelined(self, batches: Sequence[tuple[int, int]],
                   stage: Callable[[int, int, ts.Transaction], list], done: Callable[[int, int], None]) -> None:
        """Run batches as transactions, staging batch i+1 while batch i commits (one shard set
        per batch, so the two never touch the same block); ``done(i, j)`` once batch [i, j) is durable."""
        inflight = None
        for i, j in batches:
            txn = ts.Transaction()
            for fut in stage(i, j, txn):
                fut.result()
            if inflight is not None:
                inflight[0].result()
                done(*inflight[1])
            inflight = (txn.commit_async(), (i, j))
        if inflight is not None:
            inflight[0].result()
            done(*inflight[1])

    def _write_delta(self, version: int, lv: LevelLayout, nodes: np.ndarray,
                     rows_fn: Callable[[np.ndarray], Mapping[str, np.ndarray]], part: str) -> None:
        """Before- and after-images of ``nodes`` (this process's part) under ``before/vN/.../part`` and
        ``after/vN/.../part``, batch by batch."""
        before, after = (f"{g}/{_vkey(version)}/{lv.key}/{part}" for g in ("before", "after"))
        main = f"main/{lv.key}/"
        n = nodes.size
        self._create_group(before, lv, n, with_nodes=True)
        self._create_group(after, lv, n)
        self._array(before, "nodes").write(nodes.astype(np.int32)).result()
        shard = min(n, int(self.meta["shard_nodes"][lv.key]))
        step = max(shard, self._max_rows(lv) // shard * shard)
        fields = _fields(self.layout)

        def stage(i: int, j: int, txn: ts.Transaction) -> list:
            sel = nodes[i:j]
            was = np.flatnonzero(self._written[lv.key][sel])
            old = {f.path: self._array(main, f)[sel[was]].read() for f in fields if f.array} if was.size else {}
            rows = rows_fn(sel)
            pending = [self._array(after, f).with_transaction(txn)[i:j].write(rows[f.path]) for f in fields]
            pending.append(self._array(before, "count").with_transaction(txn)[i:j].write(self._count[lv.key][sel]))
            pending.append(self._array(before, "written").with_transaction(txn)[i:j].write(self._written[lv.key][sel]))
            for path, fut in old.items():
                pending.append(self._array(before, path).with_transaction(txn)[i + was].write(fut.result()))
            return pending

        def done(i: int, j: int) -> None:
            self.stats["delta_rows_written"] += j - i
            self._phase("delta-batch")

        self._pipelined([(i, min(n, i + step)) for i in range(0, n, step)], stage, done)

    def _apply(self, lv: LevelLayout, nodes: np.ndarray,
               rows_fn: Callable[[int, int], Mapping[str, np.ndarray]]) -> None:
        """Write rows (all fields) of sorted ``nodes`` into ``main``, each shard rewritten once."""
        main = f"main/{lv.key}/"
        staged: dict[tuple[int, int], Mapping[str, np.ndarray]] = {}

        def stage(i: int, j: int, txn: ts.Transaction) -> list:
            sel = nodes[i:j]
            rows = staged[(i, j)] = rows_fn(i, j)
            pending = []
            for f in _fields(self.layout):
                arr = self._array(main, f).with_transaction(txn)
                target = arr[int(sel[0]):int(sel[-1]) + 1] if tsio.contiguous(sel) else arr[sel]
                pending.append(target.write(rows[f.path]))
            return pending

        def done(i: int, j: int) -> None:
            rows = staged.pop((i, j))
            if lv.key in self._count:
                self._count[lv.key][nodes[i:j]] = rows["count"]
                self._written[lv.key][nodes[i:j]] = rows["written"]
            self.stats["main_rows_written"] += j - i
            self._phase("apply-batch")

        self._pipelined(_batches(nodes, int(self.meta["shard_nodes"][lv.key]), self._max_rows(lv)), stage, done)

    def _delta_rows(self, group: str, rows: np.ndarray) -> Callable[[int, int], dict[str, np.ndarray]]:
        """rows_fn reading delta rows ``rows[i:j]`` of every field from ``group``."""
        def read(i: int, j: int) -> dict[str, np.ndarray]:
            futures = {f.path: self._array(group, f)[rows[i:j]].read() for f in _fields(self.layout)}
            return {path: fut.result() for path, fut in futures.items()}
        return read

    def _mark_applied(self, version: int) -> None:
        self._entry(version)["state"] = "applied"
        versions = self._manifest["versions"]
        dropped, kept = versions[:-int(self.meta["keep"])], versions[-int(self.meta["keep"]):]
        self._manifest["versions"] = kept
        self._write_manifest()
        # Garbage under version keys that are never written again (numbers only grow), so it is
        # deleted in the background; the first kept version's before-images restore nothing kept.
        self._background = [f for f in self._background if not f.done()]
        for v in [e["version"] for e in dropped] + ([kept[0]["version"]] if dropped else []):
            self._background.append(tsio.delete_prefix(self._kv, f"before/{_vkey(v)}/", wait=False))
        self._background.append(tsio.delete_prefix(self._kv, f"after/{_vkey(version)}/", wait=False))
        self._arrays = {k: v for k, v in self._arrays.items() if k.startswith("main/")}

    # ---- recovery, rollback, garbage -----------------------------------------------------------
    def _recover(self) -> None:
        """Finish what a crash interrupted: a pending rollback, or a complete but unapplied save."""
        if self._manifest.get("rollback_to") is not None:
            self._rollback(int(self._manifest["rollback_to"]))
        latest = self._manifest["versions"][-1]
        if latest["state"] == "complete":
            version = latest["version"]
            for lv in self.layout.levels:
                self._apply_version(version, lv, None)
            self._mark_applied(version)

    def _rollback(self, target: int) -> None:
        """Bring ``main`` back to ``target`` and forget the later versions (redone if interrupted)."""
        self._manifest["rollback_to"] = target
        self._write_manifest()
        self._build_view(target)
        for lv in self.layout.levels:
            ov_nodes, ov_src, ov_row = self._overlay[lv.key]
            for g in np.unique(ov_src):
                mine = ov_src == g
                self._apply(lv, ov_nodes[mine], self._delta_rows(self._overlay_groups[int(g)], ov_row[mine]))
        self._manifest["versions"] = [e for e in self._manifest["versions"] if e["version"] <= target]
        self._manifest["rollback_to"] = None
        self._write_manifest()
        tsio.delete_prefix(self._kv, f"before/{_vkey(target + 1)}", upto="before0")
        self._collect_garbage()

    def _collect_garbage(self) -> None:
        """Delete after-images (all applied by now), before-images no kept version needs, and any
        delta the manifest does not name (an interrupted save)."""
        kept = [e["version"] for e in self._manifest["versions"]]
        tsio.delete_prefix(self._kv, "after/")
        tsio.delete_prefix(self._kv, "before/", upto=f"before/{_vkey(kept[1])}" if len(kept) > 1 else None)
        tsio.delete_prefix(self._kv, f"before/{_vkey(int(self._manifest['next_version']))}", upto="before0")
        self._arrays = {k: v for k, v in self._arrays.items() if k.startswith("main/")}
