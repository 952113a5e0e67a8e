"""The whole final state of a run as one flat dict ``name -> numpy array``, and its comparison.

:func:`run_state` reads, from a run directory:

* ``anchor/params/<name>``: every anchor parameter of the newest checkpoint;
* ``anchor/opt/...``: every leaf of the anchor's optimizer item (the optax state, its counters, the step);
* ``checkpoint/step``, ``checkpoint/<part>_version``: the step and the bank versions the checkpoint names;
* ``<part>/version``, ``<part>/versions``: the newest saved version of each bank (``bank``: the
  hierarchical bank, ``generic``: the generic memory) and the restorable ones;
* for every level and every node of each bank (trained or not): ``<part>/level<l>/<array>/params``
  (the float32 master), ``.../mu``, ``.../nu`` (both Adam moments), ``<part>/level<l>/count`` (the
  per-node step) and ``<part>/level<l>/written``: every field the store holds.

:func:`state_arrays` flattens an in-memory ``TrainState`` to the same names (a reference computed
in the test process), and :func:`assert_same_state` compares two such dicts, naming the first
arrays that differ.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import jax
import numpy as np

PARTS = ("bank", "generic")


def _key(k) -> str:
    for attr in ("key", "idx", "name"):
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)


def flatten(tree, prefix: str) -> dict[str, np.ndarray]:
    """``{prefix/key/...: array}`` of a pytree; dict keys, tuple indices and named-tuple fields
    all become path components, so a restored checkpoint and a live state give the same names."""
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(jax.device_get(tree))[0]:
        out["/".join([prefix, *(_key(k) for k in path)])] = np.asarray(leaf)
    return out


def _restore_numpy(path: Path):
    """A pytree checkpoint item restored as host numpy arrays (no shardings: a checkpoint written
    by any number of processes or devices reads back in the test process)."""
    import orbax.checkpoint as ocp

    ckptr = ocp.PyTreeCheckpointer()
    meta = ckptr.metadata(path)
    tree = getattr(meta, "item_metadata", meta)
    tree = getattr(tree, "tree", tree)
    args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
    return ckptr.restore(path, args=ocp.args.PyTreeRestore(restore_args=args))


def newest_checkpoint(run) -> Path:
    steps = sorted((int(p.name) for p in (Path(run) / "checkpoints").iterdir()
                    if p.name.isdigit() and (p / "commit_success.txt").exists()), reverse=True)
    assert steps, f"{run} has no complete checkpoint"
    return Path(run) / "checkpoints" / str(steps[0])


def bank_arrays(store, part: str = "bank") -> dict[str, np.ndarray]:
    """Every stored field of every node of an open ``BankStore`` at its version."""
    out = {f"{part}/version": np.asarray(store.version), f"{part}/versions": np.asarray(store.versions)}
    for lv in store.layout.levels:
        fields = store.read_fields(lv.level, np.arange(lv.nodes))
        for path, value in fields.items():
            out[f"{part}/{lv.key}/{path}"] = value
    return out


def run_state(run, parts=PARTS) -> dict[str, np.ndarray]:
    """The whole final state of run directory ``run`` (module docstring)."""
    from memlm.bank.layout import BankLayout
    from memlm.bank.store import BankStore
    from memlm.run.directory import RunDir

    run = Path(run)
    ck = newest_checkpoint(run)
    out = {"checkpoint/step": np.asarray(int(ck.name))}
    meta = json.loads((ck / "meta" / "metadata").read_text())
    for part in parts:
        if f"{part}_version" in meta:
            out[f"checkpoint/{part}_version"] = np.asarray(int(meta[f"{part}_version"]))
    out.update(flatten(_restore_numpy(ck / "params"), "anchor/params"))
    out.update(flatten(_restore_numpy(ck / "opt"), "anchor/opt"))
    cfg, _ = RunDir(run).load_config()
    layouts = {"bank": lambda: BankLayout.from_config(cfg), "generic": lambda: BankLayout.generic_from_config(cfg)}
    for part in parts:
        if (run / part / "bank.json").exists():
            out.update(bank_arrays(BankStore.open(os.fspath(run / part), layouts[part]()), part))
    return out


def state_arrays(state) -> dict[str, np.ndarray]:
    """A ``memlm.train.step.TrainState`` under :func:`run_state`'s names (anchor and every bank
    field; a node's ``written`` flag is whether it was ever updated). No checkpoint or version
    entries: a live state has none."""
    out = flatten(state.params, "anchor/params")
    out.update(flatten({"opt_state": state.opt_state, "step": state.step}, "anchor/opt"))
    for part in PARTS:
        bank = getattr(state, part)
        if bank is None:
            continue
        bank = jax.device_get(bank)
        for lv in bank.layout.levels:
            key = lv.key
            for a in bank.layout.arrays:
                for kind, tree in (("params", bank.params), ("mu", bank.mu), ("nu", bank.nu)):
                    out[f"{part}/{key}/{a.name}/{kind}"] = np.asarray(tree[key][a.name])[:lv.nodes]
            count = np.asarray(bank.count[key])[:lv.nodes]
            out[f"{part}/{key}/count"] = count
            out[f"{part}/{key}/written"] = (count > 0).astype(np.uint8)
    return out


def moment_names(state: dict) -> list[str]:
    """The Adam moments among a state's names (``mu``, ``nu`` of the anchor's optimizer and the banks)."""
    return sorted(n for n in state if {"mu", "nu"} & set(n.split("/")))


def _describe(name: str, x: np.ndarray, y: np.ndarray, bad: np.ndarray) -> str:
    where = np.argwhere(bad)[0].tolist() if bad.ndim else []
    first = (x[tuple(where)], y[tuple(where)]) if bad.ndim else (x, y)
    diff = np.abs(x.astype(np.float64) - y.astype(np.float64)) if x.dtype.kind in "fiub" else None
    most = f", max |diff| {np.nanmax(diff):.3g}" if diff is not None and diff.size else ""
    return (f"{name}: {int(bad.sum())} of {bad.size} elements differ{most}; first at {where}: "
            f"{first[0]!r} vs {first[1]!r}")


def assert_same_state(a: dict, b: dict, exact: bool = True, *, rtol: float = 0.0, atol: float = 0.0,
                      scaled_atol: float = 0.0, frac: float = 0.0, only=None, skip=(), show: int = 5) -> None:
    """Assert that two flat states hold the same names, shapes, dtypes and values.

    ``exact``: bit for bit (NaNs equal themselves); integer arrays (counters, flags, steps,
    versions) always are. Otherwise float arrays need ``|a - b| <= atol + scaled_atol * max|b| +
    rtol * |b|`` elementwise (``scaled_atol``: an absolute tolerance in units of the array's largest
    magnitude, for arrays as far apart in scale as parameters and second moments), and at most a
    fraction ``frac`` of each array's elements may fall outside.
    ``only`` / ``skip``: name prefixes to restrict the comparison to / to leave out. The message
    names the first ``show`` differing arrays (sorted by name) and how many differ in all.
    """
    def keep(name: str) -> bool:
        return (only is None or name.startswith(tuple(only))) and not name.startswith(tuple(skip))

    names_a, names_b = {n for n in a if keep(n)}, {n for n in b if keep(n)}
    assert names_a == names_b, (f"different arrays: only in the first {sorted(names_a - names_b)[:show]}, "
                                f"only in the second {sorted(names_b - names_a)[:show]}")
    assert names_a, "nothing to compare"
    bad = []
    for name in sorted(names_a):
        x, y = np.asarray(a[name]), np.asarray(b[name])
        if x.shape != y.shape or x.dtype != y.dtype:
            bad.append(f"{name}: {x.dtype}{list(x.shape)} vs {y.dtype}{list(y.shape)}")
            continue
        if exact or x.dtype.kind not in "fc":
            differ = ~((x == y) | ((x != x) & (y != y)))
            if differ.any():
                bad.append(_describe(name, x, y, differ))
            continue
        tol = atol + (scaled_atol * float(np.nanmax(np.abs(y))) if y.size else 0.0)
        differ = ~np.isclose(x, y, rtol=rtol, atol=tol, equal_nan=True)
        if differ.mean() > frac if differ.size else False:
            bad.append(_describe(name, x, y, differ) + (f" (more than the {frac:.3g} allowed)" if frac else ""))
    if bad:
        how = "bit for bit" if exact else ", ".join(f"{k}={v}" for k, v in (
            ("rtol", rtol), ("atol", atol), ("scaled_atol", scaled_atol), ("frac", frac)) if v)
        raise AssertionError(f"{len(bad)} of {len(names_a)} arrays differ ({how}):\n  " + "\n  ".join(bad[:show]))
