"""The paper's 13-task suite on lm-evaluation-harness, with its shots and the Avg-CK / Avg-SK means.

``memlm eval --tasks memlm_paper`` runs the tasks of docs/paper.md §5.1 through lm-eval's own task
definitions, each with the paper's number of shots: memlm writes one small task file per task
(``include:`` of lm-eval's file, a new name ``memlm_paper_<task>``, ``num_fewshot``) into
``RUN/eval/suite_tasks/`` and hands that folder to lm-eval. Avg-CK is the mean over the six
common-knowledge tasks of each task's metric (``SuiteTask.metric``), Avg-SK over the seven
specific-knowledge tasks, both in percent.

With network the datasets come from the Hugging Face hub as lm-eval defines them. Offline
(``--suite-data DIR``), each task reads local JSON-lines files: ``DIR/<lm-eval task>/<split>.jsonl``,
one row of the task's Hugging Face dataset per line (the same fields, e.g. ``arc_easy/test.jsonl``
with ``id``, ``question``, ``choices``, ``answerKey``). A split without a file is dropped (few-shot
examples then come from a split that is there); a task without its evaluation split is skipped with
a line, and the means say how many tasks they cover. docs/evaluation.md lists where lm-eval's
definitions differ from LLM-Foundry's, which the paper used.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["PAPER_SUITE", "SUITE", "SuiteError", "SuiteTask", "suite_averages", "write_suite_tasks"]

SUITE = "memlm_paper"  # the name ``--tasks`` takes
SPLITS = ("training_split", "validation_split", "test_split", "fewshot_split")


class SuiteError(ValueError):
    """The suite cannot be set up (a local data folder without any task); one line."""


@dataclasses.dataclass(frozen=True)
class SuiteTask:
    """One task of the suite: the paper's name, lm-eval's task, shots, the metric averaged, CK or SK."""

    name: str
    task: str
    shots: int
    metric: str
    group: str
    needs: tuple[str, ...] = ()  # modules lm-eval's definition imports beyond lm-eval's core


    @property
    def derived(self) -> str:
        return f"{SUITE}_{self.task}"


# docs/paper.md §5.1 (the paper's shots). Metrics: accuracy for choices (length-normalised where
# lm-eval offers it, as LLM-Foundry scores choices), exact match for answers generated.
PAPER_SUITE: tuple[SuiteTask, ...] = (
    SuiteTask("Lambada-OpenAI", "lambada_openai", 0, "acc", "CK"),
    SuiteTask("BoolQ", "boolq", 0, "acc", "CK"),
    SuiteTask("SQuAD", "squad", 3, "exact_match", "CK"),
    SuiteTask("Winograd", "wsc273", 3, "acc", "CK"),
    SuiteTask("WinoGrande", "winogrande", 5, "acc", "CK"),
    SuiteTask("CoQA", "coqa", 0, "em", "CK", needs=("transformers",)),  # its scoring imports SQuAD's metric
    SuiteTask("HellaSwag", "hellaswag", 0, "acc_norm", "SK"),
    SuiteTask("ARC-Easy", "arc_easy", 3, "acc_norm", "SK"),
    SuiteTask("ARC-Challenge", "arc_challenge", 3, "acc_norm", "SK"),
    SuiteTask("TriviaQA", "triviaqa", 3, "exact_match", "SK"),
    SuiteTask("PIQA", "piqa", 0, "acc_norm", "SK"),
    SuiteTask("OpenBookQA", "openbookqa", 10, "acc_norm", "SK"),
    SuiteTask("NaturalQuestions-Open", "nq_open", 0, "exact_match", "SK"),
)


# SQuAD v1.1 as LLM-Foundry asks it (lm-eval has v2, with unanswerable questions, and a completion
# variant, both as Python classes a task file cannot include): the passage, the question, a short answer.
SQUAD: dict[str, Any] = {
    "dataset_path": "rajpurkar/squad", "output_type": "generate_until", "training_split": "train",
    "validation_split": "validation",
    "doc_to_text": "Context: {{context}}\nQuestion: {{question}}\nAnswer:", "doc_to_target": "{{answers.text}}",
    "target_delimiter": " ", "generation_kwargs": {"until": ["\n"], "max_gen_toks": 32, "do_sample": False,
                                                   "temperature": 0.0},
    "filter_list": [{"name": "remove_whitespace",
                     "filter": [{"function": "remove_whitespace"}, {"function": "take_first"}]}],
    "metric_list": [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True, "ignore_case": True,
                     "ignore_punctuation": True}],
    "metadata": {"version": 1.0},
}
OWN_TASKS: dict[str, dict[str, Any]] = {"squad": SQUAD}


def _yaml(obj: dict[str, Any]) -> str:
    """A flat YAML mapping (values as JSON, which YAML reads)."""
    return "".join(f"{k}: {json.dumps(v)}\n" for k, v in obj.items())


@functools.cache
def _stock_index() -> dict:
    """lm-eval's index of its own task files (seconds to build: once per process)."""
    from lm_eval.tasks import TaskManager

    return TaskManager().task_index


