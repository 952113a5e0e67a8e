"""Qwen3 (dense): the Llama block with per-head RMS QK-norm over head_dim and an explicit head_dim."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from memlm.convert import llama
from memlm.convert.hf_config import (
    Family,
    as_model_keys,
    decoder_config,
    decoder_keys,
    rope_keys,
    rope_parameters,
    sliding_layers_in,
    sliding_layers_out,
    suffix_window_check,
)
from memlm.convert.mapping import TensorMap

TENSORS = llama.TENSORS + (
    TensorMap("q_norm", llama.LAYER + "self_attn.q_norm.weight"),
    TensorMap("k_norm", llama.LAYER + "self_attn.k_norm.weight"),
)

FIXED = {**llama.PLAIN, "qk_norm": "head"}
del FIXED["local_layers"]


def read_config(hf: Mapping[str, Any]) -> dict[str, Any]:
    llama.reject_biases(hf, "qwen3")
    out = decoder_keys(hf, "qwen3", tie_default=False, head_dim_default=128)
    out.update(as_model_keys(FIXED))
    out.update(sliding_layers_in(hf, "qwen3"))
    out.update(rope_keys(rope_parameters(hf), "rope_parameters"))
    return out


def write_config(m: Mapping[str, Any]) -> dict[str, Any]:
    return decoder_config(m, FAMILY, sliding_layers_out(m))


FAMILY = Family(name="qwen3", title="Qwen3", model_types=("qwen3",), architecture="Qwen3ForCausalLM",
                tensors=TENSORS, read_config=read_config, write_config=write_config, fixed=FIXED,
                check=suffix_window_check)
