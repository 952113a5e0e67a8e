"""Evaluation during training (``train.eval_every``): held-out perplexity and probe accuracy, as rows of
``metrics.jsonl`` and TensorBoard scalars.

At an evaluation step the loop saves a checkpoint (and waits for it), and this module opens that
checkpoint as ``memlm eval`` opens a run (``memlm.infer.run.load_run``): the same anchor, banks,
tree, embedder and routing settings, so a number logged during training is the number
``memlm eval`` gives for that step. Evaluating from the checkpoint, not from the training state,
keeps the bank's exchange out of evaluation (the training step holds only the fetched rows of a
sharded bank), and costs one checkpoint read per evaluation (the scoring compiles once per run):
keep ``eval_every`` a multiple of ``checkpoint_every`` for large banks.

Scalars (each condition of ``eval.conditions`` the run has):
``eval/perplexity/<condition>`` on the data directory's held-out documents (``eval.heldout_documents``)
and ``eval/<probes>/accuracy/<condition>`` for each of its probe files, on at most
``train.eval_probes`` probes spread evenly over the file (0: all).
"""

from __future__ import annotations

import os
from typing import Any

import ml_collections
import numpy as np

__all__ = ["evaluate_step", "format_eval"]


_ANCHORS: dict[str, Any] = {}  # run directory -> the anchor its evaluations score with


def _spread(items: list, n: int) -> list:
    """``n`` items spread evenly over the list (all when ``n`` is 0 or not smaller)."""
    if n <= 0 or n >= len(items):
        return items
    return [items[int(i)] for i in np.linspace(0, len(items) - 1, n).round().astype(int)]


def evaluate_step(cfg: ml_collections.ConfigDict, workdir: str | os.PathLike) -> dict[str, float]:
    """The evaluation scalars of the run's newest checkpoint (the one the loop has just saved)."""
    from memlm.eval.perplexity import evaluate_perplexity
    from memlm.eval.probes import evaluate_probes, load_probes
    from memlm.eval.run import heldout_documents, probe_files_of
    from memlm.infer.beam import provider_of
    from memlm.infer.conditions import parse_conditions
    from memlm.infer.rag import template_prefix
    from memlm.infer.run import load_run

    key = os.fspath(workdir)
    run = load_run(workdir, fn=_ANCHORS.get(key))
    _ANCHORS[key] = run.fn  # the next evaluation of this run reuses its compiled scoring and decoding
    ev = cfg.eval
    conds = tuple(c for c in parse_conditions(ev.conditions) if c in run.conditions)
    provider = provider_of(run)
    out: dict[str, float] = {}
    docs, texts = heldout_documents(run)
    if docs:
        ppl = evaluate_perplexity(run.fn, run.params, docs, texts, provider, conds, seq_len=cfg.data.seq_len,
                                  batch_size=ev.batch_size, template=template_prefix(run.tokenizer))["conditions"]
        out.update({f"eval/perplexity/{c}": r["perplexity"] for c, r in ppl.items()})
    try:
        files = probe_files_of(run, None)
    except FileNotFoundError:  # a corpus without built-in probes: perplexity only
        files = []
    for path in files:
        probes = _spread(load_probes(path), int(cfg.train.eval_probes))
        res = evaluate_probes(run.fn, run.params, run.tokenizer, probes, provider, conds,
                              max_new_tokens=ev.max_new_tokens, batch_size=ev.batch_size)["conditions"]
        out.update({f"eval/{path.stem}/accuracy/{c}": r["accuracy"] for c, r in res.items()})
    return out


def format_eval(step: int, scalars: dict[str, Any]) -> str:
    """One line: ``eval step N: perplexity none 3.21 fetched 2.87; capital none 12.0% fetched 40.0%``."""
    groups: dict[str, list[str]] = {}
    for key, value in scalars.items():
        _, what, *rest = key.split("/")
        if what == "perplexity":
            groups.setdefault("perplexity", []).append(f"{rest[0]} {value:.3f}")
        else:
            groups.setdefault(what, []).append(f"{rest[-1]} {100 * value:.1f}%")
    return f"eval step {step}: " + "; ".join(f"{name} {' '.join(v)}" for name, v in groups.items())
