"""``memlm eval``: load a run, build its memory conditions, score probes and perplexity, report.

A run is evaluated with the data directory it was trained on (recorded in its config.json):
the same tokenizer, the same tree and the same embedder, so an evaluation context routes
through exactly the code that routed the training documents. Results go to
``RUN_DIR/eval/<probes>.json`` (docs/design.md §6), a table on the console and a bar plot per bucket
and condition (``RUN_DIR/eval/<probes>.png``). When probes say which training documents they are
about and the run has a tree, the results also hold ``"routing"``: the share of probes whose
retrieval key routes to the node, at each level, that holds most of those documents
(``agreement.py``). With ``eval.route_beam`` > 1 or ``eval.route_beam_generic``, ``fetched``
chooses among beam candidates by the anchor's likelihood of the retrieval text (``beam.py``), and
the agreement is that of the chosen paths.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from memlm.eval.results import save_merged
from memlm.infer.beam import provider_of, uses_beam
from memlm.infer.conditions import parse_conditions
from memlm.infer.rag import template_prefix
from memlm.infer.run import Run, load_run


def heldout_documents(run: Run) -> tuple[list[np.ndarray], list[str]]:
    path = run.data_dir / "heldout.jsonl"
    if not path.exists():
        return [], []
    texts = [json.loads(line)["text"] for line in path.read_text().splitlines() if line.strip()]
    texts = texts[: run.cfg.eval.heldout_documents]
    eot = run.tokenizer.eot_id  # each document as prepare packs it: its template, its text, the EOT
    docs = [np.concatenate([ids, [eot]]).astype(np.int32) for ids in run.tokenizer.encode_batch(texts)]
    return docs, texts


def routing_of(run: Run, probes: list, where: str, quiet: bool = False, provider=None) -> dict | None:
    """Routing agreement of the probes that name their documents (None: no tree, or no probe names any);
    ``provider`` (default the run's memory) says which path ``fetched`` takes and which texts it gates."""
    from memlm.data.records import read_manifest
    from memlm.eval.agreement import TrainingLeaves, routing_agreement

    if run.memory.tree is None or not any(p.documents is not None or p.entity is not None for p in probes):
        return None
    leaves = TrainingLeaves(run.data_dir, read_manifest(run.data_dir), run.cfg.tree.embed_window)
    if not leaves.has_entities and all(p.documents is None for p in probes):
        if not quiet:
            print(f"memlm eval: no routing agreement for {where}: its probes name entities, and {str(run.data_dir)!r} "
                  "has no entity leaves (prepared before they were recorded: run `memlm prepare` again)")
        return None
    targets = leaves.of_probes(probes, where)
    provider = provider or run.memory
    keys = [p.key for p in probes]
    paths = provider.paths(keys, "fetched")
    gated = provider.gated(keys, paths) if run.cfg.eval.route_gate != "off" or uses_beam(run.cfg) else None
    return routing_agreement(paths, targets, [p.bucket for p in probes], run.memory.tree.k, gated)


def evaluate_run(run: Run, probe_files: list[Path], conditions: tuple[str, ...], quiet: bool = False) -> dict:
    """Perplexity on the held-out documents and accuracy on each probe file, per condition."""
    from memlm.eval.agreement import format_agreement
    from memlm.eval.perplexity import evaluate_perplexity
    from memlm.eval.plot import PlotUnavailableError, format_table, plot_buckets
    from memlm.eval.probes import evaluate_probes, load_probes

    ev = run.cfg.eval
    out_dir = run.workdir / "eval"
    out_dir.mkdir(parents=True, exist_ok=True)
    docs, texts = heldout_documents(run)
    provider = provider_of(run)
    if not quiet and hasattr(provider, "leaves"):
        print(f"memlm eval: edit routing: `fetched` takes a learned leaf ({len(provider.leaves)} of them) where "
              f"`memlm learn` raised a text's likelihood by {run.cfg.eval.route_edit_gain:g} nats "
              "(eval.route_edits=false: off)")
    ppl = {}
    if docs:
        ppl = evaluate_perplexity(run.fn, run.params, docs, texts, provider, conditions,
                                  seq_len=run.cfg.data.seq_len, batch_size=ev.batch_size,
                                  template=template_prefix(run.tokenizer))["conditions"]
    from memlm.eval.ppl_key import format_key_table, parse_perplexity_key, prefix_perplexity

    n_key = parse_perplexity_key(ev.perplexity_key)
    ppl_prefix = (prefix_perplexity(run.fn, run.params, run.tokenizer, docs, texts, provider, conditions, n_key,
                                    run.cfg.data.seq_len, ev.batch_size) if docs and n_key else None)
    if ppl_prefix and not quiet:
        print(format_key_table(ppl, ppl_prefix))
    results = {}
    if not probe_files:  # --perplexity-only
        result = {"run": str(run.workdir), "step": run.step, "perplexity": {c: ppl[c]["perplexity"] for c in ppl}}
        if ppl_prefix:
            result["perplexity_prefix"] = ppl_prefix
        results["perplexity"] = save_merged(out_dir / "perplexity.json", result, run.step, str(run.workdir))
        if not quiet:
            print(f"held-out perplexity ({run.workdir}, step {run.step}, {len(docs)} documents): "
                  + ", ".join(f"{c} {r['perplexity']:.3f}" for c, r in ppl.items()))
            print(f"memlm eval: wrote {out_dir / 'perplexity.json'}")
        return results
    for path in probe_files:
        probes = load_probes(path)
        res = evaluate_probes(run.fn, run.params, run.tokenizer, probes, provider, conditions,
                              max_new_tokens=ev.max_new_tokens, batch_size=ev.batch_size, return_outputs=True)
        name = path.stem
        result = {"probes": name, "file": str(path), "run": str(run.workdir), "step": run.step,
                  "conditions": res["conditions"],
                  "perplexity": {c: ppl[c]["perplexity"] for c in ppl}}
        if ppl_prefix:
            result["perplexity_prefix"] = ppl_prefix
        routing = routing_of(run, probes, str(path), quiet, provider)
        if routing is not None:
            result["routing"] = routing
        result = save_merged(out_dir / f"{name}.json", result, run.step, str(run.workdir))
        save_merged(out_dir / f"{name}.outputs.json", {"run": str(run.workdir), "step": run.step, **res["outputs"]},
                    run.step, str(run.workdir), say=lambda _: None)
        if not quiet:
            print(format_table(result, title=f"{name} ({run.workdir}, step {run.step})"))
            if routing is not None:
                print(format_agreement(routing, title=f"{name}: routing agreement"))
        try:
            plot_buckets(result, out_dir / f"{name}.png", title=f"{name}: accuracy by frequency bucket")
        except PlotUnavailableError as e:
            print(f"memlm eval: no plot ({e})")
        results[name] = result
    if not quiet:
        print(f"memlm eval: wrote {', '.join(str(out_dir / f'{n}.json') for n in results)} and plots in {out_dir}")
    return results


def probe_files_of(run: Run, probes: str | None) -> list[Path]:
    if probes:
        return [Path(probes)]
    from memlm.data.records import read_manifest

    files = read_manifest(run.data_dir).get("probes", {})
    if not files:
        raise FileNotFoundError(f"no probe file given and {str(run.data_dir)!r} has no built-in probes: "
                                "pass --probes FILE.jsonl")
    return [run.data_dir / f for f in files.values()]


def evaluate(workdir: str | Path, probes: str | None = None, conditions: str | None = None,
             data_dir: str | Path | None = None, overrides: dict[str, str] | None = None,
             perplexity_only: bool = False) -> dict:
    """The ``memlm eval`` verb (a probe file is checked before the run is loaded)."""
    from memlm.eval.probes import load_probes

    if probes and not perplexity_only:
        load_probes(probes)  # a bad file fails in one line before minutes of loading
    run = load_run(workdir, data_dir, overrides)
    wanted = parse_conditions(conditions or run.cfg.eval.conditions)
    conds = tuple(c for c in wanted if c in run.conditions)
    skipped = [c for c in wanted if c not in conds]
    if skipped:
        print(f"memlm eval: skipping {', '.join(skipped)} (this run has {', '.join(run.conditions)})")
    return evaluate_run(run, [] if perplexity_only else probe_files_of(run, probes), conds)
