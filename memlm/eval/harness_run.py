"""``memlm eval --tasks``: lm-evaluation-harness tasks on a run, once per memory condition.

Each condition's results are lm-eval's own results dict, written to ``RUN/eval/harness_<condition>.json``
beside the probe results (one file per condition, so evaluating one condition never overwrites
another's) and printed as lm-eval's table. Local tasks (a task YAML and its data files) are found
with ``--include-path DIR``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from memlm.eval.results import save_merged
from memlm.infer.run import Run

__all__ = ["HarnessUnavailableError", "evaluate_harness", "evaluate_tasks", "require_lm_eval", "task_manager"]

INSTALL_HINT = "pip install 'memlm[eval]'"


class HarnessUnavailableError(ValueError):
    """lm-eval is not installed: one line naming the extra that installs it."""


def require_lm_eval() -> None:
    """Fail with one line when lm-eval cannot be imported."""
    try:
        import lm_eval  # noqa: F401
    except ImportError as e:
        raise HarnessUnavailableError(f"evaluating tasks needs lm-eval, which is not installed: {INSTALL_HINT} "
                                      f"({e})") from None


def task_manager(paths: Sequence[str], names: Sequence[str]):
    """lm-eval's task index over ``paths`` alone when every name is a task there (the index of lm-eval's own
    thousands of task files takes seconds to build); with lm-eval's own tasks otherwise."""
    from lm_eval.tasks import TaskManager

    if paths:
        local = TaskManager(include_path=list(paths), include_defaults=False)
        if all(n in local.all_tasks for n in names):
            return local
    return TaskManager(include_path=list(paths)) if paths else TaskManager()


def evaluate_tasks(run: Run, tasks: Sequence[str], conditions: Sequence[str], include_path: str | None = None,
                   num_fewshot: int | None = None, limit: int | float | None = None,
                   quiet: bool = False, suite_data: str | None = None) -> dict[str, Any]:
    """lm-eval results per condition (``{condition: results}``), each also saved as ``harness_<condition>.json``.

    ``memlm_paper`` among ``tasks`` stands for the paper's suite (``suite.py``; ``suite_data``: its local
    files), run with the paper's shots unless ``num_fewshot`` is given; its Avg-CK / Avg-SK are printed
    and saved under ``"memlm"``.
    """
    require_lm_eval()
    from lm_eval import simple_evaluate
    from lm_eval.utils import handle_non_serializable, make_table

    from memlm.eval.harness import MemlmLM
    from memlm.eval.suite import SUITE, format_averages, suite_averages, write_suite_tasks

    out_dir = run.workdir / "eval"
    out_dir.mkdir(parents=True, exist_ok=True)
    paths, names, suite = [include_path] if include_path else [], list(tasks), None
    if SUITE in names:
        suite = write_suite_tasks(out_dir / "suite_tasks", suite_data, say=(lambda _: None) if quiet else print)
        i = names.index(SUITE)
        names[i: i + 1] = [t.derived for t in suite]
        paths.append(str(out_dir / "suite_tasks"))
    manager = task_manager(paths, names)
    results: dict[str, Any] = {}
    for condition in conditions:
        res = simple_evaluate(model=MemlmLM(run=run, condition=condition), tasks=names, num_fewshot=num_fewshot,
                              limit=limit, task_manager=manager, log_samples=False, bootstrap_iters=0)
        res = json.loads(json.dumps(res, default=handle_non_serializable))
        res["memlm"] = {"run": str(run.workdir), "step": run.step, "condition": condition}
        if suite is not None:
            res["memlm"]["suite"] = suite_averages(res)  # over the tasks that ran, out of the paper's
        path = out_dir / f"harness_{condition}.json"
        res = save_merged(path, res, run.step, str(run.workdir), say=(lambda _: None) if quiet else print)
        results[condition] = res
        if not quiet:
            print(f"{condition} ({run.workdir}, step {run.step})")
            print(make_table(res))
            if suite is not None:
                print(format_averages(res["memlm"]["suite"], f"{SUITE} under {condition} (percent)"))
            print(f"memlm eval: wrote {path}")
    return results


def evaluate_harness(workdir: str, tasks: str, include_path: str | None = None, num_fewshot: int | None = None,
                     conditions: str | None = None, limit: float | None = None, data_dir: str | None = None,
                     overrides: dict[str, str] | None = None, suite_data: str | None = None) -> dict[str, Any]:
    """``memlm eval --tasks``: load the run, keep the conditions it has, evaluate the tasks under each."""
    from memlm.infer.conditions import parse_conditions
    from memlm.infer.run import load_run

    require_lm_eval()
    names = [t.strip() for t in tasks.split(",") if t.strip()]
    if not names:
        raise HarnessUnavailableError(f"--tasks {tasks!r} names no task")
    run = load_run(workdir, data_dir, overrides)
    wanted = parse_conditions(conditions or run.cfg.eval.conditions)
    conds = tuple(c for c in wanted if c in run.conditions)
    skipped = [c for c in wanted if c not in conds]
    if skipped:
        print(f"memlm eval: skipping {', '.join(skipped)} (this run has {', '.join(run.conditions)})")
    limit_n = int(limit) if limit is not None and limit >= 1 else limit
    return evaluate_tasks(run, names, conds, include_path, num_fewshot, limit_n, suite_data=suite_data)
