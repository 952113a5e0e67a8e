"""Serving: the ``memlm generate`` verb (the decoding engine is ``memlm.infer.generate``)."""

from memlm.serve.generate import generate_cli

__all__ = ["generate_cli"]
