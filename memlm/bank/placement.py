"""Where a bank's levels live for training: on device (split over the data-parallel shards, or
replicated), or off device (``bank.device_levels``: the deeper levels stay in the store and each
shard holds, per step, the rows of its nodes the batch touches), and whether that fits the device
budget (``bank.device_bytes``). ``memlm info``, ``memlm compile`` and the training step read it.
"""

from __future__ import annotations

import ml_collections
from jax.sharding import Mesh

from memlm.bank.device import LevelPlacement, level_placement, tier_bytes
from memlm.bank.layout import BankLayout
from memlm.config import ConfigError
from memlm.memspec import uses_memory

__all__ = ["check_device_budget", "tier_placement", "tier_report"]


def tier_placement(layout: BankLayout, mesh: Mesh, replicate_levels: int, device_levels: int,
                   batch: int) -> dict[str, LevelPlacement]:
    """The bank's placement with levels deeper than ``device_levels`` (>= 0) off device: each
    shard then holds, per step, the rows of the nodes it owns that the batch touches."""
    levels = level_placement(layout, mesh, replicate_levels)
    off = {k: pl for k, pl in levels.items() if 0 <= device_levels < int(k[5:])}
    if not off:
        return levels
    return level_placement(layout, mesh, replicate_levels, {k: min(batch, pl.per_shard) for k, pl in off.items()})


def check_device_budget(cfg: ml_collections.ConfigDict, layout: BankLayout, mesh: Mesh,
                        levels: dict[str, LevelPlacement]) -> None:
    """Fail naming the levels to move off device when the bank state on one device exceeds
    ``bank.device_bytes`` (replicated levels must stay on device)."""
    budget, b = cfg.bank.device_bytes, cfg.bank
    need = sum(t["device_bytes"] for t in tier_bytes(layout, levels, b.host_cache_bytes))
    if need <= budget:
        return
    per_level = ", ".join(f"level {t['level']} {t['device_bytes'] / 1e9:.3g} GB ({t['tier']})"
                          for t in tier_bytes(layout, levels, b.host_cache_bytes))
    fits = None
    deepest = layout.levels[-1].level
    for n in range(deepest, b.replicate_levels - 1, -1):
        trial = tier_placement(layout, mesh, b.replicate_levels, n, cfg.train.batch_size)
        if sum(t["device_bytes"] for t in tier_bytes(layout, trial, b.host_cache_bytes)) <= budget:
            fits = n
            break
    if fits is not None:
        moved = f"level {deepest}" if fits + 1 == deepest else f"levels {fits + 1}-{deepest}"
        advice = f"set bank.device_levels={fits} ({moved} off device)"
    else:
        advice = "no split fits: use more devices, replicate fewer levels or a smaller batch"
    raise ConfigError(f"config key 'bank.device_bytes' = {budget}: the bank state needs {need / 1e9:.3g} GB per "
                      f"device ({per_level}); {advice}")


def tier_report(cfg: ml_collections.ConfigDict, mesh: Mesh) -> list[dict]:
    """Per bank level on ``mesh``: tier, training-state bytes per device and off device per shard
    (what ``memlm info`` and ``memlm compile`` print); empty without memory. A device budget
    (``bank.device_bytes``) the bank exceeds fails naming the levels to move off."""
    if not uses_memory(cfg):
        return []
    layout = BankLayout.from_config(cfg)
    b = cfg.bank
    levels = tier_placement(layout, mesh, b.replicate_levels, b.device_levels, cfg.train.batch_size)
    if b.device_bytes:
        check_device_budget(cfg, layout, mesh, levels)
    return tier_bytes(layout, levels, b.host_cache_bytes)
