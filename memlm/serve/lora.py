"""A fetched memory in LoRA terms: the tensors of one PEFT LoRA adapter, and the padded / merged FFN.

FFN-memory (docs/design.md §1). Pad the anchor's FFN with R zero hidden units (``act(0) * 0 = 0``,
so the padded model is the anchor). A path's blocks M1, M2 (gate / up, memlm ``[d, R]``) and M3
(down, memlm ``[R, d]``) are then a rank-R LoRA on the padded model, in PEFT's layout
(``lora_A [r, in]``, ``lora_B [out, r]``, ``delta W = B @ A * lora_alpha / r``, ``lora_alpha = r``)::

    gate_proj / up_proj   A = M1^T / M2^T   [R, d]          B = [0 ; I_R]  [d_ff + R, R]
    down_proj             A = [0 | I_R]     [R, d_ff + R]   B = M3^T       [d, R]

so ``gate_proj`` of the padded model plus its delta has M1^T in its last R rows, and so on: exactly
the widened FFN ``FFN(u) + M3 (act(M1 u) * (M2 u))``. Merging a path writes the same rows / columns
into the padded weights (:func:`merge_ffn`).

LoRA memories (``lora_qk``, ``lora_ov``, ``lora_ffn``): memlm adds ``alpha * (x A) B`` (A ``[i, r]``,
B ``[r, o]``), which is PEFT's LoRA with ``lora_A = A^T``, ``lora_B = B^T`` and ``lora_alpha = alpha * r``,
on the anchor itself (no padding). KV-memories have no LoRA form.

Everything here is numpy on one memory layer's arrays; no model code.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

# memlm FFN parameter -> the role of its HF projection
FFN_ROLES = {"w1": "gate", "w2": "up", "w3": "down"}

# LoRA memory type -> (memlm A array, memlm B array, memlm anchor parameter it adapts)
LORA_PAIRS: dict[str, tuple[tuple[str, str, str], ...]] = {
    "lora_qk": (("q_a", "q_b", "wq"), ("k_a", "k_b", "wk")),
    "lora_ov": (("v_a", "v_b", "wv"), ("o_a", "o_b", "wo")),
    "lora_ffn": (("w1_a", "w1_b", "w1"), ("w2_a", "w2_b", "w2"), ("w3_a", "w3_b", "w3")),
}


class LoRAFormError(ValueError):
    """A memory type that no LoRA adapter expresses."""


def check_lora_form(memory_type: str) -> None:
    """Fail in one line for a memory type without a LoRA form."""
    if memory_type == "kv":
        raise LoRAFormError("kv memory has no LoRA form (its slots add an attention of their own, not a weight delta)")
    if memory_type != "ffn" and memory_type not in LORA_PAIRS:
        raise LoRAFormError(f"memory.type = {memory_type!r} has no LoRA form")


def pad_rows(w: np.ndarray, rows: np.ndarray | int, axis: int) -> np.ndarray:
    """``w`` with extra entries along ``axis``: zeros (an int count) or the given array."""
    if isinstance(rows, int | np.integer):
        shape = list(w.shape)
        shape[axis] = int(rows)
        rows = np.zeros(shape, w.dtype)
    return np.concatenate([w, np.asarray(rows).astype(w.dtype)], axis=axis)


def pad_ffn(role: str, w: np.ndarray, r: int) -> np.ndarray:
    """An HF FFN weight (``gate`` / ``up`` ``[d_ff, d]``, ``down`` ``[d, d_ff]``) with R zero hidden units."""
    return pad_rows(w, r, axis=1 if role == "down" else 0)


def merge_ffn(role: str, w: np.ndarray, block: np.ndarray) -> np.ndarray:
    """An HF FFN weight with a layer's memory block as R more hidden units (memlm ``w1``/``w2`` ``[d, R]``,
    ``w3`` ``[R, d]``): gate / up get ``block^T`` as rows, down gets ``block^T`` as columns."""
    return pad_rows(w, np.asarray(block).T, axis=1 if role == "down" else 0)


def ffn_lora(role: str, block: np.ndarray, d_ff: int) -> tuple[np.ndarray, np.ndarray]:
    """PEFT ``(lora_A [R, in], lora_B [out, R])`` of one FFN projection of the padded model (scale 1)."""
    block = np.asarray(block)
    if role == "down":
        r = block.shape[0]
        a = np.concatenate([np.zeros((r, d_ff), block.dtype), np.eye(r, dtype=block.dtype)], axis=1)
        return a, np.ascontiguousarray(block.T)
    r = block.shape[1]
    b = np.concatenate([np.zeros((d_ff, r), block.dtype), np.eye(r, dtype=block.dtype)], axis=0)
    return np.ascontiguousarray(block.T), b


def lora_delta(a: np.ndarray, b: np.ndarray, scaling: float = 1.0) -> np.ndarray:
    """PEFT's weight delta ``B @ A * scaling`` (HF ``[out, in]``), in float64."""
    return np.asarray(b, np.float64) @ np.asarray(a, np.float64) * scaling


def memlm_lora(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """PEFT ``(lora_A, lora_B)`` of memlm's ``x A B`` (A ``[i..., r]``, B ``[r, o...]``, heads flattened)."""
    a = np.asarray(a)
    b = np.asarray(b)
    r = a.shape[-1]
    return np.ascontiguousarray(a.reshape(-1, r).T), np.ascontiguousarray(b.reshape(r, -1).T)


def lora_alpha(memory_type: str, r: int, alpha: float) -> float:
    """PEFT ``lora_alpha`` for rank r: the scale ``lora_alpha / r`` is 1 for FFN-memory, memlm's alpha else."""
    return float(r) if memory_type == "ffn" else float(alpha) * r


def layer_tensors(memory_type: str, mem: Mapping[str, np.ndarray], j: int, d_ff: int,
                  modules: Mapping[str, str]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """HF module -> ``(lora_A, lora_B)`` of memory layer ``j`` (``mem[name]`` is ``[L_mem, *block]``).

    ``modules``: memlm anchor parameter (``w1``, ``wq``, ...) -> the HF module path of this layer."""
    if memory_type == "ffn":
        return {modules[p]: ffn_lora(role, mem[p][j], d_ff) for p, role in FFN_ROLES.items()}
    return {modules[target]: memlm_lora(mem[a][j], mem[b][j]) for a, b, target in LORA_PAIRS[memory_type]}


def targets(memory_type: str) -> tuple[str, ...]:
    """The memlm anchor parameters a memory type's adapter changes."""
    if memory_type == "ffn":
        return tuple(FFN_ROLES)
    return tuple(t for _, _, t in LORA_PAIRS[memory_type])
