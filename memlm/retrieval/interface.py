"""What an embedder is: texts -> unit-norm float32 vectors (the protocol), and its error type.

Kept apart from the factory (``memlm.retrieval.embedder``) so that embedder implementations import
the interface without importing the factory that imports them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import numpy as np

__all__ = ["Embedder", "EmbedderError"]


class EmbedderError(ValueError):
    """An embedder cannot be built or used (missing weights package, bad setting)."""


@runtime_checkable
class Embedder(Protocol):
    """Texts -> float32 ``[n, dim]``, every row of unit L2 norm."""

    name: str
    dim: int

    def embed(self, texts: Sequence[str]) -> np.ndarray: ...
