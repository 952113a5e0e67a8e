"""Checkpoint conversion between Hugging Face and memlm, and export of a run's memory bank.

- ``memlm convert --from-hf HF_DIR --out RUN_DIR``: an HF folder (Llama 3.x, Qwen2 / Qwen2.5,
  Qwen3, Gemma 3 text, Gemma 2) becomes an ordinary memlm run directory (:mod:`memlm.convert.run`).
- ``memlm convert --to-hf RUN_DIR --out HF_DIR``: the run's anchor as an HF folder.
- ``memlm export RUN_DIR --out DIR``: the bank and generic memory as plain zarr3 arrays plus
  a metadata JSON (:mod:`memlm.convert.export`).

One module per family holds its declarative tensor map and config mapping.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from memlm.convert import gemma2, gemma3, llama, qwen2, qwen3
from memlm.convert.hf_config import ConvertError, Family

FAMILIES: tuple[Family, ...] = (llama.FAMILY, qwen2.FAMILY, qwen3.FAMILY, gemma3.FAMILY, gemma2.FAMILY)


def family_named(name: str) -> Family:
    for f in FAMILIES:
        if f.name == name:
            return f
    raise ConvertError(f"unknown family {name!r}; choose one of {', '.join(f.name for f in FAMILIES)}")


def family_of_hf(hf: Mapping[str, Any]) -> Family:
    """The family of an HF ``config.json`` (by ``model_type``)."""
    mt = hf.get("model_type")
    for f in FAMILIES:
        if mt in f.model_types:
            return f
    if mt == "gemma3" and "text_config" in hf:
        raise ConvertError("config.json is a multimodal Gemma 3 (model_type 'gemma3'): memlm converts the text-only "
                           "Gemma3ForCausalLM checkpoints (model_type 'gemma3_text')")
    known = ", ".join(t for f in FAMILIES for t in f.model_types)
    raise ConvertError(f"config.json field 'model_type' = {mt!r}: memlm converts {known}")


def family_for_model(m: Mapping[str, Any]) -> Family:
    """The first family that can express these memlm model settings; else fail naming what none can."""
    misses = {f.name: f.unsupported(m) for f in FAMILIES}
    for f in FAMILIES:
        if not misses[f.name]:
            return f
    common = [x for x in misses[FAMILIES[0].name] if all(x in v for v in misses.values())]
    if common:
        raise ConvertError(f"{' and '.join(common)} {'has' if len(common) == 1 else 'have'} no Hugging Face "
                           f"equivalent (the {', '.join(f.title for f in FAMILIES)} formats cannot express "
                           f"{'it' if len(common) == 1 else 'them'})")
    best = min(FAMILIES, key=lambda f: len(misses[f.name]))
    raise ConvertError(f"no Hugging Face family expresses this anchor; the closest, {best.title}, cannot express "
                       f"{', '.join(misses[best.name])}")


__all__ = ["FAMILIES", "ConvertError", "Family", "family_for_model", "family_named", "family_of_hf"]
