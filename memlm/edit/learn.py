"""``memlm learn RUN --corpus NEW``: teach a trained run new documents in the blocks of their paths.

1. The new documents are prepared with the run's own tokenizer, embedder and tree (prepare's
   pipeline with the tree given, no held-out documents) into ``RUN/edits/NNNN-learn/data``: every
   unit is routed as the run's training units were, and packed per leaf.
2. The training data is the new sequences plus, per leaf they reach, that leaf's old sequences (a
   share ``--replay`` of them, all by default; re-packed from the run's kept units without forgotten
   documents), so the block keeps what it held: a leaf block trained on a few new sequences alone,
   with Adam's normalised steps, loses what it knew.
3. Only the blocks of those leaves train (:mod:`memlm.edit.blocks`): the anchor, the generic memory
   and every other block are bit-identical afterwards. The shallower levels' blocks on their paths are
   shared with many other leaves, so by default they are read, not trained (``--levels 1,2`` trains
   them too, at the price of what the other leaves' documents get from them: docs/editing.md).

Before training, the rows of the blocks it trains are kept as they were (``origin.npz`` in the edit's
folder, :mod:`memlm.edit.origin`): edit routing (:mod:`memlm.infer.edits`) sends a text to the learned
leaf whose block the edit made far likelier to produce it.

The documents get numbers after the run's last (``memlm trace`` lists them; ``memlm forget`` can
remove them again). A rerun after an interruption reuses the finished prepare stages.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np

from memlm.edit.blocks import default_steps, train_blocks
from memlm.edit.documents import EDITS_DIR, EditError, RunDocuments, append_log, parse_levels
from memlm.edit.origin import ORIGIN_NAME
from memlm.edit.repack import build

DEFAULT_EPOCHS = 8.0
DEFAULT_REPLAY = 1.0


def _check_prepared(docs: RunDocuments, corpus: Path) -> None:
    """A prepared data directory as ``--corpus``: it must share the run's tokenizer and tree."""
    from memlm.data.records import read_manifest

    man = read_manifest(corpus)
    mine = docs.manifest
    if man.get("tokenizer", {}).get("id") != mine["tokenizer"]["id"]:
        raise EditError(f"--corpus {str(corpus)!r} was prepared with another tokenizer than the run's "
                        f"({man.get('tokenizer', {}).get('id')} vs {mine['tokenizer']['id']}): give its raw "
                        "documents (.jsonl, .txt, ...) so they are tokenized as the run's were")
    if man.get("tree", {}).get("id") != mine["tree"]["id"]:
        raise EditError(f"--corpus {str(corpus)!r} was routed with another tree than the run's: give its raw "
                        "documents so they are routed with the run's tree")


def learn(workdir: str | os.PathLike, corpus: str, *, steps: int | None = None, epochs: float = DEFAULT_EPOCHS,
          replay: float = DEFAULT_REPLAY, lr: float | None = None, batch_size: int | None = None,
          levels: str | None = None, console=None, quiet: bool = False) -> dict[str, Any]:
    """Teach run ``workdir`` the documents of ``corpus`` (see the module docstring); returns the log entry."""
    from memlm.data.prepare import prepare

    docs = RunDocuments(workdir)
    cfg = docs.cfg
    if cfg.memory.type == "none" or cfg.train.mode == "anchor":
        raise EditError(f"{str(workdir)!r} has no memory bank: learn trains the blocks of a memory run")
    if not 0.0 <= replay <= 1.0:
        raise EditError(f"--replay {replay}: give a share in [0, 1]")
    if steps is not None and steps < 1:
        raise EditError(f"--steps {steps}: give at least 1")
    depth = int(docs.manifest["depth"])
    train_levels = parse_levels(levels, depth) if levels is not None else [depth]
    src = Path(corpus)
    if not (src.exists() or corpus.startswith("hf://")):
        raise EditError(f"--corpus {corpus!r}: no such file or folder")
    edit = docs.next_edit
    edir = docs.workdir / EDITS_DIR / f"{edit:04d}-learn"
    t0 = time.time()
    if src.is_dir() and (src / "manifest.json").is_file():
        _check_prepared(docs, src)
        new = src
    else:
        pcfg = _prepare_config(cfg, docs)
        new = edir / "data"
        prepare(pcfg, corpus, new, tree_file=docs.data_dir / "tree.npz", holdout=False, console=console)
    from memlm.data.records import read_manifest

    man = read_manifest(new)
    if man["tokenizer"]["id"] != docs.manifest["tokenizer"]["id"]:  # a data.tokenizer of another folder
        raise EditError(f"the new documents were tokenized by {man['tokenizer']['id']}, not the run's tokenizer")
    leaf_new = np.asarray(man["leaf_histogram"]["sequences"], np.int64)
    touched = leaf_new > 0
    data = build(edir / "train", docs, repack=touched if replay > 0 else np.zeros_like(touched),
                 exclude=docs.forgotten, new=new, replay=replay, seed=int(cfg.train.seed) + edit)
    batch = int(batch_size or cfg.train.batch_size)
    n_steps = int(steps or default_steps(data["sequences"], epochs, batch))
    k = int(docs.manifest["k"])
    leaves = np.nonzero(touched)[0]
    trained = {int(lv): np.asarray(ids) for lv, ids in _blocks(leaves, k, depth).items() if int(lv) in train_levels}
    result = train_blocks(cfg, docs.workdir, edir / "train", steps=n_steps, lr=float(lr or default_lr(cfg)),
                          edit=edit, levels=train_levels, batch_size=batch_size,
                          origin=(edir / ORIGIN_NAME, trained), quiet=quiet)
    entry = {"edit": edit, "verb": "learn", "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "corpus": str(corpus),
             "data": os.path.relpath(new, docs.workdir) if new.is_relative_to(docs.workdir) else str(new),
             "first_document": docs.total, "documents": int(man["documents"]["training"]),
             "leaves": leaves.tolist(), "levels": train_levels,
             "origin": os.path.relpath(edir / ORIGIN_NAME, docs.workdir / EDITS_DIR),
             "blocks": {lv: ids for lv, ids in _blocks(leaves, k, depth).items() if int(lv) in train_levels},
             "new_sequences": data["new_sequences"],
             "replay_sequences": data["repacked_sequences"], "replay": replay, **result,
             "seconds_total": round(time.time() - t0, 2)}
    append_log(docs.workdir, entry)
    shutil.rmtree(edir / "train", ignore_errors=True)  # re-made from the kept units whenever needed
    return entry


def default_lr(cfg) -> float:
    """The middle of the run's memory schedule, ``sqrt(memory_lr * memory_min_lr)``: a trained block is
    moved less than by the peak rate, which on bios kept old answers where the peak lost them."""
    t = cfg.train
    return float((t.memory_lr * max(t.memory_min_lr, 1e-12)) ** 0.5)


def _prepare_config(cfg, docs: RunDocuments):
    """The run's config as prepare reads it, with the run's tokenizer file."""
    import copy

    c = copy.deepcopy(cfg)
    c.data.tokenizer = os.fspath(docs.data_dir / docs.manifest["tokenizer"].get("path", "tokenizer.json"))
    return c


def _blocks(leaves: np.ndarray, k: int, depth: int) -> dict[str, list[int]]:
    """Per level, the nodes on the paths of ``leaves`` (what an edit trained)."""
    return {str(level): sorted({int(lf) // k ** (depth - level) for lf in leaves}) for level in range(1, depth + 1)}
