"""Scaling-law sweeps: expand a sweep file into runs, run them, collect a table, fit and plot.

One file per job, in the order a study goes: ``spec`` (expand and validate), ``runner`` (prepare,
train, evaluate, resume; job scripts), ``collect`` (the results table), ``fit`` (IsoFLOP and
parametric laws with bootstrap intervals), ``report`` (fits.json, plots, markdown).
"""

from memlm.sweeps.spec import Stage, Sweep, SweepError, expand, load_sweep, product, zipped

__all__ = ["Stage", "Sweep", "SweepError", "expand", "load_sweep", "product", "zipped"]
