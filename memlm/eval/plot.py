"""Probe results as a table (rich) and as a grouped bar plot per bucket and condition (the paper's Fig. 1).

matplotlib is optional (the ``plot`` extra); :func:`plot_buckets` says how to install it when it
is missing, and the table needs only rich.
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = ["PlotUnavailableError", "format_table", "plot_buckets"]

CONDITION_LABELS = {"none": "anchor alone", "generic": "+ generic memory", "fetched": "+ fetched memory",
                    "blocked": "+ fetched, own subtree blocked"}
CONDITION_COLORS = {"none": "#9e9e9e", "generic": "#6fa8dc", "fetched": "#e69138", "blocked": "#8e7cc3"}


class PlotUnavailableError(RuntimeError):
    """matplotlib is not installed."""


def _buckets(conditions: Mapping[str, Any]) -> list[str]:
    labels: list[str] = []
    for r in conditions.values():
        labels.extend(b for b in r.get("by_bucket", {}) if b not in labels)
    return labels


def _perplexity(entry: Any) -> float | None:
    if isinstance(entry, Mapping):
        entry = entry.get("perplexity")
    return None if entry is None else float(entry)


def format_table(result: Mapping[str, Any], perplexity: Mapping[str, Any] | None = None, title: str | None = None,
                 width: int = 120) -> str:
    """Accuracy per condition (rows), overall and per bucket (columns), as text.

    ``result`` is :func:`~memlm.eval.probes.evaluate_probes`' output (or the eval JSON of
    docs/design.md §6, whose ``"perplexity"`` per condition is used when ``perplexity`` is not given:
    a number or a dict with a ``"perplexity"`` key, per condition).
    """
    from rich.console import Console
    from rich.table import Table

    conditions = result["conditions"]
    perplexity = perplexity if perplexity is not None else result.get("perplexity", {})
    perplexity = perplexity.get("conditions", perplexity) if isinstance(perplexity, Mapping) else {}
    buckets = _buckets(conditions)
    table = Table(title=title or result.get("probes"))
    table.add_column("condition", style="bold")
    table.add_column("n", justify="right")
    table.add_column("accuracy", justify="right")
    for b in buckets:
        table.add_column(f"bucket {b}", justify="right")
    if perplexity:
        table.add_column("perplexity", justify="right")
    for cond, r in conditions.items():
        row = [cond, str(r["n"]), f"{100 * r['accuracy']:.1f}%"]
        row += [f"{100 * r['by_bucket'][b]:.1f}%" if b in r.get("by_bucket", {}) else "-" for b in buckets]
        if perplexity:
            ppl = _perplexity(perplexity.get(cond))
            row.append("-" if ppl is None or math.isnan(ppl) else f"{ppl:.2f}")
        table.add_row(*row)
    out = io.StringIO()
    Console(file=out, width=width, force_terminal=False, color_system=None).print(table)
    return out.getvalue()


def plot_buckets(result: Mapping[str, Any], path: str | os.PathLike, title: str | None = None) -> Path:
    """Write a PNG bar plot: accuracy per bucket (x) for each memory condition (bars); returns the path.

    Buckets run in the result's order (the built-in probes: rarest ``"0"`` first); an ``all``
    group shows the overall accuracy.
    """
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise PlotUnavailableError("plotting needs matplotlib: pip install 'memlm[plot]' (or pip install matplotlib)"
                                   ) from None

    conditions = result["conditions"]
    buckets = _buckets(conditions)
    groups = [*buckets, "all"]
    n = len(conditions)
    width = 0.8 / max(n, 1)
    fig = Figure(figsize=(max(6.0, 1.4 * len(groups) + 1.5), 4.2), dpi=120)
    FigureCanvasAgg(fig)  # render with Agg without touching pyplot's global backend
    ax = fig.subplots()
    for i, (cond, r) in enumerate(conditions.items()):
        values = [100 * r.get("by_bucket", {}).get(b, math.nan) for b in buckets] + [100 * r["accuracy"]]
        xs = [g + (i - (n - 1) / 2) * width for g in range(len(groups))]
        bars = ax.bar(xs, values, width, label=CONDITION_LABELS.get(cond, cond), color=CONDITION_COLORS.get(cond))
        ax.bar_label(bars, fmt="%.0f", fontsize=7, padding=1)
    ax.set_xticks(range(len(groups)), groups)
    ax.set_xlabel("frequency bucket")
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 105)
    ax.set_title(title or result.get("probes") or "probe accuracy by frequency bucket")
    ax.legend(fontsize=8, frameon=False, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=2)
    ax.spines[["top", "right"]].set_visible(False)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path
