"""Scaling-law fits with bootstrap confidence intervals.

Two fits, as in the compute-optimal scaling literature:

* **IsoFLOP**: at each compute budget C, a parabola of loss in log N; its vertex is N*(C) (the same
  in log D gives D*(C)). Power laws ``N* = k_N C^a`` and ``D* = k_D C^b`` are then fit in log-log.
* **Parametric**: ``L(N, D, M) = E + A / N^alpha + B / D^beta - G log(1 + M / N)`` by least squares,
  with N the runtime parameters (anchor + fetched memory), D the training tokens and M the total
  memory parameters (the bank). The bank term is zero without memory and grows slowly with
  the bank relative to the model (the paper: "deeper and larger banks help monotonically"); it is
  left out when no run has memory.

Intervals are percentile bootstraps over runs (resampled with replacement; IsoFLOP resamples
within each budget), so they reflect the spread of the data the fit saw.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

PARAMS = ("E", "A", "alpha", "B", "beta", "G")


class FitError(ValueError):
    """Too few or degenerate points for a fit; the message says what is missing."""


def _interval(samples: np.ndarray, level: float) -> list[float] | None:
    samples = samples[np.isfinite(samples)]
    if samples.size < 10:
        return None
    lo, hi = np.percentile(samples, [50 * (1 - level), 50 * (1 + level)])
    return [float(lo), float(hi)]


# ---- IsoFLOP --------------------------------------------------------------------------------------------
def group_budgets(flops: Sequence[float], budgets: Sequence[float | None] | None = None,
                  tolerance: float = 0.05) -> list[int]:
    """A budget group id per run: the run's declared budget, else FLOPs within ``tolerance`` of each other."""
    if budgets is not None and all(b is not None for b in budgets):
        keys = sorted(set(budgets))
        return [keys.index(b) for b in budgets]
    order = np.argsort(flops)
    group, ids, start = -1, [0] * len(flops), None
    for i in order:
        if start is None or flops[i] > start * (1 + tolerance):
            group, start = group + 1, flops[i]
        ids[i] = group
    return ids


def parabola_vertex(x: np.ndarray, y: np.ndarray) -> tuple[float, np.ndarray] | None:
    """The minimiser of the least-squares parabola through (x, y); None when it opens downwards."""
    if len(np.unique(x)) < 3:
        return None
    coef = np.polyfit(x, y, 2)
    if coef[0] <= 0:
        return None
    return float(-coef[1] / (2 * coef[0])), coef


def _isoflop_once(groups: dict[float, tuple[np.ndarray, np.ndarray, np.ndarray]]):
    cs, ns, ds = [], [], []
    for c, (n, d, loss) in sorted(groups.items()):
        vn, vd = parabola_vertex(np.log(n), loss), parabola_vertex(np.log(d), loss)
        if vn is None or vd is None:
            continue
        cs.append(c)
        ns.append(vn[0])
        ds.append(vd[0])
    if len(cs) < 2:
        return None
    lc = np.log(cs)
    a, log_kn = np.polyfit(lc, ns, 1)
    b, log_kd = np.polyfit(lc, ds, 1)
    return dict(a=a, k_n=math.exp(log_kn), b=b, k_d=math.exp(log_kd), budgets=cs, n_opt=np.exp(ns).tolist(),
                d_opt=np.exp(ds).tolist())


def fit_isoflop(n: Sequence[float], d: Sequence[float], flops: Sequence[float], loss: Sequence[float],
                budgets: Sequence[float | None] | None = None, n_boot: int = 200, level: float = 0.95,
                seed: int = 0) -> dict:
    """IsoFLOP parabolas per budget and the N*(C), D*(C) power laws, with bootstrap intervals."""
    n, d, flops, loss = (np.asarray(x, float) for x in (n, d, flops, loss))
    ids = np.asarray(group_budgets(flops, budgets))
    groups = {}
    curves = []
    for g in np.unique(ids):
        sel = ids == g
        c = float(np.exp(np.mean(np.log(flops[sel]))))
        if len(np.unique(n[sel])) < 3:
            continue
        groups[c] = (n[sel], d[sel], loss[sel])
        v = parabola_vertex(np.log(n[sel]), loss[sel])
        curves.append(dict(budget=c, runs=int(sel.sum()), n=n[sel].tolist(), loss=loss[sel].tolist(),
                           parabola=None if v is None else v[1].tolist(),
                           n_opt=None if v is None else math.exp(v[0])))
    base = _isoflop_once(groups)
    if base is None:
        raise FitError(f"IsoFLOP needs at least 2 budgets with 3 or more model sizes each and a minimum inside "
                       f"the sizes tried; have {len(groups)} such budget(s) among {len(np.unique(ids))}")
    rng = np.random.default_rng(seed)
    boot = {"a": [], "b": []}
    for _ in range(n_boot):
        sample = {}
        for c, (gn, gd, gl) in groups.items():
            idx = rng.integers(0, len(gn), len(gn))
            sample[c] = (gn[idx], gd[idx], gl[idx])
        r = _isoflop_once(sample)
        if r is not None:
            boot["a"].append(r["a"])
            boot["b"].append(r["b"])
    return dict(kind="isoflop", n_star=dict(exponent=base["a"], coefficient=base["k_n"],
                                           interval=_interval(np.asarray(boot["a"]), level)),
                d_star=dict(exponent=base["b"], coefficient=base["k_d"],
                            interval=_interval(np.asarray(boot["b"]), level)),
                budgets=base["budgets"], n_opt=base["n_opt"], d_opt=base["d_opt"], curves=curves,
                level=level, bootstrap=len(boot["a"]))


