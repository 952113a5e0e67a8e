"""Multi-process coordination of a bank: barriers, all-gathers and which process owns which rows.

Every process of a run saves at the same step and writes only the rows it *owns*: a node is
owned by the process of the first device (in the sharding's device order) that holds it, so a
row that several devices hold (a replicated level, a tensor-parallel peer) is written once.

Why a module of its own: these are the only points where the bank's processes talk to each
other (through ``jax.experimental.multihost_utils``); with one process each is a no-op or a
local computation, so the rest of the bank is written as if it ran alone between them.
"""

from __future__ import annotations

import jax
import numpy as np


def barrier(name: str) -> None:
    """All processes reach this point before any goes on (nothing to wait for with one process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(f"memlm-bank-{name}")


def allgather(values: np.ndarray) -> np.ndarray:
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
