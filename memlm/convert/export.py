"""``memlm export RUN_DIR --out DIR``: a run's memory bank as plain zarr3 arrays plus metadata.

The export is self-describing, for readers outside memlm (tensorstore, zarr-python, any zarr3
reader)::

    DIR/memlm_bank.json              the metadata below
    DIR/bank/level{l}/{array}/       zarr3 [k**l, *block(r_l)]: one block per tree node of level l
    DIR/generic/{array}/             zarr3 [1, *block(R)]: the generic memory (when the run has one)
    DIR/tree/centroids_{l}/          zarr3 float32 [k**l, dim]: the routing tree (when its data is found)

Every block array is zarr3 with the ``sharding_indexed`` codec: an outer chunk (one file) holds
``shard_nodes`` consecutive nodes, and each inner chunk is exactly one node's block, so reading
one node is one contiguous read. bfloat16 arrays use zarr3's ``bfloat16`` data type.

Using it. A text's path is ``[n_1, ..., n_depth]``, ``n_l`` in ``[0, k**l)``: embed the text with
``tree.embedder`` (L2-normalised), take the nearest (L2) level-1 centroid, then at every level
the nearest of the k children ``k*n .. k*n + k - 1`` of the node taken above. The fetched memory
of the path concatenates, for every array, the blocks ``bank/level{l}/{array}[n_l]`` along the
array's ``r`` axis in level order (levels with r_l = 0 are absent). For FFN-memory
(``memory.type = "ffn"``: w1, w2 ``[L_mem, d, r]``, w3 ``[L_mem, r, d]``), memory layer j (anchor
layer ``memory_layers[0] + j``) computes ``FFN'(u) = FFN(u) + (act(u @ w1[j]) * (u @ w2[j])) @ w3[j]``,
with u the FFN input (after the pre-FFN norm) and ``act`` the anchor's FFN activation. The generic
memory is used the same way in place of the fetched one. The anchor itself is exported by ``memlm convert --to-hf``.

Reading goes through the bank store's public API (``BankStore.open``, ``read_rows``), in
chunks of nodes, so no level is ever held in memory whole.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import tensorstore as ts

FORMAT = "memlm-bank-export"
VERSION = 1
META = "memlm_bank.json"
SHARD_BYTES = 64 << 20  # target size of one outer chunk (file)
CHUNK_BYTES = 256 << 20  # host memory per read / write batch

_USAGE = {
    "path": "node n_l of level l in [0, k**l); children of node n at the next level are k*n .. k*n + k - 1",
    "routing": "embed the text with tree.embedder (L2-normalised); at level 1 take the nearest centroid (L2), "
               "then the nearest of the k children of the node taken at the level above",
    "fetched": "for each array, concatenate bank/level{l}/{array}[n_l] along the array's 'r' axis in level order",
    "ffn": "memory layer j (anchor layer memory_layers[0] + j): FFN'(u) = FFN(u) + (act(u @ w1[j]) * (u @ w2[j])) "
           "@ w3[j], with u the FFN input after the pre-FFN norm and act the anchor's FFN activation",
    "generic": "generic/{array}[0] replaces the fetched memory (same shapes, rank R = sum r_l)",
}


def _zarr_spec(path: Path, shape: tuple[int, ...], dtype: str, shard_nodes: int) -> dict:
    block = [int(s) for s in shape[1:]]
    codec = {"name": "sharding_indexed", "configuration": {
        "chunk_shape": [1, *block],
        "codecs": [{"name": "bytes", "configuration": {"endian": "little"}}],
        "index_codecs": [{"name": "bytes", "configuration": {"endian": "little"}}, {"name": "crc32c"}],
        "index_location": "end"}}
    return {"driver": "zarr3", "kvstore": {"driver": "file", "path": str(path) + "/"},
            "metadata": {"shape": [int(s) for s in shape], "data_type": dtype, "fill_value": 0,
                         "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": [shard_nodes, *block]}},
                         "codecs": [codec]}}


def _write_array(path: Path, shape: tuple[int, ...], dtype: str, rows, row_bytes: int) -> dict:
    """Create a zarr3 array and fill it batch by batch (``rows(a, b)`` gives nodes a..b-1); its description."""
    nodes = int(shape[0])
    shard = max(1, min(nodes, SHARD_BYTES // max(row_bytes, 1)))
    arr = ts.open(_zarr_spec(path, shape, dtype, shard), create=True, delete_existing=True).result()
    step = shard * max(1, CHUNK_BYTES // max(shard * row_bytes, 1))  # whole shards per batch
    for a in range(0, nodes, step):
        b = min(a + step, nodes)
        arr[a:b].write(np.ascontiguousarray(rows(a, b))).result()
    return {"shape": [int(s) for s in shape], "dtype": dtype, "shard_nodes": shard, "chunk": [1, *shape[1:]]}


def _export_store(store, layout, out: Path, root: str) -> list[dict]:
    levels = []
    for lv in layout.levels:
        arrays = {}
        for a in layout.arrays:
            shape = layout.array_shape(lv, a)
            rel = f"{root}/{lv.key}/{a.name}" if not layout.generic else f"{root}/{a.name}"
            row_bytes = int(np.prod(shape[1:])) * layout.itemsize

            def rows(i: int, j: int, lv=lv, a=a) -> np.ndarray:
                return store.read_rows(lv.level, a.name, np.arange(i, j))

            desc = _write_array(out / rel, shape, layout.dtype, rows, row_bytes)
            arrays[a.name] = {"path": rel, **desc, "axes": ["node", *layout.logical_axes(a)[1:]],
                              "dims": ["node", *(str(d) for d in a.dims)], "rank_axis": a.rank_axis + 1,
                              "init": a.init}
        levels.append({"level": lv.level, "nodes": lv.nodes, "rank": lv.rank, "arrays": arrays})
    return levels


def _tree(record: dict, out: Path) -> dict | None:
    """The routing tree of the run's data directory, as zarr3 centroids (None when the data is gone)."""
    from memlm.retrieval import Tree

    data = Path(record.get("data_dir") or "")
    manifest = data / "manifest.json"
    if not manifest.is_file():
        return None
    info = json.loads(manifest.read_text()).get("tree")
    if not info or not (data / info["path"]).is_file():
        return None
    tree = Tree.load(data / info["path"])
    centroids = {}
    for level, c in enumerate(tree.centroids, start=1):
        rel = f"tree/centroids_{level}"
        _write_array(out / rel, c.shape, "float32", lambda i, j, c=c: c[i:j], c.shape[1] * 4)
        centroids[str(level)] = rel
    return {"k": tree.k, "depth": tree.depth, "dim": tree.dim, "embedder": tree.embedder, "id": tree.id,
            "centroids": centroids}


