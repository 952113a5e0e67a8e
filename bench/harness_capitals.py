"""The capital probe as a 4-choice task through lm-evaluation-harness, on a trained facts run.

Each probe item ("The capital of {country} is", answer) becomes a multiple-choice question whose
distractors are other countries' capitals, drawn with a fixed seed; lm-eval scores the choices
by log-likelihood under the ``none``, ``generic`` and ``fetched`` memories (the retrieval key is
the question, docs/paper.md App. B). Fetched memory should beat both.

    .venv/bin/python bench/harness_capitals.py [--run runs/demo/memory] [--data data/facts] [--limit N]

Needs ``make demo`` (it writes runs/demo/memory and data/facts) and lm-eval (``pip install 'memlm[eval]'``).
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

TASK = "memlm_capitals_mc4"


def build_capital_task(probe_file: str | Path, out_dir: str | Path, n_choices: int = 4, seed: int = 0,
                       task: str = TASK) -> str:
    """Write ``out_dir/<task>.yaml`` and its JSONL data from a capital probe file; returns the task name.

    Distractors are ``n_choices - 1`` other capitals (distinct, never the answer), and the answer's
    position is drawn too, all from ``random.Random(seed)``: the same file gives the same task.
    """
    items = [json.loads(line) for line in Path(probe_file).read_text().splitlines() if line.strip()]
    capitals = sorted({it["answer"] for it in items})
    if len(capitals) < n_choices:
        raise ValueError(f"{probe_file}: {len(capitals)} distinct capitals, fewer than {n_choices} choices")
    rng = random.Random(seed)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for it in items:
        others = rng.sample([c for c in capitals if c != it["answer"]], n_choices - 1)
        gold = rng.randrange(n_choices)
        choices = others[:gold] + [it["answer"]] + others[gold:]
        rows.append({"question": it["prompt"], "choices": choices, "gold": gold, "bucket": it.get("bucket")})
    data = out / f"{task}.jsonl"
    data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    (out / f"{task}.yaml").write_text(
        f"task: {task}\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {json.dumps(str(data.resolve()))}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        'doc_to_text: "{{question}}"\n'
        'doc_to_choice: "{{choices}}"\n'
        'doc_to_target: "{{gold}}"\n'
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
    )
    return task


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", default="runs/demo/memory")
    ap.add_argument("--data", default="data/facts")
    ap.add_argument("--out", default="runs/demo/harness_capitals", help="where the task files are written")
    ap.add_argument("--limit", type=int, default=None)
    args = ap.parse_args()

    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    from memlm.eval.harness import MemlmLM
    from memlm.infer.run import load_run

    task = build_capital_task(Path(args.data) / "probes" / "capital.jsonl", args.out)
    run = load_run(args.run)
    manager = TaskManager(include_path=args.out)
    acc = {}
    for condition in ("none", "generic", "fetched"):
        res = simple_evaluate(model=MemlmLM(run=run, condition=condition), tasks=[task], task_manager=manager,
                              limit=args.limit, log_samples=False, bootstrap_iters=0)
        acc[condition] = res["results"][task]["acc,none"]
        print(f"{condition:>8}: accuracy {100 * acc[condition]:.1f}%")
    ok = acc["fetched"] > acc["generic"] and acc["fetched"] > acc["none"]
    print(f"fetched > generic and fetched > none: {ok}")


if __name__ == "__main__":
    main()
