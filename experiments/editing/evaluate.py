"""Evaluate a run on the editing split's probe groups (``bios_split.py``): new, forget and kept people.

Greedy answers under ``none`` and ``fetched``, with ``fetched`` routed these ways:

- ``greedy``: the question's embedding, nearest centroid per level, with edit routing after a learn
  (the default);
- ``plain``: greedy without edit routing (``eval.route_edits=false``);
- ``descent``: the likelihood descent ``docs/routing.md`` picked for bios (width 2, posterior 0.9,
  fallback to the anchor alone);
- ``descent_all``: the same with width ``tree.k``, so every leaf is scored at the last level;
- ``document``: the question answered with the memory one of the person's own biographies fetches
  (the probe's retrieval key is that document, routed greedily without edit routing): what the blocks
  of the person's leaf hold, whatever the question's routing finds.

Writes ``OUT`` as JSON: ``{route: {group/probe: {condition: {"accuracy", "by_bucket", "n_by_bucket",
"correct"}}}}``.

    python experiments/editing/evaluate.py RUN SPLIT_DIR OUT.json [ROUTE,...]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROUTES = {
    "greedy": {},
    "plain": {"eval.route_edits": "false"},  # greedy without edit routing (memlm/infer/edits.py)
    "document": {"eval.route_edits": "false"},
    "descent": {"eval.route_descent": "likelihood", "eval.route_descent_width": "2", "eval.route_posterior": "0.9",
                "eval.route_fallback": "none"},
    # width tree.k (8 in the tiny preset): every child of every level-1 node, i.e. every leaf, is scored
    "descent_all": {"eval.route_descent": "likelihood", "eval.route_descent_width": "8",
                    "eval.route_posterior": "0.9", "eval.route_fallback": "none"},
}
GROUPS = ("new", "forget", "kept")
PROBES = ("hometown", "birth_year")


def first_biographies(split: Path) -> dict[str, str]:
    """Each person's first biography in the split's corpora (the ``document`` route's retrieval key)."""
    out: dict[str, str] = {}
    for name in ("old.jsonl", "new.jsonl"):
        for line in (split / name).read_text(encoding="utf-8").splitlines():
            d = json.loads(line)
            if d.get("kind") == "biography":
                out.setdefault(d["entity"], d["text"])
    return out


def evaluate(workdir: str, split: Path, routes: tuple[str, ...] = tuple(ROUTES)) -> dict:
    """Every group and probe under none / fetched, per route (see the module docstring)."""
    import dataclasses

    from memlm.eval.probes import evaluate_probes, load_probes
    from memlm.eval.run import provider_of
    from memlm.infer.run import load_run

    out: dict = {}
    biography = first_biographies(split)
    for route in routes:
        overrides = ROUTES[route]
        run = load_run(workdir, overrides=overrides)
        provider = provider_of(run)
        out[route] = {"step": run.step}
        conds = ("none", "fetched") if route in ("greedy", "plain") else ("fetched",)
        for g in GROUPS:
            for p in PROBES:
                probes = load_probes(split / "probes" / f"{g}_{p}.jsonl")
                if route == "document":
                    probes = [dataclasses.replace(q, context=biography[q.entity]) for q in probes]
                r = evaluate_probes(run.fn, run.params, run.tokenizer, probes, provider, conds,
                                    max_new_tokens=run.cfg.eval.max_new_tokens, batch_size=run.cfg.eval.batch_size,
                                    return_outputs=True)
                for c in conds:
                    r["conditions"][c]["correct"] = [o["correct"] for o in r["outputs"][c]]
                out[route][f"{g}/{p}"] = r["conditions"]
                print(route, g, p, {c: round(100 * r["conditions"][c]["accuracy"], 1) for c in conds}, flush=True)
    return out


if __name__ == "__main__":
    chosen = tuple(sys.argv[4].split(",")) if len(sys.argv) > 4 else tuple(ROUTES)
    result = evaluate(sys.argv[1], Path(sys.argv[2]), chosen)
    Path(sys.argv[3]).write_text(json.dumps(result, indent=1))
