"""The Hugging Face config <-> memlm ``model`` section mapping shared by the families.

A family (``llama.py``, ``qwen2.py``, ``qwen3.py``, ``gemma3.py``) declares its tensor map, how
its HF ``config.json`` reads into memlm model keys and back, and which memlm architecture
options it can express (``fixed``: the value a key must have for the family). Reading accepts
both config formats found on the Hub: the older ``rope_theta`` / ``rope_scaling`` fields and the
newer ``rope_parameters`` (flat, or per layer type). Writing produces the older fields, which
every transformers version reads. An HF option memlm cannot run (a RoPE type other than
default / linear / llama3, output-projection biases, bidirectional attention...) fails naming
the field, never silently.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

from memlm.convert.mapping import TensorMap


class ConvertError(ValueError):
    """A checkpoint or run cannot be converted; the message names the field and why."""


# memlm model keys that describe the architecture (shapes and math); the rest are runtime choices.
ARCH_KEYS = ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim", "d_ff", "tied_embeddings",
             "norm", "qk_norm", "norm_eps", "rope_base", "norm_offset", "qk_norm_scope", "qkv_bias", "embed_scale",
             "ffn_activation", "post_norms", "sliding_window", "local_layers", "rope_local_base", "rope_scaling",
             "rope_scaling_factor", "rope_low_freq_factor", "rope_high_freq_factor", "rope_original_max_len",
             "query_pre_attn_scalar", "attn_softcap", "final_softcap")

# What each architecture option is, for error messages.
FEATURES = {
    "norm": {"layernorm": "memlm's gain-only LayerNorm"},
    "qk_norm": {"full": "QK-norm over the full query / key width", "head": "per-head QK-norm over head_dim",
                False: "no QK-norm"},
    "norm_offset": {True: "(1 + w) norm gains", False: "plain norm gains"},
    "qkv_bias": {True: "q / k / v biases", False: "no q / k / v biases"},
    "embed_scale": {True: "embeddings scaled by sqrt(d)", False: "unscaled embeddings"},
    "post_norms": {True: "post-attention / post-FFN norms", False: "no post-attention / post-FFN norms"},
    "local_layers": {},
    "attn_softcap": {},
    "final_softcap": {},
    "query_pre_attn_scalar": {},
    "rope_local_base": {},
}

_ACTIVATIONS_IN = {"silu": "silu", "swish": "silu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh",
                   "gelu": "gelu"}
_ACTIVATIONS_OUT = {"silu": "silu", "gelu_tanh": "gelu_pytorch_tanh", "gelu": "gelu"}


@dataclasses.dataclass(frozen=True)
class Family:
    """One HF model family: names, tensor map, config mapping and what it can represent."""

    name: str
    title: str
    model_types: tuple[str, ...]
    architecture: str  # the HF class written into config.json "architectures"
    tensors: tuple[TensorMap, ...]
    read_config: Callable[[Mapping[str, Any]], dict[str, Any]]  # HF config -> memlm model keys
    write_config: Callable[[Mapping[str, Any]], dict[str, Any]]  # memlm model keys -> HF config
    fixed: Mapping[str, Any]  # memlm model key -> the only value this family can express
    # (``qk_norm`` is compared as False / "full" / "head": off, or on with its scope)
    check: Callable[[Mapping[str, Any]], list[str]] = lambda m: []  # further limits (e.g. window layouts)

    def unsupported(self, m: Mapping[str, Any]) -> list[str]:
        """The memlm model settings (``"key = value"``) this family cannot express."""
        m = {**m, "qk_norm": m.get("qk_norm_scope", "full") if m.get("qk_norm") else False}
        out = []
        for key, want in self.fixed.items():
            have = _normal(m, key)
            if have != _normal({**m, key: want}, key):
                out.append(describe(key, m.get(key)))
        return out + self.check(m)


def as_model_keys(fixed: Mapping[str, Any]) -> dict[str, Any]:
    """A family's ``fixed`` settings as memlm model keys (``qk_norm`` split into the flag and its scope)."""
    out = dict(fixed)
    if "qk_norm" in out:
        scope = out.pop("qk_norm")
        out.update(qk_norm=bool(scope), qk_norm_scope=scope or "full")
    return out


