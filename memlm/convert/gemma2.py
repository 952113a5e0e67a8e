"""Gemma 2: Gemma 3's block without QK-norm, one RoPE base for every layer, local sliding-window
layers alternating with global ones, and tanh soft-capping of the attention scores and the final
logits (``attn_logit_softcapping``, ``final_logit_softcapping``)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from memlm.convert import gemma3, llama
from memlm.convert.hf_config import (
    ConvertError,
    Family,
    as_model_keys,
    decoder_config,
    decoder_keys,
    rope_keys,
    rope_parameters,
)

TENSORS = tuple(t for t in gemma3.TENSORS if t.param not in ("q_norm", "k_norm"))

FIXED = dict(norm="rmsnorm", norm_offset=True, qk_norm=False, qkv_bias=False, embed_scale=True, post_norms=True,
             rope_local_base=0.0)


def read_config(hf: Mapping[str, Any]) -> dict[str, Any]:
    llama.reject_biases(hf, "gemma2")
    if hf.get("use_bidirectional_attention"):
        raise ConvertError("gemma2 config field 'use_bidirectional_attention' = true: memlm anchors are causal LMs")
    out = decoder_keys(hf, "gemma2", tie_default=True, head_dim_default=256, act_key="hidden_activation")
    out.update(as_model_keys(FIXED))
    n = out["n_layers"]
    types = hf.get("layer_types") or ["sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(n)]
    if sorted(set(types) - {"full_attention", "sliding_attention"}) or len(types) != n:
        raise ConvertError(f"gemma2 config field 'layer_types' = {types}: expected {n} entries of "
                           "full_attention / sliding_attention")
    local = tuple(i for i, t in enumerate(types) if t == "sliding_attention")
    out.update(rope_keys(rope_parameters(hf), "rope_parameters"))
    out.update(local_layers=local, sliding_window=int(hf.get("sliding_window") or 0) if local else 0,
               query_pre_attn_scalar=float(hf.get("query_pre_attn_scalar", 256)),
               attn_softcap=float(hf.get("attn_logit_softcapping") or 0.0),
               final_softcap=float(hf.get("final_logit_softcapping") or 0.0))
    if local and not out["sliding_window"]:
        raise ConvertError("gemma2 config: sliding_attention layers but no 'sliding_window'")
    return out


def write_config(m: Mapping[str, Any]) -> dict[str, Any]:
    n, local = int(m["n_layers"]), tuple(m["local_layers"])
    extra = {
        "hidden_activation": decoder_config(m, FAMILY)["hidden_act"],
        "layer_types": ["sliding_attention" if i in local else "full_attention" for i in range(n)],
        "sliding_window": int(m["sliding_window"]) if local else None,
        "query_pre_attn_scalar": gemma3._number(m["query_pre_attn_scalar"] or m["head_dim"]),
        "attn_logit_softcapping": float(m["attn_softcap"]) if m["attn_softcap"] else None,
        "final_logit_softcapping": float(m["final_softcap"]) if m["final_softcap"] else None,
    }
    out = decoder_config(m, FAMILY, extra)
    del out["hidden_act"]
    return out


FAMILY = Family(name="gemma2", title="Gemma 2", model_types=("gemma2",), architecture="Gemma2ForCausalLM",
                tensors=TENSORS, read_config=read_config, write_config=write_config, fixed=FIXED)
