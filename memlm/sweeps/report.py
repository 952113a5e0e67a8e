"""``memlm sweep report``: fits, plots and a markdown table from a collected sweep.

Writes ``SWEEP_DIR/report/``: ``fits.json`` (the parametric law and the IsoFLOP power laws with
their bootstrap intervals, or why a fit was not possible), ``loss_vs_params.png`` (loss against
runtime parameters, one line per stage and memory configuration, as the paper's Fig. 3 / 4a plot
a metric against size per memory setting), ``isoflop.png`` (loss against N per budget with the
fitted parabolas, and N*(C)) when the sweep has budgets, and ``report.md``.
"""

from __future__ import annotations

import json
import math
import os
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from memlm.sweeps.fit import FitError, fit_isoflop, fit_parametric, predict

COLORS = ["#1f77b4", "#e69138", "#6aa84f", "#cc0000", "#8e7cc3", "#7f6000", "#e377c2", "#17becf"]


def _atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    tmp.replace(path)


def loss_key(rows: list[dict]) -> str:
    """The held-out loss (log perplexity) when every finished run was evaluated, else the final train loss."""
    done = [r for r in rows if r["status"] == "done"]
    return "eval_loss" if done and all(r.get("eval_loss") is not None for r in done) else "loss_final_mean"


def _label(row: dict) -> str:
    if not row["memory_sizes"]:
        return f"{row['stage']}: no memory"
    return f"{row['stage']}: r=({row['memory_sizes'].replace('-', ',')})"


def fits(rows: list[dict], key: str, n_boot: int = 200) -> dict[str, Any]:
    """Both fits over the finished runs (a fit that cannot be made says why)."""
    done = [r for r in rows if r["status"] == "done" and r.get(key) is not None]
    out: dict[str, Any] = {"loss": key, "runs": len(done)}
    try:
        out["parametric"] = fit_parametric([r["runtime_params"] for r in done], [r["tokens_total"] for r in done],
                                           [r["memory_params"] for r in done], [r[key] for r in done], n_boot=n_boot)
        out["parametric"]["variables"] = {"N": "runtime_params (anchor + fetched)", "D": "tokens_total",
                                          "M": "memory_params (bank)"}
    except FitError as e:
        out["parametric"] = {"skipped": str(e)}
    budgeted = [r for r in done if r.get("budget") is not None]
    try:
        if not budgeted:
            raise FitError("the sweep has no stage with budgets (IsoFLOP runs)")
        out["isoflop"] = fit_isoflop([r["runtime_params"] for r in budgeted], [r["tokens"] for r in budgeted],
                                     [r["flops"] for r in budgeted], [r[key] for r in budgeted],
                                     budgets=[r["budget"] for r in budgeted], n_boot=n_boot)
        out["isoflop"]["variables"] = {"N": "runtime_params", "D": "tokens", "C": "flops (the run's own)"}
    except FitError as e:
        out["isoflop"] = {"skipped": str(e)}
    return out


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({"font.size": 9, "axes.grid": True, "grid.alpha": 0.3, "axes.spines.top": False,
                         "axes.spines.right": False})
    return plt


def plot_loss_vs_params(rows: list[dict], key: str, fit: dict | None, path: Path, title: str) -> Path | None:
    """Loss against runtime parameters, one line per (stage, memory configuration)."""
    lines: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        if r["status"] == "done" and r.get(key) is not None and r.get("budget") is None:
            lines[_label(r)].append(r)
    if not lines:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.2, 3.6), dpi=110)
    for i, (label, rs) in enumerate(lines.items()):
        rs = sorted(rs, key=lambda r: r["runtime_params"])
        x = np.array([r["runtime_params"] for r in rs], float)
        y = np.array([r[key] for r in rs], float)
        bank = rs[0]["memory_params"]
        text = label + (f", bank {bank / 1e6:.2g}M" if bank else "")
        color = COLORS[i % len(COLORS)]
        ax.plot(x, y, "o-", color=color, label=text, ms=4, lw=1.4)
        if fit and "theta" in fit and len(x) > 1:
            grid = np.geomspace(x.min(), x.max(), 50)
            d = np.exp(np.mean(np.log([r["tokens_total"] for r in rs])))
            ratio = np.mean([r["memory_params"] / r["runtime_params"] for r in rs])
            ax.plot(grid, predict(fit, grid, np.full_like(grid, d), ratio * grid), "--", color=color, lw=0.9,
                    alpha=0.7)
    ax.set_xscale("log")
    ax.set_xlabel("runtime parameters (anchor + fetched memory)")
    ax.set_ylabel("held-out loss" if key == "eval_loss" else "final train loss")
    ax.set_title(title + (" (dashed: parametric fit)" if fit and "theta" in fit else ""), fontsize=9)
    ax.legend(fontsize=7, frameon=False)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_isoflop(iso: dict, path: Path, title: str) -> Path:
    """Left: loss against N per budget with the fitted parabolas; right: N*(C) and its power law."""
    plt = _plt()
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(8.4, 3.4), dpi=110)
    for i, c in enumerate(iso["curves"]):
        color = COLORS[i % len(COLORS)]
        n = np.asarray(c["n"], float)
        ax.plot(n, c["loss"], "o", color=color, ms=4, label=f"C = {c['budget']:.2g}")
        if c["parabola"]:
            grid = np.geomspace(n.min(), n.max(), 60)
            ax.plot(grid, np.polyval(c["parabola"], np.log(grid)), "-", color=color, lw=1.2)
        if c["n_opt"]:
            ax.plot([c["n_opt"]], [np.polyval(c["parabola"], math.log(c["n_opt"]))], "*", color=color, ms=10)
    ax.set_xscale("log")
    ax.set_xlabel("runtime parameters N")
    ax.set_ylabel("loss")
    ax.set_title("IsoFLOP profiles", fontsize=9)
    ax.legend(fontsize=7, frameon=False)
    cs = np.asarray(iso["budgets"], float)
    ns = np.asarray(iso["n_opt"], float)
    bx.plot(cs, ns, "o", color="k", ms=4)
    grid = np.geomspace(cs.min(), cs.max(), 20)
    ns_fit = iso["n_star"]
    ci = ns_fit["interval"]
    label = f"N* = {ns_fit['coefficient']:.3g} C^{ns_fit['exponent']:.3f}" + (f" [{ci[0]:.3f}, {ci[1]:.3f}]"
                                                                             if ci else "")
    bx.plot(grid, ns_fit["coefficient"] * grid ** ns_fit["exponent"], "-", color=COLORS[0], label=label)
    bx.set_xscale("log")
    bx.set_yscale("log")
    bx.set_xlabel("training FLOPs C")
    bx.set_ylabel("N*")
    bx.set_title("compute-optimal size", fontsize=9)
    bx.legend(fontsize=7, frameon=False)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def _num(v: Any) -> str:
    if v is None or v == "":
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, int):
        return f"{v:,}" if abs(v) < 1e7 else f"{v:.3g}"
    return str(v)


