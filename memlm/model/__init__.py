"""The anchor transformer, its memory adapters and parameter / FLOP accounting."""

from memlm.model.anchor import Anchor, AnchorSpec, init_cache

__all__ = ["Anchor", "AnchorSpec", "init_cache"]
