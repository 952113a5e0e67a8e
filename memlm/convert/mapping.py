"""Declarative name maps between Hugging Face tensors and memlm anchor parameters.

A family lists one :class:`TensorMap` per memlm parameter: the HF name (``{i}`` stands for the
layer index of a stacked parameter), the transform between the HF layout and memlm's, and the
condition under which the tensor exists. Layer parameters are stacked on memlm's leading
"layers" axis (the scanned layout) when reading and sliced per layer when writing.

Layouts: an HF ``nn.Linear`` weight is ``[out, in]``; memlm keeps ``[in..., out...]`` with heads
split out (``wq [d, heads, head_dim]``, ``wo [heads, head_dim, d]``), so :class:`Linear` is a
transpose plus a reshape. HF and memlm both use the half-split (``rotate_half``) RoPE layout,
so query / key weights map without a permutation. Every transform is exact (no arithmetic),
which makes HF -> memlm -> HF bit-exact.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import numpy as np

from memlm.model.anchor import AnchorSpec


def dims(spec: AnchorSpec) -> dict[str, int]:
    """The symbolic sizes a transform may name."""
    return {"d": spec.d_model, "h": spec.n_heads, "kv": spec.n_kv_heads, "dh": spec.head_dim, "f": spec.d_ff,
            "V": spec.vocab_size, "hdh": spec.n_heads * spec.head_dim, "kvdh": spec.n_kv_heads * spec.head_dim}


@dataclasses.dataclass(frozen=True)
class Same:
    """The same array in both layouts (embeddings, norm gains)."""

    def to_memlm(self, x: np.ndarray, spec: AnchorSpec) -> np.ndarray:
        return x

    def to_hf(self, x: np.ndarray, spec: AnchorSpec) -> np.ndarray:
        return x

    def hf_shape(self, shape: tuple[int, ...], spec: AnchorSpec) -> tuple[int, ...]:
        return tuple(shape)


@dataclasses.dataclass(frozen=True)
class Linear:
    """HF ``[prod(out), prod(in)]`` <-> memlm ``[*in, *out]`` (a transpose, then a split of the axes)."""

    inputs: tuple[str, ...]
    outputs: tuple[str, ...]

    def to_memlm(self, x: np.ndarray, spec: AnchorSpec) -> np.ndarray:
        n = dims(spec)
        return x.T.reshape(*(n[a] for a in self.inputs), *(n[a] for a in self.outputs))

    def to_hf(self, x: np.ndarray, spec: AnchorSpec) -> np.ndarray:
        n = dims(spec)
        fan_in = math.prod(n[a] for a in self.inputs)
        return np.ascontiguousarray(x.reshape(fan_in, -1).T)

    def hf_shape(self, shape: tuple[int, ...], spec: AnchorSpec) -> tuple[int, ...]:
        n = dims(spec)
        return math.prod(n[a] for a in self.outputs), math.prod(n[a] for a in self.inputs)


@dataclasses.dataclass(frozen=True)
class Split:
    """HF ``[prod(shape)]`` <-> memlm ``shape`` (a bias split per head)."""

    shape: tuple[str, ...]

    def to_memlm(self, x: np.ndarray, spec: AnchorSpec) -> np.ndarray:
        n = dims(spec)
        return x.reshape(*(n[a] for a in self.shape))

    def to_hf(self, x: np.ndarray, spec: AnchorSpec) -> np.ndarray:
        return x.reshape(-1)

    def hf_shape(self, shape: tuple[int, ...], spec: AnchorSpec) -> tuple[int, ...]:
        return (math.prod(shape),)


SAME = Same()


def always(spec: AnchorSpec) -> bool:
    return True


def untied(spec: AnchorSpec) -> bool:
    return not spec.tied_embeddings


@dataclasses.dataclass(frozen=True)
class TensorMap:
    """One memlm parameter and the HF tensor(s) it comes from."""

    param: str
    hf: str  # HF name; "{i}" marks a per-layer tensor, stacked on the layers axis
    transform: Same | Linear | Split = SAME
    when: Callable[[AnchorSpec], bool] = always

    @property
    def stacked(self) -> bool:
        return "{i}" in self.hf

    def hf_names(self, spec: AnchorSpec) -> list[str]:
        return [self.hf.format(i=i) for i in range(spec.n_layers)] if self.stacked else [self.hf]


def active(tensors: tuple[TensorMap, ...], spec: AnchorSpec) -> list[TensorMap]:
    """The maps whose tensors exist for this anchor."""
    return [t for t in tensors if t.when(spec)]


def to_memlm(t: TensorMap, spec: AnchorSpec, read: Callable[[str], np.ndarray], dtype: np.dtype) -> np.ndarray:
    """The memlm parameter of ``t`` in ``dtype``, reading (and stacking) its HF tensors."""
    if not t.stacked:
        return np.asarray(t.transform.to_memlm(read(t.hf), spec), dtype=dtype)
    first = t.transform.to_memlm(read(t.hf.format(i=0)), spec)
    out = np.empty((spec.n_layers, *first.shape), dtype)
    out[0] = first
    for i in range(1, spec.n_layers):
        out[i] = t.transform.to_memlm(read(t.hf.format(i=i)), spec)
    return out


def to_hf(t: TensorMap, spec: AnchorSpec, param: np.ndarray) -> dict[str, np.ndarray]:
    """HF tensors (name -> array, memlm's dtype) of one memlm parameter (one per layer when stacked)."""
    if not t.stacked:
        return {t.hf: t.transform.to_hf(param, spec)}
    return {t.hf.format(i=i): t.transform.to_hf(param[i], spec) for i in range(spec.n_layers)}


def hf_shape(t: TensorMap, spec: AnchorSpec, shape: tuple[int, ...]) -> tuple[int, ...]:
    """The HF shape of one tensor of ``t`` given the memlm parameter shape (without computing it)."""
    return t.transform.hf_shape(tuple(shape[1:]) if t.stacked else tuple(shape), spec)