def markdown(sweep: str, rows: list[dict], key: str, fitted: dict) -> str:
    """The report as markdown: the fits, then a table of every run."""
    out = [f"# Sweep {sweep}", "", f"Loss: `{key}`; {fitted['runs']} finished runs.", ""]
    p = fitted["parametric"]
    out.append("## Parametric law")
    if "skipped" in p:
        out += ["", f"Not fitted: {p['skipped']}.", ""]
    else:
        out += ["", f"`{p['formula']}` (N: anchor + fetched, D: tokens seen, M: bank); RMSE {p['rmse']:.4f}, "
                f"{p['bootstrap']} bootstrap fits, {100 * p['level']:.0f}% intervals.", "",
                "| parameter | value | interval |", "|---|---|---|"]
        for name, v in p["params"].items():
            ci = v["interval"]
            out.append(f"| {name} | {v['value']:.4g} | {'-' if ci is None else f'[{ci[0]:.4g}, {ci[1]:.4g}]'} |")
        out.append("")
    iso = fitted["isoflop"]
    out.append("## IsoFLOP")
    if "skipped" in iso:
        out += ["", f"Not fitted: {iso['skipped']}.", ""]
    else:
        out += [""]
        for what in ("n_star", "d_star"):
            v = iso[what]
            ci = v["interval"]
            out.append(f"- {what[0].upper()}*(C) = {v['coefficient']:.4g} C^{v['exponent']:.4f}"
                       + (f", exponent in [{ci[0]:.4f}, {ci[1]:.4f}]" if ci else ""))
        out.append("")
    out += ["## Runs", "", "| run | stage | status | memory | anchor params | fetched | bank | tokens | FLOPs | "
            f"{key} |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['name']} | {r['stage']} | {r['status']} | {r['memory_sizes'] or 'none'} | "
                   f"{_num(r['anchor_params'])} | {_num(r['fetched_params'])} | {_num(r['memory_params'])} | "
                   f"{_num(r['tokens'])} | {_num(float(r['flops']))} | {_num(r.get(key))} |")
    return "\n".join(out) + "\n"


def report(sweep_file: str | Path, out: str | Path, n_boot: int = 200, quiet: bool = False) -> dict:
    """The ``memlm sweep report`` verb (collects first, so the report matches the run directories)."""
    from memlm.sweeps.collect import collect

    out = Path(out)
    rows = collect(sweep_file, out, quiet=True)
    sweep = json.loads((out / "results.json").read_text())["sweep"]
    key = loss_key(rows)
    fitted = fits(rows, key, n_boot=n_boot)
    rep = out / "report"
    rep.mkdir(parents=True, exist_ok=True)
    _atomic(rep / "fits.json", json.dumps(fitted, indent=1, default=float) + "\n")
    written = [rep / "fits.json"]
    try:
        p = plot_loss_vs_params(rows, key, fitted["parametric"], rep / "loss_vs_params.png", f"sweep {sweep}")
        if p:
            written.append(p)
        if "skipped" not in fitted["isoflop"]:
            written.append(plot_isoflop(fitted["isoflop"], rep / "isoflop.png", f"sweep {sweep}: IsoFLOP"))
    except ImportError as e:
        print(f"memlm sweep: no plots ({e}; install the plot extra)")
    _atomic(rep / "report.md", markdown(sweep, rows, key, fitted))
    written.append(rep / "report.md")
    if not quiet:
        print(f"memlm sweep: wrote {', '.join(str(p) for p in written)}")
    return fitted
