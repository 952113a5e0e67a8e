"""``memlm export RUN --serve --out DIR``: a run as a padded anchor, one LoRA adapter per path, a router.

Stock engines that serve many LoRA adapters at once (vLLM multi-LoRA, PEFT mixed-batch inference)
then serve the bank: each request names the adapter of its path (docs/serving.md)::

    DIR/base/                  the anchor as a Hugging Face folder of its family; for FFN-memory its FFN
                               padded with R = sum r_l zero hidden units (config.json intermediate_size + R)
    DIR/adapters/<name>/       adapter_config.json + adapter_model.safetensors (PEFT LoRA, rank R) for
                               each path asked for (``path-3-14``) and ``generic`` (the generic memory)
    DIR/router/                router.json + centroids.npz (:mod:`memlm.serve.router`)
    DIR/memlm_serve.json       what was exported: run, step, memory, R, the adapters written

``memlm export RUN --merge-path TEXT|3,14 --out DIR`` writes one plain HF folder with that path's
blocks merged into the padded FFN: a specialised model any engine loads. The maths is in
:mod:`memlm.serve.lora`; the anchor goes through ``memlm convert --to-hf``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from memlm.convert.hf_config import ConvertError
from memlm.serve import lora
from memlm.serve.descent import adapter_name

FORMAT = "memlm-serve-export"
META = "memlm_serve.json"
PEFT_PREFIX = "base_model.model."
ADAPTER_FILE = "adapter_model.safetensors"
NO_SHARDS = 1 << 62


class _Source:
    """A run opened for serving export: config, family, the bank and generic stores, the tree."""

    def __init__(self, run_dir: Path):
        import jax

        from memlm.bank.layout import BankLayout
        from memlm.bank.store import BankStore
        from memlm.config import memory_layers
        from memlm.model.functional import AnchorFunctional
        from memlm.run.checkpoints import abstract_like, restore_item
        from memlm.run.directory import RunDir

        self.run_dir = run_dir
        self.cfg, self.record = RunDir(run_dir).load_config()
        if self.cfg.memory.type == "none" or not (run_dir / "bank").exists():
            raise ConvertError(f"{str(run_dir)!r} has no memory bank to serve (memory.type = "
                               f"{self.cfg.memory.type!r}): `memlm convert --to-hf` exports its anchor")
        lora.check_lora_form(self.cfg.memory.type)
        _check_hf_form(self.cfg)
        fn = AnchorFunctional(self.cfg)
        one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        self.step, _, meta = restore_item(run_dir, "params",
                                          abstract_like(fn.shapes, jax.tree.map(lambda _: one, fn.shapes)))
        self.layout = BankLayout.from_config(self.cfg)
        self.bank = BankStore.open(run_dir / "bank", self.layout, version=meta.get("bank_version"))
        self.generic = None
        if self.cfg.memory.generic and (run_dir / "generic").exists():
            self.generic = BankStore.open(run_dir / "generic", BankLayout.generic_from_config(self.cfg),
                                          version=meta.get("generic_version"))
        self.rank = self.layout.fetched_rank
        self.name_levels = max(lv.level for lv in self.layout.levels)
        self.memory_layers = tuple(memory_layers(self.cfg))
        self._last: dict[int, tuple[int, dict[str, np.ndarray]]] = {}

    @property
    def pad(self) -> int:
        """Zero hidden units the base's FFN gets (R for FFN-memory; LoRA memories adapt the anchor as it is)."""
        return self.rank if self.cfg.memory.type == "ffn" else 0

    def _block(self, level: int, node: int) -> dict[str, np.ndarray]:
        """One node's block, the last one read per level kept (paths stream in leaf order)."""
        if self._last.get(level, (-1,))[0] != node:
            self._last[level] = (node, {a.name: self.bank.read_rows(level, a.name, np.array([node]))[0]
                                        for a in self.layout.arrays})
        return self._last[level][1]

    def fetched(self, path: np.ndarray) -> dict[str, np.ndarray]:
        """The path's memory: name -> ``[L_mem, *shape(R)]``, levels concatenated along the rank axis."""
        blocks = [self._block(lv.level, int(path[lv.level - 1])) for lv in self.layout.levels]
        return {a.name: np.concatenate([b[a.name] for b in blocks], axis=a.rank_axis) for a in self.layout.arrays}

    def generic_memory(self) -> dict[str, np.ndarray]:
        lv = self.generic.layout.levels[0]
        return {a.name: self.generic.read_rows(lv.level, a.name, np.array([0]))[0] for a in self.generic.layout.arrays}

    def tree(self):
        """The run's routing tree and the dtype its documents were embedded in."""
        from memlm.retrieval import Tree

        data = Path(self.record.get("data_dir") or "")
        if not (data / "manifest.json").is_file():
            raise ConvertError(f"the data directory of {str(self.run_dir)!r} ({str(data)!r}) is gone: its tree "
                               "routes the texts")
        manifest = json.loads((data / "manifest.json").read_text())
        info = manifest["tree"]
        return Tree.load(data / info["path"]), info.get("embed_dtype", "float32"), manifest

    def route(self, texts: list[str]) -> np.ndarray:
        """memlm's greedy paths of texts (the embedder and tree the run was trained with)."""
        import ml_collections

        from memlm.retrieval import get_embedder, route

        tree, dtype, _ = self.tree()
        ecfg = ml_collections.ConfigDict(self.cfg.to_dict())
        ecfg.tree.embedder, ecfg.tree.embed_dtype = tree.embedder, dtype
        return route(tree, get_embedder(ecfg).embed(texts))


