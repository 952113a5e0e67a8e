"""The run's banks on disk: create, save beside each checkpoint, reopen at a checkpoint's version.

A run keeps its hierarchical bank in ``RUN_DIR/bank`` and its generic memory in
``RUN_DIR/generic`` (tensorstore, versioned, see :mod:`memlm.bank.store`). Training always
starts from what the store holds (``BankStore.load``), so the values on device equal what a
resumed run reads back, bit for bit, on any backend and process count.

Several processes: process 0 creates a bank (or, on resume, opens it first and finishes or
rolls back whatever a crash left); after a barrier the others open it. Every process loads only
the rows of its own devices and writes only the rows it owns (the store's save protocol).
"""

from __future__ import annotations

import os
import signal

import jax
import ml_collections
from jax.sharding import Mesh

from memlm.bank.device import BankState
from memlm.bank.layout import BankLayout
from memlm.bank.store import BankStore, BankStoreError
from memlm.bank.sync import barrier
from memlm.run.paths import location


def _fault(point: str, step: int) -> None:
    """Crash tests' seam: ``MEMLM_KILL_AT=point:step:process`` (e.g. ``bank-delta-written:6:1``)
    SIGKILLs this process at that save phase, as a preemption without notice would."""
    spec = os.environ.get("MEMLM_KILL_AT")
    if spec and spec == f"{point}:{step}:{jax.process_index()}":
        os.kill(os.getpid(), signal.SIGKILL)


class RunBanks:
    """Bank and generic memory of one run directory (either may be absent)."""

    def __init__(self, workdir: str | os.PathLike, bank_layout: BankLayout | None, generic_layout: BankLayout | None,
                 cfg: ml_collections.ConfigDict, mesh: Mesh, tree_id: str = "", plan=None, leaves_at=None,
                 shardings=None):
        self.workdir = location(workdir)
        self.cfg, self.mesh, self.tree_id = cfg, mesh, tree_id
        # Levels off device (``bank.device_levels``): their rows come per step from a host tier.
        self.off_device = dict(plan.off_device) if plan is not None else {}
        self.placement = plan.levels if plan is not None else {}
        self.leaves_at, self.shardings = leaves_at, shardings
        self.tiers = None
        self.parts = {name: layout for name, layout in (("bank", bank_layout), ("generic", generic_layout))
                      if layout is not None}
        self.stores: dict[str, BankStore] = {}

    def _replicate(self, name: str) -> int:
        return self.cfg.bank.replicate_levels if name == "bank" else 1

    def _tree_id(self, name: str) -> str:
        return self.tree_id if name == "bank" else ""

    def _where(self, name: str) -> str:
        return os.fspath(self.workdir / name)

    def create(self) -> dict[str, BankState]:
        """Fresh banks (lazy init, version 0), loaded on device. Only for a run without checkpoints."""
        out = {}
        leader = jax.process_index() == 0
        for i, (name, layout) in enumerate(self.parts.items()):
            if leader:
                BankStore.create(self._where(name), layout, seed=self.cfg.train.seed + 1 + i,
                                 tree_id=self._tree_id(name), keep=self.cfg.train.keep_checkpoints + 1, overwrite=True)
            barrier(f"create-{name}")
            store = BankStore.open(self._where(name), layout, tree_id=self._tree_id(name), writable=True,
                                   leader=leader)
            self.stores[name] = store
            out[name] = self._load(name, store)
        return out

    def _load(self, name: str, store: BankStore) -> BankState:
        if name != "bank" or not self.off_device:
            return store.load(self.mesh, replicate_levels=self._replicate(name))
        from memlm.bank.tiers import TierManager

        slots = {k: pl.slots for k, pl in self.off_device.items()}
        state = store.load(self.mesh, replicate_levels=self._replicate(name), slots=slots)
        if self.tiers is not None:
            self.tiers.close()
        self.tiers = TierManager(store, store.layout, self.placement, lambda k: self.shardings.count[k],
                                 self.leaves_at, cache_bytes=self.cfg.bank.host_cache_bytes)
        return state

    def save(self, states: dict[str, BankState | None], step: int = 0) -> tuple[dict[str, BankState], dict[str, int]]:
        """Write the dirty blocks of each bank as a new version; returns the cleaned states and versions."""
        new, versions = {}, {}
        for name in self.parts:
            self.stores[name].on_phase = lambda phase, name=name: _fault(f"{name}-{phase}", step)
            host = self.tiers.host_rows() if name == "bank" and self.tiers is not None else None
            version, new[name] = self.stores[name].save(states[name], host_rows=host)
            if host is not None:
                self.tiers.saved()
            versions[f"{name}_version"] = version
        return new, versions

    def why_not(self, meta: dict) -> str | None:
        """Why the bank versions a checkpoint names cannot be opened (None: they can)."""
        for name, layout in self.parts.items():
            try:
                store = BankStore.open(self._where(name), layout, tree_id=self._tree_id(name))
            except BankStoreError as e:
                return f"{name}: {e}"
            want = meta.get(f"{name}_version")
            if want not in store.versions:
                return f"{name}: version {want} is not restorable (kept: {store.versions})"
        return None

    def load(self, meta: dict) -> dict[str, BankState]:
        """Reopen each bank at the version the checkpoint names (the leader rolls later versions back)."""
        out = {}
        leader = jax.process_index() == 0
        for name, layout in self.parts.items():
            kw = dict(tree_id=self._tree_id(name), version=int(meta[f"{name}_version"]), writable=True)
            if leader:
                self.stores[name] = BankStore.open(self._where(name), layout, leader=True, **kw)
            barrier(f"open-{name}")
            if not leader:
                self.stores[name] = BankStore.open(self._where(name), layout, leader=False, **kw)
            out[name] = self._load(name, self.stores[name])
        return out
