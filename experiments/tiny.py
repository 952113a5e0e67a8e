"""The embedded default (a tiny anchor with a two-level FFN-memory on the generated facts corpus).
It ships inside the package, ``memlm/presets/tiny.py``, so an installed memlm has it too; this
file keeps ``--config experiments/tiny.py`` working."""

from memlm.presets.tiny import get_config

__all__ = ["get_config"]