def _check_hf_form(cfg: Any) -> None:
    """Fail in one line, before any reading, when no Hugging Face family expresses the anchor."""
    from memlm.convert import family_for_model
    from memlm.convert.hf_config import ARCH_KEYS

    family_for_model({k: tuple(v) if isinstance(v, list | tuple) else v
                      for k, v in cfg.model.to_dict().items() if k in ARCH_KEYS})


def _modules(fam: Any) -> dict[str, str]:
    """memlm anchor parameter -> HF module path template (``model.layers.{i}.mlp.gate_proj``)."""
    return {t.param: t.hf.removesuffix(".weight") for t in fam.tensors if t.stacked and t.hf.endswith(".weight")}


def _family_of(folder: Path):
    from memlm.convert import family_of_hf

    return family_of_hf(json.loads((folder / "config.json").read_text()))


def write_hf(anchor: Path, out: Path, pad: int, memory: dict[str, np.ndarray] | None = None,
             layers: tuple[int, int] = (0, 0)) -> None:
    """Copy the HF folder ``anchor`` to ``out`` with every FFN padded by ``pad`` hidden units; with
    ``memory`` (FFN-memory arrays ``[L_mem, ...]``), memory layer j's blocks fill layer ``layers[0] + j``."""
    from memlm.convert.safetensors import Checkpoint, iter_weight_files, write_checkpoint

    fam = _family_of(anchor)
    mods = _modules(fam)
    roles: dict[str, tuple[str, int]] = {}
    hf = json.loads((anchor / "config.json").read_text())
    for i in range(int(hf["num_hidden_layers"])):
        for p in lora.FFN_ROLES:
            roles[mods[p].format(i=i) + ".weight"] = (p, i)
    ckpt = Checkpoint(anchor)

    def tensor(name: str) -> np.ndarray:
        w = ckpt.get(name)
        if name not in roles or pad == 0:
            return np.asarray(w)
        p, i = roles[name]
        j = i - layers[0]
        if memory is not None and 0 <= j < layers[1] - layers[0]:
            return lora.merge_ffn(lora.FFN_ROLES[p], w, memory[p][j])
        return lora.pad_ffn(lora.FFN_ROLES[p], w, pad)

    def shape(name: str) -> tuple[int, ...]:
        s = list(ckpt.shape(name))
        if name in roles and pad:
            s[1 if roles[name][0] == "w3" else 0] += pad
        return tuple(s)

    out.mkdir(parents=True, exist_ok=True)
    weights = {p.resolve() for p in iter_weight_files(anchor)}
    for f in sorted(anchor.iterdir()):
        if f.is_file() and f.resolve() not in weights and f.name != "config.json":
            shutil.copy2(f, out / f.name)
    hf["intermediate_size"] = int(hf["intermediate_size"]) + pad
    (out / "config.json").write_text(json.dumps(hf, indent=2, sort_keys=True) + "\n")
    index = anchor / "model.safetensors.index.json"
    names = list(json.loads(index.read_text())["weight_map"]) if index.is_file() else ckpt.names()
    write_checkpoint(out, [(n, shape(n), ckpt.dtype(n)) for n in names], tensor)


