"""The blocks a ``memlm learn`` changed, as they were before it: kept so that routing can tell what the edit taught.

``memlm learn`` trains the leaf blocks its new documents reach. Before it does, it writes those
nodes' parameters (every bank array, every level it trains) into ``RUN/edits/NNNN-learn/origin.npz``:
a few blocks, not the bank. Edit routing (:mod:`memlm.infer.edits`) scores a text under a learned
block as it is and as it was; the difference is what the edit taught about that text.

A node's origin is its rows before the *first* learn that trained it (the earliest edit in effect
that holds it). ``memlm forget`` drops the nodes it resets or retrains from every origin file: those
rows were trained on the documents being forgotten, and a retrained block no longer continues them.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from memlm.edit.documents import EDITS_DIR, read_log

ORIGIN_NAME = "origin.npz"


def save_origin(path: Path, bank: Any, nodes: dict[int, np.ndarray]) -> int:
    """Write the rows of ``nodes`` (per level) of ``bank`` (a BankState) to ``path``; returns its bytes.

    Rows are stored as unsigned integers of their width, with their dtypes by name (``dtypes``, JSON):
    an ``.npz`` file cannot hold bfloat16."""
    import jax

    arrays: dict[str, np.ndarray] = {}
    dtypes: dict[str, str] = {}
    for level, ids in sorted(nodes.items()):
        ids = np.asarray(ids, np.int64)
        if len(ids) == 0:
            continue
        key = f"level{level}"
        arrays[f"{key}/nodes"] = ids
        for name, a in bank.params[key].items():
            rows = np.asarray(jax.device_get(a[np.asarray(ids, np.int32)]))
            arrays[f"{key}/{name}"] = rows.view(f"u{rows.dtype.itemsize}")
            dtypes[f"{key}/{name}"] = str(rows.dtype)
    arrays["dtypes"] = np.asarray(json.dumps(dtypes))
    tmp = path.with_name(path.name + ".tmp.npz")
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(tmp, **arrays)
    os.replace(tmp, path)
    return path.stat().st_size


def _files(workdir: Path, step: int | None) -> list[tuple[int, Path]]:
    """(edit, origin file) of the edits in effect at checkpoint ``step`` (all with None), oldest first."""
    out = []
    for e in read_log(workdir):
        if not e.get("origin"):  # a learn's, or a forget's that relearned leaves
            continue
        if step is not None and int(e.get("step", 0)) > step:
            continue
        f = workdir / EDITS_DIR / e["origin"]
        if f.is_file():
            out.append((int(e["edit"]), f))
    return sorted(out)


def load_origins(workdir: str | os.PathLike, step: int | None = None) -> dict[int, dict[int, dict[str, np.ndarray]]]:
    """``{level: {node: {array name: rows}}}``: each learned node's rows before the first learn in
    effect at ``step`` that trained it."""
    out: dict[int, dict[int, dict[str, np.ndarray]]] = {}
    for _, f in _files(Path(workdir), step):
        with np.load(f) as z:
            keys = list(z.files)
            dtypes = json.loads(str(z["dtypes"])) if "dtypes" in keys else {}
            for nk in [k for k in keys if k.endswith("/nodes")]:
                key = nk.split("/")[0]
                level = int(key.removeprefix("level"))
                names = [k.split("/", 1)[1] for k in keys if k.startswith(key + "/") and k != nk]
                rows = {n: _typed(z[f"{key}/{n}"], dtypes.get(f"{key}/{n}")) for n in names}
                for i, node in enumerate(z[nk].tolist()):
                    out.setdefault(level, {}).setdefault(int(node), {n: rows[n][i] for n in names})
    return out


def _typed(a: np.ndarray, dtype: str | None) -> np.ndarray:
    """Stored rows back in their dtype (stored as unsigned ints of the same width, by :func:`save_origin`)."""
    import jax.numpy as jnp

    return a if dtype is None else a.view(jnp.dtype(dtype))


def drop_nodes(workdir: str | os.PathLike, nodes: dict[int, np.ndarray]) -> int:
    """Remove ``nodes`` (per level) from every origin file of the run; returns how many rows went."""
    dropped = 0
    for _, f in _files(Path(workdir), None):
        with np.load(f) as z:
            arrays = {k: z[k] for k in z.files}
        changed = False
        for level, ids in nodes.items():
            key = f"level{level}"
            if f"{key}/nodes" not in arrays:
                continue
            keep = ~np.isin(arrays[f"{key}/nodes"], np.asarray(ids))
            if keep.all():
                continue
            changed, dropped = True, dropped + int((~keep).sum())
            for k in [k for k in arrays if k.startswith(key + "/")]:
                arrays[k] = arrays[k][keep]
        if changed:
            tmp = f.with_name(f.name + ".tmp.npz")
            np.savez(tmp, **arrays)
            os.replace(tmp, f)
    return dropped
