"""Presets shipped with memlm. ``tiny`` is the embedded default: every ``memlm`` verb uses it when
given no ``--config`` (the paper's presets stay under ``experiments/`` in the repository)."""
