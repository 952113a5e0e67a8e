"""The run's banks on disk: create, save beside each checkpoint, reopen at a checkpoint's version.

A run keeps its hierarchical bank in ``RUN_DIR/bank`` and its generic memory in
``RUN_DIR/generic`` (tensorstore, versioned, see :mod:`memlm.bank.store`). Training always
starts from what the store holds (``BankStore.load``), so the values on device equal what a
resumed run reads back, bit for bit, on any backend.
"""

from __future__ import annotations

from pathlib import Path

import ml_collections
from jax.sharding import Mesh

from memlm.bank.device import BankState
from memlm.bank.layout import BankLayout
from memlm.bank.store import BankStore, BankStoreError


class RunBanks:
    """Bank and generic memory of one run directory (either may be absent)."""

    def __init__(self, workdir: str | Path, bank_layout: BankLayout | None, generic_layout: BankLayout | None,
                 cfg: ml_collections.ConfigDict, mesh: Mesh, tree_id: str = ""):
        self.workdir = Path(workdir)
        self.cfg, self.mesh, self.tree_id = cfg, mesh, tree_id
        self.parts = {name: layout for name, layout in (("bank", bank_layout), ("generic", generic_layout))
                      if layout is not None}
        self.stores: dict[str, BankStore] = {}

    def _replicate(self, name: str) -> int:
        return self.cfg.bank.replicate_levels if name == "bank" else 1

    def _tree_id(self, name: str) -> str:
        return self.tree_id if name == "bank" else ""

    def create(self) -> dict[str, BankState]:
        """Fresh banks (lazy init, version 0), loaded on device."""
        out = {}
        for i, (name, layout) in enumerate(self.parts.items()):
            store = BankStore.create(self.workdir / name, layout, seed=self.cfg.train.seed + 1 + i,
                                     tree_id=self._tree_id(name), keep=self.cfg.train.keep_checkpoints + 1,
                                     overwrite=True)
            self.stores[name] = store
            out[name] = store.load(self.mesh, replicate_levels=self._replicate(name))
        return out

    def save(self, states: dict[str, BankState | None]) -> tuple[dict[str, BankState], dict[str, int]]:
        """Write the dirty blocks of each bank as a new version; returns the cleaned states and versions."""
        new, versions = {}, {}
        for name in self.parts:
            version, new[name] = self.stores[name].save(states[name])
            versions[f"{name}_version"] = version
        return new, versions

    def can_open(self, meta: dict) -> bool:
        """Whether every bank version a checkpoint names is still restorable."""
        for name, layout in self.parts.items():
            try:
                store = BankStore.open(self.workdir / name, layout, tree_id=self._tree_id(name))
            except BankStoreError:
                return False
            if meta.get(f"{name}_version") not in store.versions:
                return False
        return True

    def load(self, meta: dict) -> dict[str, BankState]:
        """Reopen each bank at the version the checkpoint names (rolling later versions back)."""
        out = {}
        for name, layout in self.parts.items():
            store = BankStore.open(self.workdir / name, layout, tree_id=self._tree_id(name),
                                   version=int(meta[f"{name}_version"]), writable=True)
            self.stores[name] = store
            out[name] = store.load(self.mesh, replicate_levels=self._replicate(name))
        return out
