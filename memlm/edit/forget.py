"""``memlm forget RUN (--documents IDS | --entity NAME | --corpus FILE)``: remove documents from the bank.

The leaves whose units include those documents are found from prepare's kept paths; their blocks are
set back to their initial values (parameters, moments, counters) and retrained, with the anchor and
every other block frozen (the shallower levels too: they are read, not updated), on the leaf's
remaining documents only (re-packed by prepare's packer
without the forgotten ones). The reset blocks then hold nothing the forgotten documents taught
them: they are a function of the initial values, the frozen anchor and shallower blocks, and the
remaining documents.

What remains: the anchor (co-trained on every document) and the shallower levels' blocks on those
paths, shared with the leaves' neighbours, still learnt from the documents. ``--levels 1,2`` resets
those levels' nodes on the paths too, retraining them on every remaining document under them (a
level-l node covers ``1/k**l`` of the corpus: the cost grows k-fold a level up). Older checkpoints
and bank versions of the run keep what they held until later saves push them out
(``train.keep_checkpoints``); the edits log names the forgotten documents by number only.

A reset leaf that ``memlm learn`` taught (its pre-learn rows are kept for edit routing,
:mod:`memlm.edit.origin`) is retrained in two stages: on its remaining original documents, whose result
becomes its new pre-learn rows (the old ones held the forgotten documents and are dropped), then on its
remaining learned documents with every old sequence replayed, as ``learn`` trains.
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
from memlm.edit.learn import default_lr
from memlm.edit.origin import ORIGIN_NAME, drop_nodes, load_origins
from memlm.edit.repack import build

DEFAULT_EPOCHS = 8.0


def select(docs: RunDocuments, documents: str | None, entity: str | list[str] | None,
           corpus: str | None) -> np.ndarray:
    """The live documents named by exactly one of ``documents`` / ``entity`` / ``corpus``."""
    given = [x for x in (documents, entity, corpus) if x is not None]
    if len(given) != 1:
        raise EditError("name the documents to forget with one of --documents, --entity or --corpus")
    if documents is not None:
        chosen = docs.parse_ids(documents)
        what = f"--documents {documents}"
    elif entity is not None:
        names = [entity] if isinstance(entity, str) else list(entity)
        chosen = docs.mentioning(*names)
        what = f"--entity {names[0]!r}" + (f" (and {len(names) - 1} more)" if len(names) > 1 else "")
    else:
        from memlm.data.readers import CorpusError, iter_documents

        if not Path(corpus).exists():
            raise EditError(f"--corpus {corpus!r}: no such file or folder")
        try:
            texts = [d.text for d in iter_documents(corpus, report=None)]
        except CorpusError as e:
            raise EditError(f"--corpus {corpus!r}: {e}") from None
        chosen = docs.matching(texts)
        what = f"--corpus {corpus!r} ({len(texts)} documents)"
    live = docs.live(chosen)
    if len(live) == 0:
        why = "all of them were forgotten already" if len(chosen) else "no training document matches"
        raise EditError(f"{what}: nothing to forget ({why})")
    return live


def leaves_of(docs: RunDocuments, documents: np.ndarray, n_leaves: int) -> np.ndarray:
    """Bool per leaf: the leaves holding a unit of ``documents``."""
    hit = np.zeros(n_leaves, bool)
    for u in docs.units():
        sel = np.isin(u.documents(), documents)
        if sel.any():
            hit[np.unique(u.paths()[sel, -1])] = True
    return hit


def forget(workdir: str, *, documents: str | None = None, entity: str | list[str] | None = None,
           corpus: str | None = None,
           levels: str | None = None, steps: int | None = None, epochs: float = DEFAULT_EPOCHS,
           lr: float | None = None, batch_size: int | None = None, quiet: bool = False) -> dict[str, Any]:
    """Forget the chosen documents in run ``workdir`` (see the module docstring); returns the log entry."""
    docs = RunDocuments(workdir)
    cfg = docs.cfg
    if cfg.memory.type == "none" or cfg.train.mode == "anchor":
        raise EditError(f"{str(workdir)!r} has no memory bank: there are no blocks to forget from")
    k, depth = int(docs.manifest["k"]), int(docs.manifest["depth"])
    reset_levels = sorted(set(parse_levels(levels, depth)) | {depth}) if levels is not None else [depth]
    if steps is not None and steps < 1:
        raise EditError(f"--steps {steps}: give at least 1")
    gone = select(docs, documents, entity, corpus)
    t0 = time.time()
    n_leaves = k ** depth
    hit = leaves_of(docs, gone, n_leaves)
    nodes = {lv: np.unique(np.nonzero(hit)[0] // k ** (depth - lv)) for lv in reset_levels}
    # every leaf under a reset node retrains on its remaining documents
    under = np.zeros(n_leaves, bool)
    for lv, ids in nodes.items():
        under |= np.isin(np.arange(n_leaves) // k ** (depth - lv), ids)
    edit = docs.next_edit
    edir = docs.workdir / EDITS_DIR / f"{edit:04d}-forget"
    exclude = np.union1d(docs.forgotten, gone)
    # a retrained leaf that `learn` taught: retrained first on its original documents (its new pre-learn
    # rows, for edit routing), then taught its learned documents again (memlm/edit/origin.py)
    relearn = np.array(sorted(set(load_origins(docs.workdir).get(depth, {})) & set(np.nonzero(under)[0].tolist())),
                       np.int64)
    learned = np.arange(docs.sources[0].documents if len(relearn) else docs.total, docs.total, dtype=np.int64)
    data = build(edir / "train", docs, repack=under, exclude=np.union1d(exclude, learned))
    batch = int(batch_size or cfg.train.batch_size)
    if data["sequences"] == 0:  # the leaves held nothing else: reset, no training
        raise EditError("the affected leaves hold no other documents to retrain on; forgetting would leave their "
                        "blocks untrained (not supported)")
    n_steps = int(steps or default_steps(data["sequences"], epochs, batch))
    result = train_blocks(cfg, docs.workdir, edir / "train", steps=n_steps, lr=float(lr or cfg.train.memory_lr),
                          edit=edit, levels=reset_levels, reset=nodes, batch_size=batch_size, quiet=quiet)
    # kept pre-learn rows of the reset blocks held the forgotten documents: they go (the leaves relearned
    # below get new ones, the rows the first retraining left)
    scrub = {lv: ids for lv, ids in nodes.items() if lv != depth}
    scrub[depth] = np.union1d(nodes[depth], relearn)
    origin_rows = drop_nodes(docs.workdir, scrub)
    extra: dict[str, Any] = {}
    if len(relearn):
        mask = np.zeros(n_leaves, bool)
        mask[relearn] = True
        again = build(edir / "relearn", docs, repack=mask, exclude=exclude)
        n2 = int(steps or default_steps(again["sequences"], epochs, batch))
        r2 = train_blocks(cfg, docs.workdir, edir / "relearn", steps=n2, lr=default_lr(cfg), edit=edit,
                          levels=[depth], batch_size=batch_size,
                          origin=(edir / ORIGIN_NAME, {depth: relearn}), quiet=quiet)
        extra = {"relearned": {"leaves": relearn.tolist(), "sequences": again["sequences"], **r2},
                 "origin": os.path.relpath(edir / ORIGIN_NAME, docs.workdir / EDITS_DIR),
                 **{key: r2.get(key) for key in ("step", "bank_version", "generic_version")}}
    entry = {"edit": edit, "verb": "forget", "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
             "documents": gone.tolist(), "levels": reset_levels,
             "reset": {str(lv): ids.tolist() for lv, ids in nodes.items()},
             "leaves_retrained": np.nonzero(under)[0].tolist(), "retrain_sequences": data["sequences"],
             "origin_rows_dropped": origin_rows, **result, **{k: v for k, v in extra.items() if v is not None},
             "seconds_total": round(time.time() - t0, 2)}
    append_log(docs.workdir, entry)
    for part in ("train", "relearn"):
        shutil.rmtree(edir / part, ignore_errors=True)
    if not (edir / ORIGIN_NAME).exists():
        shutil.rmtree(edir, ignore_errors=True)
    return entry
