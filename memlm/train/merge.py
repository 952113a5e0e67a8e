"""``memlm merge``: combine per-subtree frozen-anchor runs into one run (the paper's App. A.2 recipe).

Frozen-anchor memory training splits into independent jobs, one per level-1 subtree
(``train.subtree=i``): subtree i's sequences fetch only blocks under level-1 node i, so the jobs
share no bank parameter and can run on separate machines at once. Merging copies, per level,
every trained node under subtree i from job i's bank (parameters, moments, counters) into a new
bank, and the (identical, frozen) anchor from the first job. It refuses jobs that overlap
(the same subtree twice), that disagree on the model, memory or tree, or whose anchors differ.
The merged run is an ordinary run: ``memlm eval`` and ``memlm generate`` open it, and
``memlm train`` continues it over all subtrees.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence

import jax
import numpy as np

from memlm.bank.layout import BankLayout
from memlm.bank.store import BankStore
from memlm.run.checkpoints import Checkpointer, abstract_like, restore_item
from memlm.run.directory import FROZEN_SECTIONS, RunDir
from memlm.sharding import make_mesh


class MergeError(ValueError):
    """The runs cannot be merged; the message names the run and the reason."""


def _digest(tree) -> str:
    h = hashlib.sha256()
    for leaf in jax.tree.leaves(jax.device_get(tree)):
        h.update(np.ascontiguousarray(leaf).tobytes())
    return h.hexdigest()


def merge_runs(runs: Sequence[str], out: str, quiet: bool = False) -> dict:
    """Merge subtree runs into ``out`` (a new run directory); returns a summary."""
    from memlm.train.loop import anchor_items
    from memlm.train.step import build

    if len(runs) < 2:
        raise MergeError("memlm merge needs at least two subtree runs")
    dirs = [RunDir(r) for r in runs]
    target = RunDir(out)
    if target.exists() or target.checkpoint_steps():
        raise MergeError(f"{target} already holds a run: merge into a new directory")
    loaded = [d.load_config() for d in dirs]
    cfg0, record0 = loaded[0]
    subtrees = {}
    for d, (cfg, _) in zip(dirs, loaded, strict=True):
        if cfg.train.mode != "frozen" or cfg.train.subtree < 0:
            raise MergeError(f"{d}: not a per-subtree frozen run (train.mode={cfg.train.mode!r}, "
                             f"train.subtree={cfg.train.subtree})")
        if cfg.train.subtree in subtrees:
            raise MergeError(f"{d} and {subtrees[cfg.train.subtree]} both train subtree {cfg.train.subtree}")
        subtrees[cfg.train.subtree] = d
        for section in FROZEN_SECTIONS:
            if cfg[section].to_dict() != cfg0[section].to_dict():
                raise MergeError(f"{d}: config section {section!r} differs from {dirs[0]}'s")

    mesh = make_mesh((1, 1, 1), jax.local_devices()[:1])
    fns = build(cfg0, mesh)
    abstract = abstract_like(anchor_items(fns.abstract_state()), anchor_items(fns.state_shardings))
    layout = BankLayout.from_config(cfg0)
    anchors, metas, opt0 = [], [], None
    for d in dirs:
        step, params, meta = restore_item(d.path, "params", abstract["params"])
        anchors.append(_digest(params))
        metas.append((step, meta))
        if opt0 is None:
            params0 = params
            opt0 = restore_item(d.path, "opt", abstract["opt"])[1]
    for d, digest in zip(dirs, anchors, strict=True):
        if digest != anchors[0]:
            raise MergeError(f"{d}: its anchor differs from {dirs[0]}'s (subtree jobs must share one frozen anchor)")
    stores = [BankStore.open(os.fspath(d.bank()), layout, version=int(m["bank_version"])) for d, (_, m) in
              zip(dirs, metas, strict=True)]
    for d, st in zip(dirs, stores, strict=True):
        if (st.tree_id, st.seed) != (stores[0].tree_id, stores[0].seed):
            raise MergeError(f"{d}: its bank was made for tree {st.tree_id!r} (seed {st.seed}), "
                             f"{dirs[0]}'s for {stores[0].tree_id!r} (seed {stores[0].seed})")

    cfg = cfg0.copy_and_resolve_references()
    cfg.train.subtree = -1
    target.write_config(cfg, record0.get("data_dir"), record0.get("init_from"))
    merged = BankStore.create(os.fspath(target.bank()), layout, seed=stores[0].seed, tree_id=stores[0].tree_id,
                              keep=cfg.train.keep_checkpoints + 1)
    k = layout.k
    rows, copied = {}, {}
    for lv in layout.levels:
        span = k ** (lv.level - 1)  # nodes of a level under one level-1 node
        parts = []
        for sub, d in sorted(subtrees.items()):
            store = stores[dirs.index(d)]
            trained = store.written_nodes(lv.level)
            mine = trained[(trained >= sub * span) & (trained < (sub + 1) * span)]
            parts.append((mine, store))
        nodes = np.concatenate([m for m, _ in parts]) if parts else np.zeros(0, np.int64)
        order = np.argsort(nodes)
        source = np.concatenate([np.full(m.size, i) for i, (m, _) in enumerate(parts)])[order]
        nodes = nodes[order]

        def fields_of(sel, nodes=nodes, source=source, parts=parts, level=lv.level):
            pos = np.searchsorted(nodes, sel)
            out = {}
            for i in np.unique(source[pos]):
                pick = np.flatnonzero(source[pos] == i)
                got = parts[int(i)][1].read_fields(level, sel[pick])
                for path, value in got.items():
                    out.setdefault(path, np.empty((sel.size, *value.shape[1:]), value.dtype))[pick] = value
            return out

        rows[lv.level] = (nodes, fields_of)
        copied[lv.key] = int(nodes.size)
    version = merged.save_rows(rows)
    merged.close()
    step = max(s for s, _ in metas)
    ckpt = Checkpointer(target.path, keep=cfg.train.keep_checkpoints, async_save=False)
    ckpt.save(step, {"params": params0, "opt": opt0},
              {"step": step, "bank_version": version, "merged_from": [str(d) for d in dirs]})
    ckpt.close()
    if not quiet:
        print(f"memlm merge: subtrees {sorted(subtrees)} -> {target} (bank version {version}, trained nodes "
              f"per level {copied}, anchor from {dirs[0]}, step {step})")
    return {"subtrees": sorted(subtrees), "copied": copied, "bank_version": version, "step": step}
