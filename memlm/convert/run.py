"""``memlm convert``: a Hugging Face folder <-> a memlm run directory.

``from_hf`` writes an ordinary run directory, so ``memlm eval``, ``memlm generate`` and
``memlm train --init-from`` work on it::

    RUN_DIR/config.json          {"config": <memlm config>, "data_dir": RUN_DIR/hf, "init_from": null,
                                  "converted_from": HF_DIR}
    RUN_DIR/checkpoints/0/       orbax: "params" (the anchor) and "meta"
    RUN_DIR/hf/                  the HF folder's own files except the weights (config.json,
                                 generation_config.json, tokenizer.json, tokenizer_config.json, ...),
                                 conversion.json (family, each tensor's name, dtype and shape) and
                                 manifest.json (this folder as a tokenizer-only data directory)

The run's config matches the checkpoint's architecture, its ``data.tokenizer`` names
``RUN_DIR/hf/tokenizer.json``, and ``--config RUN_DIR`` (or ``RUN_DIR/config.json``) loads it for
``memlm prepare`` / ``memlm train`` (memory, tree and train keys overridden as usual).
Parameters keep the checkpoint's dtype (bfloat16 stays bfloat16; float16 becomes float32, which
holds it exactly); ``to_hf`` writes every tensor back in its original dtype and the original
``config.json`` byte for byte, so HF -> memlm -> HF is bit-exact. A run that did not come from HF
(or changed its architecture) gets a config.json written by its family's mapping.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import ml_collections
import numpy as np

from memlm.config import ConfigError, apply_overrides, default_config, validate
from memlm.convert import family_for_model, family_named, family_of_hf
from memlm.convert.hf_config import ARCH_KEYS, ConvertError, Family
from memlm.convert.mapping import active, hf_shape, to_memlm
from memlm.convert.safetensors import (
    DEFAULT_MAX_SHARD_BYTES,
    DTYPES,
    Checkpoint,
    SafetensorsError,
    dtype_code,
    iter_weight_files,
    write_checkpoint,
)
from memlm.data.tokenizer import Tokenizer
from memlm.model.anchor import AnchorSpec

HF_SUBDIR = "hf"
RECORD = "conversion.json"
RECORD_FORMAT = "memlm-hf-conversion"
TIED_HEAD = "lm_head.weight"  # some tied checkpoints also store the head (a copy of the embedding)
IGNORED = re.compile(r"(^|\.)rotary_emb\.inv_freq$")  # a buffer older Llama checkpoints saved
_FLOATS = {"F32", "F16", "BF16", "F64"}


def _model_keys(m: Mapping[str, Any]) -> dict[str, Any]:
    """The architecture keys of a model section, lists as tuples (so JSON round trips compare equal)."""
    return {k: tuple(m[k]) if isinstance(m.get(k), list | tuple) else m.get(k) for k in ARCH_KEYS}


def _arch_of_hf(family: Family, hf: Mapping[str, Any]) -> dict[str, Any]:
    """The architecture keys an HF config converts to (defaults for the keys the family leaves alone)."""
    return _model_keys({**default_config().model.to_dict(), **family.read_config(hf)})


def _vocab_multiple(vocab: int) -> int:
    return next(m for m in (64, 32, 16, 8, 4, 2, 1) if vocab % m == 0)


def converted_config(family: Family, keys: Mapping[str, Any], dtypes: Mapping[str, str], hf: Mapping[str, Any],
                     tokenizer: Path | None) -> ml_collections.ConfigDict:
    """The memlm config of a converted checkpoint: its architecture, the defaults elsewhere."""
    cfg = default_config()
    cfg.name = f"hf-{family.name}"
    float_codes = {c for c in dtypes.values() if c in _FLOATS}
    keys = dict(keys)
    max_len = int(keys.pop("max_seq_len"))
    cfg.model.update(keys)
    cfg.model.update(
        vocab_multiple=_vocab_multiple(int(keys["vocab_size"])), max_seq_len=max_len,
        param_dtype="bfloat16" if float_codes == {"BF16"} else "float32",
        compute_dtype="float32" if float_codes <= {"F32", "F64"} else "bfloat16",
        init_std=float(hf.get("initializer_range") or 0.02),
    )
    cfg.data.seq_len = min(cfg.data.seq_len, max_len)
    if tokenizer is not None:
        cfg.data.tokenizer = str(tokenizer)
    return cfg


def _apply_overrides(cfg: ml_collections.ConfigDict, overrides: Mapping[str, str] | None) -> None:
    """``--config.k=v`` on a converted config: anything but the architecture, which the checkpoint fixes."""
    for key in overrides or {}:
        section, _, name = key.partition(".")
        if section == "model" and name in ARCH_KEYS:
            raise ConfigError(f"config key 'model.{name}' is fixed by the checkpoint being converted")
    apply_overrides(cfg, dict(overrides or {}))


def _check_names(ckpt: Checkpoint, expected: list[str], spec: AnchorSpec, family: Family) -> list[str]:
    """The checkpoint's tensors equal the map's (plus an optional tied head copy); returns the ignored ones."""
    have = set(ckpt.names())
    missing = [n for n in expected if n not in have]
    if missing:
        raise ConvertError(f"{ckpt.folder}: the {family.title} checkpoint has no tensor {missing[0]!r}"
                           + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    allowed = set(expected) | ({TIED_HEAD} if spec.tied_embeddings else set())
    ignored = sorted(n for n in have - allowed if IGNORED.search(n))
    unknown = sorted(have - allowed - set(ignored))
    if unknown:
        raise ConvertError(f"{ckpt.folder}: tensor {unknown[0]!r} has no place in a memlm {family.title} anchor"
                           + (f" (and {len(unknown) - 1} more)" if len(unknown) > 1 else ""))
    return ignored


def _tokenizer_manifest(tokenizer_path: Path, vocab_multiple: int, model_vocab: int) -> dict:
    tok = Tokenizer.from_file(tokenizer_path, vocab_multiple)
    if tok.raw_vocab_size > model_vocab:  # extra added tokens (plain text never produces them: memlm encodes
        # with special-token parsing off); training data from this tokenizer is checked again by `memlm train`
        print(f"memlm convert: warning: {tokenizer_path} has {tok.raw_vocab_size} tokens, more than the model's "
              f"vocab_size = {model_vocab}", file=sys.stderr)
    return {"version": 1, "kind": "tokenizer", "corpus": None,
            "tokenizer": {"path": tokenizer_path.name, "id": tok.id, "eot_id": tok.eot_id, "eot": tok.eot,
                          "tokenizer_vocab": tok.raw_vocab_size, "vocab_size": min(tok.vocab_size, model_vocab),
                          "template": tok.template},
            "probes": {}, "heldout": None}


def _fresh_dir(out: Path) -> Path:
    """A temporary sibling of ``out`` (renamed onto it when complete); ``out`` must not hold anything."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConvertError(f"--out {str(out)!r} already exists and is not empty: choose a new directory")
    out.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))


