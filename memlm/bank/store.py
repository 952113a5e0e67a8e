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
import os
from collections.abc import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import tensorstore as ts
from jax.sharding import Mesh

from memlm.bank import tsio
from memlm.bank.device import BankState, clear_dirty
from memlm.bank.layout import BankLayout
from memlm.bank.rows import KINDS, Field, RowArrays, stored_fields
from memlm.bank.sync import allgather, barrier, owned_ranges
from memlm.bank.transfer import load_state, local_rows, state_rows
from memlm.bank.versions import MANIFEST_KEY, VersionLog
from memlm.bank.view import VersionView

FORMAT = "memlm-bank"
FORMAT_VERSION = 2  # 2: per-process delta parts and the float32 master
META_KEY = "bank.json"


class BankStoreError(ValueError):
    """A bank location is missing, damaged or used in a way it does not support."""


class BankMismatchError(BankStoreError):
    """A stored bank does not match the model or tree it is opened for; ``field`` names the fact."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


class BankStore:
    """A bank location opened at one version: save, load to device, read blocks.

    Use :meth:`create` or :meth:`open`. A writable handle holds ``main`` at its version and is
    the only writer; read-only handles never modify the location.

    The facade over one job per module: :class:`~memlm.bank.rows.RowArrays` (the tensorstore
    arrays and row writes), :class:`~memlm.bank.view.VersionView` (what this version reads),
    :class:`~memlm.bank.versions.VersionLog` (manifest and write-ahead log), :mod:`memlm.bank.sync`
    (the processes' barriers) and :mod:`memlm.bank.transfer` (rows to and from the devices).
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
        self._interrupted = False  # a save on this handle raised: main may hold a partial version
        self.version = -1
        self._rows = RowArrays(kv_spec, self._context, self.layout, meta["shard_nodes"], self.batch_bytes,
                               self.stats, self._phase)
        self._view = VersionView(self._rows, self.layout, int(meta["seed"]), self.stats)
        self._log = VersionLog(self._kv, self._rows, self.layout, int(meta["keep"]), self.stats, self._phase)

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
            store._rows.create_group(f"main/{lv.key}/", lv, lv.nodes)
        store._log.manifest = {"versions": [{"version": 0, "state": "applied", "dirty": {}}], "next_version": 1,
                               "rollback_to": None}
        tsio.write_json(kv, MANIFEST_KEY, store._log.manifest)
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
        if store._log.read() is None:
            raise BankStoreError(f"{where}: {MANIFEST_KEY} is missing")
        lead = writable and leader
        if lead:
            store._log.recover(store._view)
        target = store.latest if version is None else int(version)
        if target not in store.versions:
            raise BankStoreError(f"{where}: version {target} is not restorable; kept versions: {store.versions}")
        if lead and target != store.latest:
            store._log.rollback(target, store._view)
        if lead:
            store._log.collect_garbage()
        elif writable and (target != store.latest or store._log.manifest["versions"][-1]["state"] != "applied"):
            raise BankStoreError(f"{where}: version {target} is not the bank's applied latest; the leader opens "
                                 "the bank first")
        store._build_view(target)
        return store

    def close(self) -> None:
        """Wait for background garbage deletions (optional: a later writable open redoes them)."""
        self._log.wait()


    # ---- versions ------------------------------------------------------------------------------
    @property
    def versions(self) -> list[int]:
        """Restorable versions, oldest first (a pending rollback hides the versions it drops)."""
        return self._log.versions

    @property
    def latest(self) -> int:
        return self.versions[-1]

    @property
    def seed(self) -> int:
        return int(self.meta["seed"])

    @property
    def tree_id(self) -> str:
        return str(self.meta["tree_id"])

    def _phase(self, name: str) -> None:
        if self.on_phase is not None:
            self.on_phase(name)

    def _build_view(self, target: int) -> None:
        """Read version ``target`` from now on (:meth:`VersionView.build`)."""
        self.version = target
        self._view.build(self._log.manifest, target, self._log.parts)

    # ---- reading -------------------------------------------------------------------------------
    def read_rows(self, level: int, name: str, nodes: Sequence[int], kind: str = "params") -> np.ndarray:
        """``[len(nodes), *block]`` of array ``name`` (``kind``: params, mu or nu) at this version."""
        lv = self.layout.level(level)
        self.layout.array(name)
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        nodes = np.asarray(nodes, np.int64)
        order = np.argsort(nodes)
        out = np.empty((nodes.size, *self.layout.array(name).shape(lv.rank)), jnp.dtype(Field(name, kind).dtype(
            self.layout)))
        out[order] = self._view.plan(lv, Field(name, kind), nodes[order])()
        return out

    def read_blocks(self, requests: Sequence[tuple[int, int]]) -> list[dict[str, np.ndarray]]:
        """Parameter blocks ``{name: block}`` for (level, node) pairs, all reads issued at once."""
        plans = []
        for level, node in requests:
            lv = self.layout.level(level)
            if not 0 <= node < lv.nodes:
                raise ValueError(f"level {level} has nodes [0, {lv.nodes}); got node {node}")
            idx = np.array([node], np.int64)
            plans.append({a.name: self._view.plan(lv, Field(a.name, "params"), idx) for a in self.layout.arrays})
        return [{name: plan()[0] for name, plan in p.items()} for p in plans]

    def written_nodes(self, level: int) -> np.ndarray:
        """The nodes of a level that were ever trained at this version (the rest read as their init)."""
        return np.flatnonzero(self._view.written[self.layout.level(level).key]).astype(np.int64)

    def read_fields(self, level: int, nodes: np.ndarray) -> dict[str, np.ndarray]:
        """Every stored field (parameters, moments, counter, written flag) of sorted ``nodes``."""
        lv = self.layout.level(level)
        nodes = np.asarray(nodes, np.int64)
        return {f.path: self._view.plan(lv, f, nodes)() for f in stored_fields(self.layout)}

    def counts(self, level: int) -> np.ndarray:
        """Per-node update counters of a level at this version."""
        return self._view.count[self.layout.level(level).key].copy()

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
        return load_state(self.layout, self._view.plan, self.batch_bytes, mesh, replicate_levels=replicate_levels,
                          rules=rules, inference=inference, slots=slots)

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
        version = int(self._log.manifest["next_version"])
        host_rows = dict(host_rows or {})
        mine, sources = self._dirty_rows(state, host_rows)
        for lv in self.layout.levels:  # 1. parts
            if mine[lv.key].size:
                self._log.write_delta(version, lv, mine[lv.key], sources[lv.key], f"p{me}/", self._view)
        self._phase("delta-written")
        counts = allgather(np.array([mine[lv.key].size for lv in self.layout.levels], np.int64))
        barrier(f"v{version}-parts")
        parts = {lv.key: [int(c) for c in counts[:, i]] for i, lv in enumerate(self.layout.levels)
                 if counts[:, i].any()}
        if me == 0:  # 2. commit
            self._log.commit(version, parts)
        barrier(f"v{version}-commit")
        if me != 0:
            self._log.read()
        self._phase("committed")
        for lv in self.layout.levels:  # 3. apply
            if lv.key in parts:
                direct = (lambda sel, lv=lv: state_rows(self.layout, state, lv, sel)) \
                    if procs == 1 and lv.key not in host_rows else None
                self._log.apply_version(version, lv, self._view, direct, share=(me, procs))
        self._phase("applied")
        barrier(f"v{version}-applied")
        if me == 0:  # 4. finish
            self._log.mark_applied(version)
        barrier(f"v{version}-done")
        if procs > 1:
            self._log.read()
            self._build_view(version)
        self.version = version
        self._interrupted = False
        return version, clear_dirty(state)

    def _dirty_rows(self, state: BankState, host_rows: Mapping[str, tuple[np.ndarray, Callable]]
                    ) -> tuple[dict[str, np.ndarray], dict[str, Callable]]:
        """Per level, this process's dirty owned nodes and the function returning their fields."""
        mine, sources = {}, {}
        for lv in self.layout.levels:
            if lv.key in host_rows:  # a level off device: its dirty rows (this process's) come from the host tier
                mine[lv.key], sources[lv.key] = np.asarray(host_rows[lv.key][0], np.int64), host_rows[lv.key][1]
                continue
            sources[lv.key] = lambda sel, lv=lv: state_rows(self.layout, state, lv, sel)
            dirty = state.dirty[lv.key]
            owned = [np.arange(a, min(b, lv.nodes)) for a, b, _ in owned_ranges(dirty)]
            owned = np.concatenate(owned) if owned else np.zeros(0, np.int64)
            flags = local_rows(dirty, owned) if owned.size else np.zeros(0, bool)
            mine[lv.key] = owned[flags.astype(bool)]
        return mine, sources

    def save_rows(self, rows: Mapping[int, tuple[np.ndarray, Callable[[np.ndarray], Mapping[str, np.ndarray]]]]) -> int:
        """A new version from host rows, in one process: ``{level: (sorted nodes, fields_of(nodes))}``
        with ``fields_of`` returning every field as :meth:`read_fields` does (e.g. merging banks)."""
        if not self.writable or jax.process_count() > 1:
            raise BankStoreError(f"{self._where}: save_rows needs a writable handle in a single process")
        version = int(self._log.manifest["next_version"])
        parts = {}
        for level, (nodes, fn) in rows.items():
            lv = self.layout.level(level)
            if len(nodes):
                self._log.write_delta(version, lv, np.asarray(nodes, np.int64), fn, "p0/", self._view)
                parts[lv.key] = [len(nodes)]
        self._log.commit(version, parts)
        for lv in self.layout.levels:
            self._log.apply_version(version, lv, self._view)
        self._log.mark_applied(version)
        self.version = version
        return version