def _normal(m: Mapping[str, Any], key: str) -> Any:
    """A setting with the values that mean the same thing merged (so ``fixed`` compares meanings)."""
    v = m.get(key)
    if key == "query_pre_attn_scalar" and v in (0, 0.0, m.get("head_dim")):
        return 0.0  # the default scale 1/sqrt(head_dim)
    if key == "rope_local_base" and (not m.get("local_layers") or v in (0, 0.0, m.get("rope_base"))):
        return 0.0
    if key == "local_layers":
        return tuple(v or ())
    return v


def describe(key: str, value: Any) -> str:
    """``model.key = value (what it is)`` for messages."""
    if key == "qk_norm" and value in ("full", "head"):
        return f"model.qk_norm_scope = {value!r} ({FEATURES['qk_norm'][value]})"
    what = FEATURES.get(key, {}).get(value if not isinstance(value, list) else tuple(value))
    shown = tuple(value) if isinstance(value, list) else value
    return f"model.{key} = {shown!r}" + (f" ({what})" if what else "")


def get(hf: Mapping[str, Any], key: str, family: str, default: Any = ...) -> Any:
    """A config field; a missing required one fails naming it."""
    if key in hf and hf[key] is not None:
        return hf[key]
    if default is ...:
        raise ConvertError(f"{family} config.json has no field {key!r}")
    return default


def activation_in(name: str, key: str) -> str:
    if name not in _ACTIVATIONS_IN:
        raise ConvertError(f"config field {key!r} = {name!r}: memlm supports {', '.join(sorted(_ACTIVATIONS_IN))}")
    return _ACTIVATIONS_IN[name]


def activation_out(name: str) -> str:
    return _ACTIVATIONS_OUT[name]


def rope_parameters(hf: Mapping[str, Any], layer_type: str | None = None, default_theta: float = 10_000.0,
                    legacy_theta_key: str = "rope_theta") -> dict[str, Any]:
    """One layer type's RoPE parameters (``rope_type``, ``rope_theta``, scaling fields) from either format."""
    rp = hf.get("rope_parameters")
    params: dict[str, Any] = {}
    if isinstance(rp, Mapping):
        if layer_type is not None and isinstance(rp.get(layer_type), Mapping):
            params = dict(rp[layer_type])
        elif "rope_type" in rp or "rope_theta" in rp or "type" in rp:
            params = dict(rp)
    legacy = hf.get("rope_scaling")
    if isinstance(legacy, Mapping) and layer_type in (None, "full_attention"):
        params = {**dict(legacy), **params}
    if "rope_theta" not in params:
        params["rope_theta"] = hf.get(legacy_theta_key) or default_theta
    params["rope_type"] = params.get("rope_type", params.get("type", "default"))
    return params


def rope_keys(params: Mapping[str, Any], where: str) -> dict[str, Any]:
    """memlm ``rope_*`` keys of one RoPE parameter set (the global layers')."""
    kind = params["rope_type"]
    if float(params.get("partial_rotary_factor", 1.0)) != 1.0:
        raise ConvertError(f"config field {where}.partial_rotary_factor = {params['partial_rotary_factor']}: "
                           "memlm rotates the whole head dimension")
    out: dict[str, Any] = dict(rope_base=float(params["rope_theta"]), rope_scaling="none")
    if kind == "default":
        return out
    if kind == "linear":
        return {**out, "rope_scaling": "linear", "rope_scaling_factor": float(params["factor"])}
    if kind == "llama3":
        return {**out, "rope_scaling": "llama3", "rope_scaling_factor": float(params["factor"]),
                "rope_low_freq_factor": float(params["low_freq_factor"]),
                "rope_high_freq_factor": float(params["high_freq_factor"]),
                "rope_original_max_len": int(params["original_max_position_embeddings"])}
    raise ConvertError(f"config field {where}.rope_type = {kind!r}: memlm supports default, linear and llama3 RoPE")


def rope_out(m: Mapping[str, Any]) -> tuple[float, dict[str, Any] | None]:
    """(``rope_theta``, ``rope_scaling``) of the memlm keys, in the older config format."""
    if m["rope_scaling"] == "none":
        return float(m["rope_base"]), None
    if m["rope_scaling"] == "linear":
        return float(m["rope_base"]), {"rope_type": "linear", "factor": float(m["rope_scaling_factor"])}
    return float(m["rope_base"]), {"rope_type": "llama3", "factor": float(m["rope_scaling_factor"]),
                                   "low_freq_factor": float(m["rope_low_freq_factor"]),
                                   "high_freq_factor": float(m["rope_high_freq_factor"]),
                                   "original_max_position_embeddings": int(m["rope_original_max_len"])}


