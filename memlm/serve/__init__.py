"""Serving: the ``memlm generate`` verb (the decoding engine is ``memlm.infer.generate``), and serving a
bank on stock engines: ``memlm export --serve`` / ``--merge-path`` (:mod:`memlm.serve.export`, the maths in
:mod:`memlm.serve.lora`) and its router (:mod:`memlm.serve.router`, numpy descent in
:mod:`memlm.serve.descent`, which imports neither jax nor the model: the package loads nothing eagerly)."""

from __future__ import annotations

from typing import Any

__all__ = ["generate_cli"]


def __getattr__(name: str) -> Any:
    if name == "generate_cli":
        from memlm.serve.generate import generate_cli

        return generate_cli
    raise AttributeError(f"module 'memlm.serve' has no attribute {name!r}")