# ---- parametric L(N, D, M) -------------------------------------------------------------------------------
def law(theta: np.ndarray, n: np.ndarray, d: np.ndarray, m: np.ndarray) -> np.ndarray:
    """``E + A / N^alpha + B / D^beta - G log(1 + M / N)`` with theta = (E, log A, alpha, log B, beta, G)."""
    e, log_a, alpha, log_b, beta, g = theta
    return e + np.exp(log_a - alpha * np.log(n)) + np.exp(log_b - beta * np.log(d)) - g * np.log1p(m / n)


def _least_squares(n, d, m, loss, starts, with_memory: bool):
    from scipy.optimize import least_squares

    lo = [0.0, -20.0, 0.0, -20.0, 0.0, 0.0 if with_memory else -1e-12]
    hi = [20.0, 60.0, 3.0, 60.0, 3.0, 10.0 if with_memory else 1e-12]
    best = None
    for x0 in starts:
        x0 = np.clip(np.asarray(x0, float), np.asarray(lo) + 1e-9, np.asarray(hi) - 1e-9)
        r = least_squares(lambda t: law(t, n, d, m) - loss, x0, bounds=(lo, hi), method="trf", x_scale="jac",
                          max_nfev=2000)
        if best is None or r.cost < best.cost:
            best = r
    return best


def fit_parametric(n: Sequence[float], d: Sequence[float], m: Sequence[float], loss: Sequence[float],
                   n_boot: int = 200, level: float = 0.95, seed: int = 0) -> dict:
    """Least-squares fit of :func:`law` over the runs, with a percentile bootstrap per parameter."""
    n, d, m, loss = (np.asarray(x, float) for x in (n, d, m, loss))
    with_memory = bool(np.any(m > 0))
    k = len(PARAMS) if with_memory else len(PARAMS) - 1
    if len(loss) < k + 1:
        raise FitError(f"the parametric law has {k} parameters: it needs at least {k + 1} runs, have {len(loss)}")
    if len(np.unique(n)) < 2 or len(np.unique(d)) < 2:
        raise FitError("the parametric law needs runs at 2 or more model sizes and 2 or more token counts")
    e0 = max(float(loss.min()) - 0.5, 0.0)
    starts = []
    for alpha in (0.2, 0.4, 0.7):
        for beta in (0.2, 0.4, 0.7):
            # Start with each power term at about a third of the loss above E.
            share = max(float(np.median(loss)) - e0, 0.1) / 3
            starts.append([e0, math.log(share) + alpha * float(np.median(np.log(n))), alpha,
                           math.log(share) + beta * float(np.median(np.log(d))), beta, 0.01 if with_memory else 0])
    best = _least_squares(n, d, m, loss, starts, with_memory)
    theta = best.x
    rng = np.random.default_rng(seed)
    samples = []
    for _ in range(n_boot):
        idx = rng.integers(0, len(loss), len(loss))
        if len(np.unique(n[idx])) < 2 or len(np.unique(d[idx])) < 2:
            continue
        r = _least_squares(n[idx], d[idx], m[idx], loss[idx], [theta], with_memory)
        samples.append(r.x)
    samples = np.asarray(samples)
    values = dict(E=theta[0], A=math.exp(theta[1]), alpha=theta[2], B=math.exp(theta[3]), beta=theta[4], G=theta[5])
    boot = {}
    if samples.size:
        boot = dict(E=samples[:, 0], A=np.exp(samples[:, 1]), alpha=samples[:, 2], B=np.exp(samples[:, 3]),
                    beta=samples[:, 4], G=samples[:, 5])
    params = {}
    for name in PARAMS:
        if name == "G" and not with_memory:
            continue
        params[name] = dict(value=float(values[name]), interval=_interval(boot[name], level) if boot else None)
    pred = law(theta, n, d, m)
    rmse = float(np.sqrt(np.mean((pred - loss) ** 2)))
    return dict(kind="parametric", formula="L = E + A / N^alpha + B / D^beta" + (" - G log(1 + M / N)"
                if with_memory else ""), params=params, theta=theta.tolist(), with_memory=with_memory,
                rmse=rmse, runs=int(len(loss)), level=level, bootstrap=int(len(samples)))


def predict(fit: dict, n, d, m) -> np.ndarray:
    """The parametric fit's loss at (N, D, M)."""
    return law(np.asarray(fit["theta"]), np.asarray(n, float), np.asarray(d, float), np.asarray(m, float))
