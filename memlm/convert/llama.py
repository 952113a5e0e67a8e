"""Llama (3.x): RMSNorm, SwiGLU, no biases, no QK-norm, RoPE with optional llama3 / linear scaling."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from memlm.convert.hf_config import (
    ConvertError,
    Family,
    as_model_keys,
    decoder_config,
    decoder_keys,
    rope_keys,
    rope_parameters,
)
from memlm.convert.mapping import Linear, TensorMap, untied

LAYER = "model.layers.{i}."

TENSORS = (
    TensorMap("embed", "model.embed_tokens.weight"),
    TensorMap("attn_norm", LAYER + "input_layernorm.weight"),
    TensorMap("wq", LAYER + "self_attn.q_proj.weight", Linear(("d",), ("h", "dh"))),
    TensorMap("wk", LAYER + "self_attn.k_proj.weight", Linear(("d",), ("kv", "dh"))),
    TensorMap("wv", LAYER + "self_attn.v_proj.weight", Linear(("d",), ("kv", "dh"))),
    TensorMap("wo", LAYER + "self_attn.o_proj.weight", Linear(("h", "dh"), ("d",))),
    TensorMap("ffn_norm", LAYER + "post_attention_layernorm.weight"),  # Llama's name for the pre-FFN norm
    TensorMap("w1", LAYER + "mlp.gate_proj.weight", Linear(("d",), ("f",))),
    TensorMap("w2", LAYER + "mlp.up_proj.weight", Linear(("d",), ("f",))),
    TensorMap("w3", LAYER + "mlp.down_proj.weight", Linear(("f",), ("d",))),
    TensorMap("final_norm", "model.norm.weight"),
    TensorMap("head", "lm_head.weight", Linear(("d",), ("V",)), when=untied),
)

# What a plain Llama block is, in memlm keys (every other family changes a few of these).
PLAIN = dict(norm="rmsnorm", norm_offset=False, qk_norm=False, qkv_bias=False, embed_scale=False, post_norms=False,
             local_layers=(), query_pre_attn_scalar=0.0, attn_softcap=0.0, final_softcap=0.0, rope_local_base=0.0)


def reject_biases(hf: Mapping[str, Any], what: str) -> None:
    """Output-projection and FFN biases have no memlm equivalent (memlm has q / k / v biases only)."""
    if hf.get("attention_bias"):
        raise ConvertError(f"{what} config field 'attention_bias' = true puts a bias on the attention output "
                           "projection too: memlm has q / k / v biases only")
    if hf.get("mlp_bias"):
        raise ConvertError(f"{what} config field 'mlp_bias' = true: memlm's FFN has no biases")


def read_config(hf: Mapping[str, Any]) -> dict[str, Any]:
    reject_biases(hf, "llama")
    if hf.get("layer_types") and set(hf["layer_types"]) != {"full_attention"}:
        raise ConvertError(f"llama config field 'layer_types' = {sorted(set(hf['layer_types']))}: "
                           "memlm reads Llama with full attention in every layer")
    out = decoder_keys(hf, "llama", tie_default=False)
    out.update(as_model_keys(PLAIN))
    out.update(rope_keys(rope_parameters(hf), "rope_parameters"))
    return out


def write_config(m: Mapping[str, Any]) -> dict[str, Any]:
    return decoder_config(m, FAMILY, {"mlp_bias": False, "pretraining_tp": 1})


FAMILY = Family(name="llama", title="Llama", model_types=("llama",), architecture="LlamaForCausalLM",
                tensors=TENSORS, read_config=read_config, write_config=write_config, fixed=PLAIN)
