"""``memlm sweep collect``: one table of every run of a sweep (``SWEEP_DIR/results.csv`` and ``.json``).

A row per run, in the sweep's order: its knobs (the overrides that vary), parameter counts (anchor,
fetched memory, total memory i.e. the bank, generic memory), tokens, exact training FLOPs split as
``memlm info`` counts them (anchor matmuls, causal attention, fetched memory; a run's own and,
through its ``init_from`` chain, the total with its upstream stages), the final train loss, every
eval result and the last evaluation during training (``train_eval.*``). The table is a pure function
of the run directories: collecting twice writes the same bytes, and both files are written atomically.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from pathlib import Path
from typing import Any

from memlm.sweeps.runner import MARKER, final_step, run_status
from memlm.sweeps.spec import RunSpec, expand, load_sweep

FINAL_LOSS_WINDOW = 5  # the mean of the last logged losses: one logged step is noisy


def _atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    tmp.replace(path)


def _metrics(run_dir: Path) -> list[dict]:
    from memlm.train.metrics import read_metrics

    return read_metrics(run_dir)


def _eval_results(run_dir: Path) -> dict[str, Any]:
    """``eval.<probes>.<condition>.accuracy``, ``perplexity.<condition>`` and ``eval_loss`` (log perplexity)."""
    out: dict[str, Any] = {}
    ev = run_dir / "eval"
    if not ev.is_dir():
        return out
    for path in sorted(ev.glob("*.json")):
        if path.name.endswith(".outputs.json") or ".step" in path.name or path.name.startswith("harness_"):
            continue  # answers, results of earlier steps (memlm.eval.results), lm-eval's files
        res = json.loads(path.read_text())
        for cond, r in sorted(res.get("conditions", {}).items()):
            out[f"eval.{res.get('probes', path.stem)}.{cond}.accuracy"] = r.get("accuracy")
        for cond, ppl in sorted(res.get("perplexity", {}).items()):
            out[f"perplexity.{cond}"] = ppl
    ppl = out.get("perplexity.fetched", out.get("perplexity.none"))
    if ppl:
        out["eval_loss"] = math.log(ppl)
    return out


def run_row(out: Path, spec: RunSpec, by_name: dict[str, dict]) -> dict[str, Any]:
    """The table row of one run (upstream rows in ``by_name`` give the cumulative tokens and FLOPs)."""
    from memlm.model.accounting import accounting, attention_flops

    cfg = spec.cfg
    m = cfg.model
    run_dir = out / "runs" / spec.name
    acc = accounting(cfg)
    fl = acc["flops_per_token"]
    attn = attention_flops(m.n_layers, acc["seq_len"], m.n_heads, m.head_dim, tuple(m.get("local_layers", ())),
                           int(m.get("sliding_window", 0)))
    uses_memory = cfg.memory.type != "none" and cfg.train.mode != "anchor"
    records = _metrics(run_dir)
    step = final_step(run_dir) or 0
    tokens_per_step = cfg.train.batch_size * cfg.data.seq_len
    tokens = step * tokens_per_step
    per_token = dict(anchor=fl["anchor_train"] - attn, attention=attn, memory=fl["memory_train"] if uses_memory else 0)
    flops = {k: tokens * v for k, v in per_token.items()}
    losses = [r["loss"] for r in records if "loss" in r]
    marker = run_dir / MARKER
    done = json.loads(marker.read_text()) if marker.exists() else {}
    row: dict[str, Any] = {
        "name": spec.name, "stage": spec.stage, "status": run_status(out, spec), "init_from": spec.init_from,
        "mode": cfg.train.mode, "memory_type": cfg.memory.type if uses_memory else "none",
        "memory_sizes": "-".join(map(str, acc["memory_sizes"])) if uses_memory else "",
        "budget": spec.budget,
    }
    row.update({f"knob.{k}": spec.overrides.get(k) for k in sorted(spec.knobs)})
    row.update({
        "anchor_params": acc["anchor_params"], "anchor_non_embedding": acc["anchor_non_embedding"],
        "fetched_params": acc["fetched_params"] if uses_memory else 0,
        "memory_params": acc["bank_params"] if uses_memory else 0,
        "generic_params": acc["generic_params"] if uses_memory else 0,
        "runtime_params": acc["anchor_params"] + (acc["fetched_params"] if uses_memory else 0),
        "seq_len": acc["seq_len"], "batch_size": cfg.train.batch_size, "steps": cfg.train.steps, "steps_done": step,
        "tokens": tokens,
        "flops_per_token.anchor": per_token["anchor"], "flops_per_token.attention": per_token["attention"],
        "flops_per_token.memory": per_token["memory"],
        "flops.anchor": flops["anchor"], "flops.attention": flops["attention"], "flops.memory": flops["memory"],
        "flops": sum(flops.values()),
    })
    up = by_name.get(spec.init_from) if spec.init_from else None
    row["tokens_total"] = tokens + (up["tokens_total"] if up else 0)
    row["flops_total"] = row["flops"] + (up["flops_total"] if up else 0)
    row["loss_final"] = losses[-1] if losses else None
    row["loss_final_mean"] = sum(losses[-FINAL_LOSS_WINDOW:]) / len(losses[-FINAL_LOSS_WINDOW:]) if losses else None
    row["train_s"] = done.get("train_s")
    row.update(_eval_results(run_dir))
    row.update(_training_eval(records))
    return row


def _training_eval(records: list[dict]) -> dict[str, Any]:
    """The last evaluation during training (``train.eval_every``): ``train_eval.step`` and each scalar,
    ``eval/perplexity/fetched`` as ``train_eval.perplexity.fetched``."""
    rows = [r for r in records if any(k.startswith("eval/") and k != "eval/seconds" for k in r)]
    if not rows:
        return {}
    last = rows[-1]
    out: dict[str, Any] = {"train_eval.step": last["step"]}
    out.update({"train_eval." + k[len("eval/"):].replace("/", "."): v for k, v in sorted(last.items())
                if k.startswith("eval/") and k != "eval/seconds"})
    return out


def collect(sweep_file: str | Path, out: str | Path, quiet: bool = False) -> list[dict[str, Any]]:
    """The ``memlm sweep collect`` verb: write ``results.json`` and ``results.csv`` in ``out``; return the rows."""
    sweep_file, out = Path(sweep_file), Path(out)
    sweep = load_sweep(sweep_file)
    runs = expand(sweep)
    rows: list[dict[str, Any]] = []
    by_name: dict[str, dict] = {}
    for spec in runs:
        row = run_row(out, spec, by_name)
        by_name[spec.name] = row
        rows.append(row)
    columns = list(dict.fromkeys(k for r in rows for k in r))
    out.mkdir(parents=True, exist_ok=True)
    _atomic(out / "results.json", json.dumps({"sweep": sweep.name, "columns": columns, "runs": rows}, indent=1,
                                             sort_keys=False) + "\n")
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: "" if r.get(k) is None else r.get(k) for k in columns})
    _atomic(out / "results.csv", buf.getvalue())
    if not quiet:
        done = sum(r["status"] == "done" for r in rows)
        print(f"memlm sweep: collected {len(rows)} runs ({done} done) into {out / 'results.csv'} and "
              f"{out / 'results.json'}")
    return rows