def write_adapter(out: Path, memory: dict[str, np.ndarray], memory_type: str, alpha: float, d_ff: int,
                  layers: tuple[int, int], fam: Any) -> None:
    """One PEFT LoRA adapter folder (``adapter_config.json``, ``adapter_model.safetensors``) of a memory."""
    from memlm.convert.safetensors import write_checkpoint

    templates = _modules(fam)
    tensors: dict[str, np.ndarray] = {}
    r = 0
    for j, i in enumerate(range(*layers)):
        mods = {p: templates[p].format(i=i) for p in lora.targets(memory_type)}
        for module, (a, b) in lora.layer_tensors(memory_type, memory, j, d_ff, mods).items():
            tensors[f"{PEFT_PREFIX}{module}.lora_A.weight"] = a
            tensors[f"{PEFT_PREFIX}{module}.lora_B.weight"] = b
            r = a.shape[0]
    names = sorted(tensors)
    out.mkdir(parents=True, exist_ok=True)
    write_checkpoint(out, [(n, tensors[n].shape, tensors[n].dtype) for n in names], tensors.__getitem__, NO_SHARDS)
    os.replace(out / "model.safetensors", out / ADAPTER_FILE)
    leaves = sorted({templates[p].rsplit(".", 1)[-1] for p in lora.targets(memory_type)})
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": None, "r": r,
              "lora_alpha": lora.lora_alpha(memory_type, r, alpha), "target_modules": leaves,
              "layers_to_transform": list(range(*layers)), "layers_pattern": "layers", "lora_dropout": 0.0,
              "bias": "none", "fan_in_fan_out": False, "use_rslora": False, "use_dora": False,
              "init_lora_weights": True, "inference_mode": True, "modules_to_save": None, "rank_pattern": {},
              "alpha_pattern": {}}
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def _parse_paths(spec: str) -> tuple[str, Any]:
    """``all`` | ``N`` | ``for:TEXT`` -> (kind, value)."""
    spec = str(spec)
    if spec == "all":
        return "all", None
    if spec.startswith("for:"):
        return "for", spec[4:]
    if spec.isdigit() and int(spec) > 0:
        return "top", int(spec)
    raise ConvertError(f"--paths {spec!r}: give 'all', a number N (the N most used leaves) or 'for:TEXT'")


def select_paths(src: _Source, spec: str) -> Iterator[np.ndarray]:
    """The paths (truncated to the levels that hold memory) an export writes, streamed for ``all``."""
    from memlm.memspec import leaf_paths_of

    kind, value = _parse_paths(spec)
    k, levels = src.cfg.tree.k, src.name_levels
    if kind == "all":
        for leaf in range(k ** levels):
            yield leaf_paths_of([leaf], k, levels)[0]
        return
    if kind == "for":
        yield src.route([value])[0][:levels]
        return
    _, _, manifest = src.tree()
    counts = np.asarray(manifest.get("leaf_histogram", {}).get("sequences", []), np.int64)
    if counts.size == 0:
        raise ConvertError("--paths N: the data manifest has no leaf_histogram (use 'all' or 'for:TEXT')")
    depth = src.cfg.tree.depth
    per_node = np.bincount(np.arange(counts.size) // k ** (depth - levels), weights=counts, minlength=k ** levels)
    order = np.argsort(-per_node, kind="stable")[:value]
    for node in order[per_node[order] > 0]:
        yield leaf_paths_of([int(node)], k, levels)[0]


def _fresh(out: Path) -> Path:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConvertError(f"--out {str(out)!r} already exists and is not empty: choose a new directory")
    out.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))


def _anchor(run_dir: Path, tmp: Path) -> Path:
    """The run's anchor as an HF folder of its family (``memlm convert --to-hf``), in ``tmp``."""
    from memlm.convert.run import to_hf

    to_hf(run_dir, tmp / ".anchor", quiet=True)
    return tmp / ".anchor"


def _finish(tmp: Path, out: Path) -> None:
    shutil.rmtree(tmp / ".anchor", ignore_errors=True)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # a temporary folder is private; the export is not
    if out.exists():
        out.rmdir()
    os.replace(tmp, out)


