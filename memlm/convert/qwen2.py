"""Qwen2 / Qwen2.5: the Llama block with biases on the q / k / v projections; optional sliding
windows on the last layers (``use_sliding_window`` from ``max_window_layers`` on, or ``layer_types``)."""

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
from memlm.convert.mapping import Split, TensorMap

TENSORS = llama.TENSORS + (
    TensorMap("bq", llama.LAYER + "self_attn.q_proj.bias", Split(("h", "dh"))),
    TensorMap("bk", llama.LAYER + "self_attn.k_proj.bias", Split(("kv", "dh"))),
    TensorMap("bv", llama.LAYER + "self_attn.v_proj.bias", Split(("kv", "dh"))),
)

FIXED = {**llama.PLAIN, "qkv_bias": True}
del FIXED["local_layers"]  # sliding windows are expressible (on the last layers: see the check)


def read_config(hf: Mapping[str, Any]) -> dict[str, Any]:
    out = decoder_keys(hf, "qwen2", tie_default=False)
    out.update(as_model_keys(FIXED))
    out.update(sliding_layers_in(hf, "qwen2"))
    out.update(rope_keys(rope_parameters(hf), "rope_parameters"))
    return out


def write_config(m: Mapping[str, Any]) -> dict[str, Any]:
    return decoder_config(m, FAMILY, sliding_layers_out(m))


FAMILY = Family(name="qwen2", title="Qwen2", model_types=("qwen2",), architecture="Qwen2ForCausalLM",
                tensors=TENSORS, read_config=read_config, write_config=write_config, fixed=FIXED,
                check=suffix_window_check)