def decoder_keys(hf: Mapping[str, Any], family: str, tie_default: bool, head_dim_default: int | None = None,
                 act_key: str = "hidden_act") -> dict[str, Any]:
    """The memlm keys every decoder family shares (sizes, RMSNorm, tying, activation, context length)."""
    d = int(get(hf, "hidden_size", family))
    heads = int(get(hf, "num_attention_heads", family))
    head_dim = hf.get("head_dim") or head_dim_default or d // heads
    act = hf.get(act_key) or hf.get("hidden_act") or hf.get("hidden_activation") or "silu"
    return dict(
        vocab_size=int(get(hf, "vocab_size", family)), d_model=d, n_layers=int(get(hf, "num_hidden_layers", family)),
        n_heads=heads, n_kv_heads=int(hf.get("num_key_value_heads") or heads), head_dim=int(head_dim),
        d_ff=int(get(hf, "intermediate_size", family)),
        tied_embeddings=bool(hf.get("tie_word_embeddings", tie_default)), norm="rmsnorm", qk_norm=False,
        norm_eps=float(get(hf, "rms_norm_eps", family, 1e-6)), ffn_activation=activation_in(act, act_key),
        max_seq_len=int(get(hf, "max_position_embeddings", family, 2048)),
    )


def decoder_config(m: Mapping[str, Any], family: Family, extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The HF config fields every decoder family shares, from memlm model keys (``m``)."""
    theta, scaling = rope_out(m)
    out = {
        "architectures": [family.architecture], "model_type": family.model_types[0],
        "vocab_size": int(m["vocab_size"]), "hidden_size": int(m["d_model"]),
        "intermediate_size": int(m["d_ff"]), "num_hidden_layers": int(m["n_layers"]),
        "num_attention_heads": int(m["n_heads"]), "num_key_value_heads": int(m["n_kv_heads"] or m["n_heads"]),
        "head_dim": int(m["head_dim"]), "hidden_act": activation_out(m["ffn_activation"]),
        "max_position_embeddings": int(m["max_seq_len"]), "rms_norm_eps": float(m["norm_eps"]),
        "rope_theta": theta, "rope_scaling": scaling, "tie_word_embeddings": bool(m["tied_embeddings"]),
        "attention_bias": False, "attention_dropout": 0.0, "initializer_range": float(m.get("init_std", 0.02)),
        "use_cache": True,
    }
    out.update(extra or {})
    return out


def sliding_layers_in(hf: Mapping[str, Any], family: str) -> dict[str, Any]:
    """Qwen-style sliding windows: ``layer_types``, or ``use_sliding_window`` from ``max_window_layers`` on."""
    n = int(get(hf, "num_hidden_layers", family))
    types = hf.get("layer_types")
    if types:
        unknown = sorted(set(types) - {"full_attention", "sliding_attention"})
        if unknown:
            raise ConvertError(f"config field 'layer_types' holds {unknown[0]!r}: memlm runs full_attention and "
                               "sliding_attention layers")
        local = tuple(i for i, t in enumerate(types) if t == "sliding_attention")
    elif hf.get("use_sliding_window") and hf.get("sliding_window"):
        local = tuple(range(int(hf.get("max_window_layers", n)), n))
    else:
        local = ()
    if local and not hf.get("sliding_window"):
        raise ConvertError("config field 'layer_types' names sliding_attention layers but 'sliding_window' is unset")
    return dict(local_layers=local, sliding_window=int(hf.get("sliding_window") or 0) if local else 0)


def sliding_layers_out(m: Mapping[str, Any]) -> dict[str, Any]:
    """``layer_types`` plus the older ``use_sliding_window`` / ``max_window_layers`` (Qwen) fields."""
    n, local = int(m["n_layers"]), tuple(m["local_layers"])
    types = ["sliding_attention" if i in local else "full_attention" for i in range(n)]
    out: dict[str, Any] = {"layer_types": types, "use_sliding_window": bool(local),
                           "sliding_window": int(m["sliding_window"]) if local else None,
                           "max_window_layers": min(local) if local else n}
    return out


def suffix_window_check(m: Mapping[str, Any]) -> list[str]:
    """Qwen's older configs express sliding windows only on the last layers (``max_window_layers`` on)."""
    local = tuple(m.get("local_layers") or ())
    if local and local != tuple(range(min(local), int(m["n_layers"]))):
        return [f"model.local_layers = {local} (Qwen sliding windows cover the last layers only)"]
    return []