def export_bank(run_dir: str | os.PathLike, out: str | os.PathLike, quiet: bool = False) -> dict:
    """Export the bank (and generic memory) of a run at the version its newest checkpoint pairs with."""
    import jax

    from memlm.bank.layout import BankLayout
    from memlm.bank.store import BankStore
    from memlm.config import memory_layers
    from memlm.convert.hf_config import ConvertError
    from memlm.model.functional import AnchorFunctional
    from memlm.run.checkpoints import abstract_like, restore_item
    from memlm.run.directory import RunDir

    run_dir, out = Path(run_dir), Path(out)
    cfg, record = RunDir(run_dir).load_config()
    if cfg.memory.type == "none" or not (run_dir / "bank").exists():
        raise ConvertError(f"{str(run_dir)!r} has no memory bank to export (memory.type = {cfg.memory.type!r})")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConvertError(f"--out {str(out)!r} already exists and is not empty: choose a new directory")
    fn = AnchorFunctional(cfg)
    one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    step, _, meta = restore_item(run_dir, "params", abstract_like(fn.shapes, jax.tree.map(lambda _: one, fn.shapes)))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        m = cfg.model
        doc: dict[str, Any] = {
            "format": FORMAT, "version": VERSION, "run": str(run_dir.resolve()), "step": int(step),
            "memory": {"type": cfg.memory.type, "sizes": list(cfg.memory.sizes), "placement": cfg.memory.placement,
                       "memory_layers": list(memory_layers(cfg)), "lora_alpha": float(cfg.memory.lora_alpha),
                       "activation": m.get("ffn_activation", "silu")},
            "model": {k: m[k] for k in ("n_layers", "d_model", "d_ff", "n_heads", "n_kv_heads", "head_dim",
                                        "vocab_size")},
            "usage": _USAGE,
        }
        layout = BankLayout.from_config(cfg)
        store = BankStore.open(run_dir / "bank", layout, version=meta.get("bank_version"))
        doc["bank"] = {"version": store.version, "k": layout.k, "depth": layout.depth, "dtype": layout.dtype,
                       "levels": _export_store(store, layout, tmp, "bank")}
        doc["generic"] = None
        if cfg.memory.generic and (run_dir / "generic").exists():
            glayout = BankLayout.generic_from_config(cfg)
            gstore = BankStore.open(run_dir / "generic", glayout, version=meta.get("generic_version"))
            lv = _export_store(gstore, glayout, tmp, "generic")[0]
            doc["generic"] = {"version": gstore.version, "dtype": glayout.dtype, "rank": lv["rank"],
                              "arrays": lv["arrays"]}
        doc["tree"] = _tree(record, tmp)
        (tmp / META).write_text(json.dumps(doc, indent=2) + "\n")
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    n = sum(lv["nodes"] for lv in doc["bank"]["levels"])
    if not quiet:
        print(f"memlm export: bank of {run_dir} (step {step}, version {doc['bank']['version']}: "
              f"{len(doc['bank']['levels'])} levels, {n} blocks{', generic memory' if doc['generic'] else ''}"
              f"{', tree' if doc['tree'] else ''}) -> {out} (metadata {out / META})")
    return doc