def export_serve(run_dir: str | os.PathLike, out: str | os.PathLike, paths: str = "all", quiet: bool = False) -> dict:
    """Write the padded base, one PEFT adapter per selected path (plus ``generic``) and the router."""
    from memlm.serve.router import write_router

    run_dir, out = Path(run_dir), Path(out)
    src = _Source(run_dir)
    _parse_paths(paths)
    tmp = _fresh(out)
    try:
        anchor = _anchor(run_dir, tmp)
        fam = _family_of(anchor)
        write_hf(anchor, tmp / "base", src.pad)
        m = src.cfg.model
        args = (src.cfg.memory.type, float(src.cfg.memory.lora_alpha), int(m.d_ff), src.memory_layers, fam)
        names = []
        for path in select_paths(src, paths):
            name = adapter_name(path, src.name_levels)
            write_adapter(tmp / "adapters" / name, src.fetched(path), *args)
            names.append(name)
        generic = None
        if src.generic is not None:
            generic = "generic"
            write_adapter(tmp / "adapters" / generic, src.generic_memory(), *args)
        tree, dtype, _ = src.tree()
        write_router(tmp / "router", tree, src.cfg, dtype, src.name_levels, generic)
        doc = {"format": FORMAT, "version": 1, "run": str(run_dir.resolve()), "step": int(src.step),
               "family": fam.name, "memory": {"type": src.cfg.memory.type, "sizes": list(src.cfg.memory.sizes),
                                              "memory_layers": list(src.memory_layers)},
               "rank": src.rank, "padded": src.pad, "paths": str(paths), "adapters": len(names),
               "generic": generic}
        (tmp / META).write_text(json.dumps(doc, indent=2) + "\n")
        _finish(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if not quiet:
        print(f"memlm export: {run_dir} (step {src.step}) -> {out}: {fam.title} base (FFN + {src.pad} units), "
              f"{len(names)} path adapter{'s' if len(names) != 1 else ''} of rank {src.rank}"
              f"{' and generic' if generic else ''}, router {out / 'router'}")
        from memlm.edit.origin import load_origins

        if load_origins(run_dir, int(src.step)):
            print("memlm export: this run was taught by `memlm learn`; the router routes as the run's tree does, "
                  "without edit routing (docs/editing.md): texts about the learned documents may reach other paths")
    return doc


def _merge_path(src: _Source, spec: str) -> np.ndarray:
    """``3,14`` (node ids, level 1 first) or a text (routed): the path, checked against the tree."""
    k, levels = src.cfg.tree.k, src.name_levels
    if not re.fullmatch(r"\d+(,\d+)*", spec.strip()):
        return src.route([spec])[0][:levels]
    path = np.array([int(x) for x in spec.split(",")], np.int64)
    if len(path) < levels:
        raise ConvertError(f"--merge-path {spec!r}: give {levels} node ids (levels 1..{levels}), or a text")
    for lv, n in enumerate(path[:levels], start=1):
        if not 0 <= n < k**lv or (lv > 1 and n // k != path[lv - 2]):
            raise ConvertError(f"--merge-path {spec!r}: node {n} is not a level-{lv} child of the node before it")
    return path[:levels]


def export_merged(run_dir: str | os.PathLike, out: str | os.PathLike, path: str, quiet: bool = False) -> dict:
    """One HF folder: the anchor with a path's FFN-memory blocks as R more hidden units per memory layer."""
    run_dir, out = Path(run_dir), Path(out)
    src = _Source(run_dir)
    if src.cfg.memory.type != "ffn":
        raise ConvertError(f"--merge-path merges FFN-memory blocks; memory.type = {src.cfg.memory.type!r} "
                           "(serve it as adapters with --serve)")
    nodes = _merge_path(src, path)
    tmp = _fresh(out)
    try:
        anchor = _anchor(run_dir, tmp)
        write_hf(anchor, tmp, src.rank, src.fetched(nodes), src.memory_layers)
        _finish(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    name = adapter_name(nodes, src.name_levels)
    if not quiet:
        print(f"memlm export: {run_dir} (step {src.step}) with {name} merged (FFN + {src.rank} units) -> {out}")
    return {"out": str(out), "path": [int(n) for n in nodes], "name": name, "rank": src.rank}