def _finish(tmp: Path, out: Path) -> None:
    if out.exists():
        out.rmdir()
    os.replace(tmp, out)


def write_run(out: Path, cfg: ml_collections.ConfigDict, params: dict[str, np.ndarray], hf_files: list[Path],
              record: dict, manifest: dict, converted_from: str) -> None:
    """Write a run directory holding one checkpoint of these anchor parameters (step 0).

    The ``config.json`` record is written by :meth:`memlm.run.directory.RunDir.write_config`, as train
    writes it; the orbax items by the same Checkpointer train uses.
    """
    from memlm.run.checkpoints import Checkpointer
    from memlm.run.directory import RunDir

    tmp = _fresh_dir(out)
    try:
        hf_out = tmp / HF_SUBDIR
        hf_out.mkdir()
        for f in hf_files:
            shutil.copy2(f, hf_out / f.name)
        (hf_out / RECORD).write_text(json.dumps(record, indent=2) + "\n")
        (hf_out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
        RunDir(tmp).write_config(cfg, str(out.resolve() / HF_SUBDIR), None, converted_from=converted_from)
        ckpt = Checkpointer(tmp, keep=1, async_save=False)
        ckpt.save(0, {"params": params}, {"step": 0, "converted_from": converted_from, "family": record["family"]})
        ckpt.close()
        _finish(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _read_json(path: Path, what: str) -> dict:
    if not path.is_file():
        raise ConvertError(f"{what}: {path} does not exist")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConvertError(f"{path} is not valid JSON ({e})") from None


def from_hf(hf_dir: str | os.PathLike, out: str | os.PathLike, overrides: Mapping[str, str] | None = None,
            quiet: bool = False) -> dict:
    """Convert an HF checkpoint folder into a memlm run directory; returns a summary."""
    hf_dir, out = Path(hf_dir), Path(out)
    hf = _read_json(hf_dir / "config.json", "--from-hf")
    family = family_of_hf(hf)
    keys = family.read_config(hf)
    try:
        ckpt = Checkpoint(hf_dir)
    except SafetensorsError as e:
        raise ConvertError(str(e)) from None
    dtypes = {n: dtype_code(ckpt.dtype(n)) for n in ckpt.names()}
    tok_path = hf_dir / "tokenizer.json"
    if not tok_path.is_file():
        raise ConvertError(f"{hf_dir} has no tokenizer.json (memlm reads the fast tokenizer file)")
    cfg = converted_config(family, keys, dtypes, hf, out.resolve() / HF_SUBDIR / "tokenizer.json")
    _apply_overrides(cfg, overrides)
    validate(cfg)
    spec = AnchorSpec.from_config(cfg)
    maps = active(family.tensors, spec)
    expected = [n for t in maps for n in t.hf_names(spec)]
    ignored = _check_names(ckpt, expected, spec, family)
    from memlm.model.functional import AnchorFunctional

    shapes = {k: tuple(v.shape) for k, v in AnchorFunctional(cfg).shapes.items()}
    params = {}
    for t in maps:
        for name in t.hf_names(spec):
            want = hf_shape(t, spec, shapes[t.param])
            if ckpt.shape(name) != want:
                raise ConvertError(f"{hf_dir}: tensor {name!r} has shape {list(ckpt.shape(name))}, but config.json "
                                   f"implies {list(want)}")
        params[t.param] = to_memlm(t, spec, ckpt.get, np.dtype(cfg.model.param_dtype))
    if set(params) != set(shapes):
        raise ConvertError(f"the {family.title} map leaves memlm parameters {sorted(set(shapes) - set(params))} unset")
    weights = {p.resolve() for p in iter_weight_files(hf_dir)}
    hf_files = sorted(p for p in hf_dir.iterdir() if p.is_file() and p.resolve() not in weights)
    record = {"format": RECORD_FORMAT, "version": 1, "family": family.name, "source": str(hf_dir.resolve()),
              "tensors": {n: {"dtype": dtypes[n], "shape": list(ckpt.shape(n))} for n in ckpt.names()
                          if n not in ignored},
              "ignored": ignored}
    manifest = _tokenizer_manifest(tok_path, cfg.model.vocab_multiple, cfg.model.vocab_size)
    write_run(out, cfg, params, hf_files, record, manifest, str(hf_dir.resolve()))
    n = sum(int(np.prod(v.shape)) for v in params.values())
    summary = {"family": family.name, "run": str(out), "parameters": n, "param_dtype": cfg.model.param_dtype,
               "tensors": len(record["tensors"]), "eot": manifest["tokenizer"]["eot"]}
    if not quiet:
        print(f"memlm convert: {family.title} checkpoint {hf_dir} ({len(record['tensors'])} tensors, {n:,} parameters, "
              f"{cfg.model.param_dtype}) -> run {out} (checkpoint step 0, config {out / 'config.json'}, "
              f"tokenizer {out / HF_SUBDIR / 'tokenizer.json'}, EOT {manifest['tokenizer']['eot']!r})")
    return summary


def _origin(run_dir: Path, record: dict) -> Path | None:
    """The HF folder kept by the conversion this run descends from (itself, or its --init-from chain)."""
    seen: set[Path] = set()
    here: Path | None = run_dir
    while here is not None and here.resolve() not in seen:
        seen.add(here.resolve())
        if (here / HF_SUBDIR / RECORD).is_file():
            return here / HF_SUBDIR
        cfg_file = here / "config.json"
        rec = record if here == run_dir else (json.loads(cfg_file.read_text()) if cfg_file.is_file() else {})
        nxt = rec.get("init_from")
        here = Path(nxt) if nxt else None
    return None


def _tokenizer_files(record: dict) -> list[tuple[Path, str]]:
    """(path, name) of the tokenizer files of a run that did not come from HF (from its data directory)."""
    data = Path(record.get("data_dir") or "")
    manifest = data / "manifest.json"
    if not manifest.is_file():
        return []
    tok = data / json.loads(manifest.read_text()).get("tokenizer", {}).get("path", "tokenizer.json")
    return [(tok, "tokenizer.json")] if tok.is_file() else []


def to_hf(run_dir: str | os.PathLike, out: str | os.PathLike, family: str | None = None,
          max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, quiet: bool = False) -> dict:
    """Write a run's newest anchor as an HF checkpoint folder; returns a summary."""
    import jax

    from memlm.run.checkpoints import abstract_like, restore_item
    from memlm.run.directory import RunDir

    run_dir, out = Path(run_dir), Path(out)
    cfg, record = RunDir(run_dir).load_config()
    m = _model_keys(cfg.model)
    m.update(max_seq_len=cfg.model.max_seq_len, init_std=cfg.model.init_std)
    origin = _origin(run_dir, record)
    origin_hf = json.loads((origin / "config.json").read_text()) if origin and (origin / "config.json").is_file() \
        else None
    if family:
        fam = family_named(family)
    elif origin_hf is not None:
        fam = family_of_hf(origin_hf)
    else:
        fam = family_for_model(m)
    missing = fam.unsupported(m)
    if missing:
        raise ConvertError(f"the {fam.title} format cannot express {', '.join(missing)}")
    if max_shard_bytes <= 0:
        raise ConvertError(f"--max-shard-size must be positive, got {max_shard_bytes}")

    from memlm.model.functional import AnchorFunctional

    fn = AnchorFunctional(cfg)
    one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    step, params, _ = restore_item(run_dir, "params", abstract_like(fn.shapes, jax.tree.map(lambda _: one, fn.shapes)))
    params = jax.device_get(params)
    spec = fn.spec
    conv = json.loads((origin / RECORD).read_text()) if origin is not None else {}
    same_family = conv.get("family") == fam.name
    original = conv.get("tensors", {}) if same_family else {}
    where: dict[str, tuple[Any, int | None]] = {}
    for t in active(fam.tensors, spec):
        for i, name in enumerate(t.hf_names(spec)):
            where[name] = (t, i if t.stacked else None)
    names = [n for n in original if n in where] + [n for n in where if n not in original]
    if spec.tied_embeddings and TIED_HEAD in original:
        names.append(TIED_HEAD)  # the checkpoint stored the tied head: so does the export

    def source(name: str) -> tuple[Any, int | None]:
        return where["model.embed_tokens.weight" if name == TIED_HEAD and name not in where else name]

    def dtype(name: str) -> np.dtype:
        return DTYPES[original[name]["dtype"]] if name in original else np.dtype(params["embed"].dtype)

    def tensor(name: str) -> np.ndarray:
        t, i = source(name)
        p = np.asarray(params[t.param] if i is None else params[t.param][i])
        return t.transform.to_hf(p, spec).astype(dtype(name), copy=False)

    def shape(name: str) -> tuple[int, ...]:
        t, _ = source(name)
        return hf_shape(t, spec, tuple(fn.shapes[t.param].shape))

    specs = [(n, shape(n), dtype(n)) for n in names]
    tmp = _fresh_dir(out)
    try:
        arch_same = origin_hf is not None and same_family and _arch_of_hf(fam, origin_hf) == _model_keys(m)
        skip = {RECORD, "manifest.json", "config.json"}
        if origin is not None:
            for f in sorted(origin.iterdir()):
                if f.is_file() and f.name not in skip:
                    shutil.copy2(f, tmp / f.name)
        else:
            for src, name in _tokenizer_files(record):
                Tokenizer.from_file(src, cfg.model.vocab_multiple).save(tmp / name)
        if arch_same:
            shutil.copy2(origin / "config.json", tmp / "config.json")
        else:
            hf = fam.write_config(m)
            hf["torch_dtype"] = {"bfloat16": "bfloat16", "float32": "float32"}[cfg.model.param_dtype]
            for k in ("bos_token_id", "eos_token_id", "pad_token_id"):
                if origin_hf is not None and k in origin_hf:
                    hf[k] = origin_hf[k]
            if "eos_token_id" not in hf and (tmp / "tokenizer.json").is_file():
                hf["eos_token_id"] = Tokenizer.from_file(tmp / "tokenizer.json", 1).eot_id
            (tmp / "config.json").write_text(json.dumps(hf, indent=2, sort_keys=True) + "\n")
        files = write_checkpoint(tmp, specs, tensor, max_shard_bytes)
        _finish(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    summary = {"family": fam.name, "out": str(out), "step": int(step), "tensors": len(specs), "files": files,
               "config": "original" if arch_same else "written"}
    if not quiet:
        note = ""
        if cfg.memory.type != "none":
            note = "; the memory bank is not part of an HF checkpoint (memlm export writes it)"
        print(f"memlm convert: anchor of {run_dir} (step {step}) -> {fam.title} checkpoint {out} ({len(specs)} tensors "
              f"in {len(files)} file{'s' if len(files) > 1 else ''}, config.json "
              f"{'kept from the original' if arch_same else 'written from the memlm config'}){note}")
    return summary
