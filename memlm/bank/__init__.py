"""The hierarchical memory bank: layout, device tier, sparse row-wise AdamW, tensorstore store,
and path fetch for inference. The model never imports this package (docs/design.md §2)."""

from memlm.bank.device import BankState, bank_shardings, clear_dirty, gather, init_state, split_fetched
from memlm.bank.fetch import PathFetcher
from memlm.bank.layout import BankLayout, LevelLayout, generic_paths, leaf_paths
from memlm.bank.store import BankMismatchError, BankStore, BankStoreError

__all__ = [
    "BankLayout", "BankMismatchError", "BankState", "BankStore", "BankStoreError", "LevelLayout", "PathFetcher",
    "bank_shardings", "clear_dirty", "gather", "generic_paths", "init_state", "leaf_paths",
    "split_fetched",
]