def write_suite_tasks(folder: str | os.PathLike, data: str | os.PathLike | None = None,
                      suite: Sequence[SuiteTask] = PAPER_SUITE, say=print) -> list[SuiteTask]:
    """Write the suite's task files into ``folder``; returns the tasks that can run (offline: those
    whose evaluation split has a local file)."""
    index = _stock_index()
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("*.yaml"):
        old.unlink()
    kept = []
    for t in suite:
        missing = [m for m in t.needs if importlib.util.find_spec(m) is None]
        if missing:
            say(f"memlm eval: {t.name} skipped: lm-eval's definition of {t.task!r} imports {', '.join(missing)}, "
                "which is not installed")
            continue
        if t.task in OWN_TASKS:
            cfg = OWN_TASKS[t.task]
            spec: dict[str, Any] = {"task": t.derived, **cfg, "num_fewshot": t.shots}
        else:
            entry = index.get(t.task)
            if entry is None or entry.yaml_path is None:
                raise SuiteError(f"lm-eval has no task file for {t.task!r} ({t.name}); memlm's suite needs lm-eval "
                                 "0.4.13 or later")
            cfg = entry.cfg
            spec = {"include": str(entry.yaml_path), "task": t.derived, "num_fewshot": t.shots, "tag": []}
        if data is not None:
            local = _local(cfg, Path(data) / t.task)
            if local is None:
                say(f"memlm eval: {t.name} skipped: no evaluation split of {t.task!r} in {Path(data) / t.task}")
                continue
            spec.update(local)
        (folder / f"{t.derived}.yaml").write_text(_yaml(spec))
        kept.append(t)
    if not kept:
        raise SuiteError(f"no task of the suite has its data in {data}: expected files like "
                         f"{Path(str(data)) / 'arc_easy' / 'test.jsonl'}")
    return kept


def _local(cfg: dict[str, Any], where: Path) -> dict[str, Any] | None:
    """The dataset keys that read a task's splits from ``where/<split>.jsonl`` (None: no evaluation split)."""
    files = {}
    out: dict[str, Any] = {"dataset_path": "json", "dataset_name": None}
    for key in SPLITS:
        split = cfg.get(key)
        if split is None:
            continue
        path = where / f"{split}.jsonl"
        if path.is_file():
            files[split] = str(path.resolve())
        else:
            out[key] = None
    evaluated = cfg.get("test_split") or cfg.get("validation_split")
    if evaluated not in files:
        return None
    out["dataset_kwargs"] = {"data_files": files}
    return out


def _score(task_results: dict[str, Any], metric: str) -> float | None:
    """The task's ``metric`` under its first filter (``acc,none``, ``exact_match,remove_whitespace``)."""
    for key, value in task_results.items():
        if key.split(",")[0] == metric and not key.endswith("_stderr") and isinstance(value, int | float):
            return float(value)
    return None


def suite_averages(results: dict[str, Any], suite: Sequence[SuiteTask] = PAPER_SUITE) -> dict[str, Any]:
    """Per task its score (percent), and Avg-CK / Avg-SK with the number of tasks each covers."""
    scores: dict[str, float] = {}
    for t in suite:
        value = _score(results.get("results", {}).get(t.derived, {}), t.metric)
        if value is not None:
            scores[t.name] = 100 * value
    out: dict[str, Any] = {"tasks": scores}
    for group in ("CK", "SK"):
        names = [t.name for t in suite if t.group == group]
        have = [scores[n] for n in names if n in scores]
        out[f"Avg-{group}"] = sum(have) / len(have) if have else None
        out[f"Avg-{group} tasks"] = f"{len(have)}/{len(names)}"
    return out


def format_averages(averages: dict[str, Any], title: str) -> str:
    """A plain-text table of the suite's scores and means."""
    lines = [title] + [f"  {name:<24} {score:6.2f}" for name, score in averages["tasks"].items()]
    for group in ("CK", "SK"):
        value = averages[f"Avg-{group}"]
        shown = "     -" if value is None else f"{value:6.2f}"
        lines.append(f"  {'Avg-' + group:<24} {shown}  ({averages[f'Avg-{group} tasks']} tasks)")
    return "\n".join(lines)
