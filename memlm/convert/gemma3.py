"""Gemma 3 (text): RMSNorm with (1 + w) gains, four norms per block (pre / post attention, pre /
post FFN), per-head QK-norm, embeddings scaled by sqrt(d), GeGLU (tanh GELU), local sliding-window
layers with their own RoPE base between global ones, a query pre-attention scalar and an optional
final-logit soft-cap. (Its config also carries ``attn_logit_softcapping``, which the reference
Gemma 3 model does not apply; memlm reads it the same way: no attention soft-cap.)"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from memlm.convert import llama
from memlm.convert.hf_config import (
    ConvertError,
    Family,
    as_model_keys,
    decoder_config,
    decoder_keys,
    rope_keys,
    rope_out,
    rope_parameters,
)
from memlm.convert.mapping import Linear, TensorMap, untied

LAYER = llama.LAYER

TENSORS = (
    TensorMap("embed", "model.embed_tokens.weight"),
    TensorMap("attn_norm", LAYER + "input_layernorm.weight"),
    TensorMap("wq", LAYER + "self_attn.q_proj.weight", Linear(("d",), ("h", "dh"))),
    TensorMap("wk", LAYER + "self_attn.k_proj.weight", Linear(("d",), ("kv", "dh"))),
    TensorMap("wv", LAYER + "self_attn.v_proj.weight", Linear(("d",), ("kv", "dh"))),
    TensorMap("q_norm", LAYER + "self_attn.q_norm.weight"),
    TensorMap("k_norm", LAYER + "self_attn.k_norm.weight"),
    TensorMap("wo", LAYER + "self_attn.o_proj.weight", Linear(("h", "dh"), ("d",))),
    TensorMap("post_attn_norm", LAYER + "post_attention_layernorm.weight"),
    TensorMap("ffn_norm", LAYER + "pre_feedforward_layernorm.weight"),
    TensorMap("w1", LAYER + "mlp.gate_proj.weight", Linear(("d",), ("f",))),
    TensorMap("w2", LAYER + "mlp.up_proj.weight", Linear(("d",), ("f",))),
    TensorMap("w3", LAYER + "mlp.down_proj.weight", Linear(("f",), ("d",))),
    TensorMap("post_ffn_norm", LAYER + "post_feedforward_layernorm.weight"),
    TensorMap("final_norm", "model.norm.weight"),
    TensorMap("head", "lm_head.weight", Linear(("d",), ("V",)), when=untied),
)

FIXED = dict(norm="rmsnorm", norm_offset=True, qk_norm="head", qkv_bias=False, embed_scale=True,
             post_norms=True, attn_softcap=0.0)


def _layer_types(hf: Mapping[str, Any], n: int) -> list[str]:
    types = hf.get("layer_types")
    if types:
        return list(types)
    pattern = int(hf.get("sliding_window_pattern", 6))  # the older field: every pattern-th layer is global
    return ["sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(n)]


def read_config(hf: Mapping[str, Any]) -> dict[str, Any]:
    llama.reject_biases(hf, "gemma3")
    if hf.get("use_bidirectional_attention"):
        raise ConvertError("gemma3 config field 'use_bidirectional_attention' = true: memlm anchors are causal LMs")
    out = decoder_keys(hf, "gemma3", tie_default=True, head_dim_default=256, act_key="hidden_activation")
    out.update(as_model_keys(FIXED))
    n = out["n_layers"]
    types = _layer_types(hf, n)
    unknown = sorted(set(types) - {"full_attention", "sliding_attention"})
    if unknown or len(types) != n:
        raise ConvertError(f"gemma3 config field 'layer_types' = {types}: expected {n} entries of "
                           "full_attention / sliding_attention")
    local = tuple(i for i, t in enumerate(types) if t == "sliding_attention")
    out.update(rope_keys(rope_parameters(hf, "full_attention", 1_000_000.0), "rope_parameters.full_attention"))
    local_rope = rope_parameters(hf, "sliding_attention", 10_000.0, legacy_theta_key="rope_local_base_freq")
    if local_rope["rope_type"] != "default":
        raise ConvertError(f"gemma3 config field rope_parameters.sliding_attention.rope_type = "
                           f"{local_rope['rope_type']!r}: memlm's local layers use unscaled RoPE")
    out.update(local_layers=local, sliding_window=int(hf.get("sliding_window") or 0) if local else 0,
               rope_local_base=float(local_rope["rope_theta"]) if local else 0.0,
               query_pre_attn_scalar=float(hf.get("query_pre_attn_scalar", 256)),
               final_softcap=float(hf.get("final_logit_softcapping") or 0.0))
    if local and not out["sliding_window"]:
        raise ConvertError("gemma3 config: sliding_attention layers but no 'sliding_window'")
    return out


def _number(x: float) -> int | float:
    """An integral value as an int (HF declares the field an int), else the float."""
    return int(x) if float(x).is_integer() else float(x)


def write_config(m: Mapping[str, Any]) -> dict[str, Any]:
    n, local = int(m["n_layers"]), tuple(m["local_layers"])
    theta, scaling = rope_out(m)
    extra = {
        "hidden_activation": decoder_config(m, FAMILY)["hidden_act"],
        "layer_types": ["sliding_attention" if i in local else "full_attention" for i in range(n)],
        "sliding_window": int(m["sliding_window"]) if local else None,
        "rope_local_base_freq": float(m["rope_local_base"] or theta),
        "query_pre_attn_scalar": _number(m["query_pre_attn_scalar"] or m["head_dim"]),
        "final_logit_softcapping": float(m["final_softcap"]) if m["final_softcap"] else None,
    }
    out = decoder_config(m, FAMILY, extra)
    del out["hidden_act"]
    return out


FAMILY = Family(name="gemma3", title="Gemma 3", model_types=("gemma3_text",), architecture="Gemma3ForCausalLM",
                tensors=TENSORS, read_config=read_config, write_config=write_config, fixed=FIXED)
