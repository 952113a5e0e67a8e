"""A dependency-free, deterministic text embedder: signed feature hashing of n-grams.

Features are lower-cased word unigrams and bigrams and the character trigrams of each word
(with ``<`` ``>`` boundary marks). Each feature is hashed with CRC-32 (stable across processes and
platforms, unlike Python's salted ``hash``) to a dimension and a sign, summed with a per-kind
weight, and the vector is L2-normalised. Texts sharing words or word pieces get nearby vectors,
which is all the tests of other modules need; it is not a semantic encoder.
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Sequence

import numpy as np

_WORD = re.compile(r"\w+", re.UNICODE)
_WEIGHTS = {"w": 1.0, "b": 0.7, "c": 0.3}  # unigram, bigram, char trigram
_EMPTY = "\x00empty"  # the one feature of a text with no word: keeps the vector unit-norm


class HashingEmbedder:
    """Hashed word uni/bi-grams and char trigrams into ``dim`` signed dimensions."""

    name = "hash"

    def __init__(self, dim: int = 384):
        if dim < 2:
            raise ValueError(f"HashingEmbedder dim = {dim}: must be at least 2")
        self.dim = int(dim)

    def _features(self, text: str) -> list[tuple[str, float]]:
        words = _WORD.findall(text.lower())
        feats = [("w " + w, _WEIGHTS["w"]) for w in words]
        feats += [("b " + a + " " + b, _WEIGHTS["b"]) for a, b in zip(words, words[1:], strict=False)]
        for w in words:
            padded = "<" + w + ">"
            feats += [("c " + padded[i : i + 3], _WEIGHTS["c"]) for i in range(len(padded) - 2)]
        return feats or [(_EMPTY, 1.0)]

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """float32 ``[len(texts), dim]``, unit rows."""
        if isinstance(texts, str):
            raise TypeError("embed takes a sequence of texts, not one str")
        out = np.zeros((len(texts), self.dim), np.float32)
        for row, text in enumerate(texts):
            feats = self._features(text)
            h = np.fromiter((zlib.crc32(f.encode("utf-8")) for f, _ in feats), np.uint32, len(feats))
            w = np.fromiter((wt for _, wt in feats), np.float32, len(feats))
            sign = np.where(h & 1, 1.0, -1.0).astype(np.float32)
            np.add.at(out[row], (h >> 1) % self.dim, sign * w)
            norm = np.linalg.norm(out[row])
            if norm == 0:  # every feature cancelled out: fall back to the empty-text feature
                out[row, (zlib.crc32(_EMPTY.encode()) >> 1) % self.dim] = 1.0
            else:
                out[row] /= norm
        return out
