"""Learning-rate schedules: linear warmup then cosine decay to a final rate (the paper's recipe)."""

from __future__ import annotations

import optax


def cosine_with_warmup(peak: float, final: float, warmup: int, total: int) -> optax.Schedule:
    """0 -> ``peak`` over ``warmup`` steps, then cosine to ``final`` at ``total``; constant if peak == final."""
    if peak == final:
        return optax.constant_schedule(peak) if warmup == 0 else optax.linear_schedule(0.0, peak, warmup)
    warmup = min(warmup, max(total - 1, 0))
    return optax.warmup_cosine_decay_schedule(0.0, peak, warmup, max(total, warmup + 1), end_value=final)
