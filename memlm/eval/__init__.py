"""Evaluation: long-tail probes, multiple-choice tasks and perplexity under memory conditions."""

from memlm.eval.choice import ChoiceItem, evaluate_choice, load_choice_items
from memlm.eval.perplexity import evaluate_perplexity
from memlm.eval.plot import format_table, plot_buckets
from memlm.eval.probes import Probe, ProbeFileError, evaluate_probes, is_correct, load_probes
from memlm.infer.conditions import CONDITIONS, MemoryProvider, parse_conditions

__all__ = [
    "CONDITIONS", "ChoiceItem", "MemoryProvider", "Probe", "ProbeFileError", "evaluate_choice",
    "evaluate_perplexity", "evaluate_probes", "format_table", "is_correct", "load_choice_items", "load_probes",
    "parse_conditions", "plot_buckets",
]
