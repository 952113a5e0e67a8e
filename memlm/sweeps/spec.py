"""Sweep files: what a study runs, expanded into named, validated runs.

A sweep file is a python file that defines ``SWEEP``, a :class:`Sweep` (or the same as a plain
dict): a base preset, overrides common to every run, and stages whose runs are a list or a
:func:`product` of ``--config.k=v`` overrides, each with a name template::

    SWEEP = Sweep(
        config="experiments/tiny.py",
        data=dict(corpus="facts", overrides={"tree.embedder": "hash"}),   # prepared once
        stages=[
            Stage("anchor", template="anchor_d{model.d_model}", overrides={"memory.type": "none"},
                  runs=product({"model.d_model": [32, 64]})),
            Stage("memory", template="mem_d{model.d_model}_r{memory.sizes}", init_from="anchor_d{model.d_model}",
                  runs=product({"model.d_model": [32, 64], "memory.sizes": [(8, 8), (32, 32)]})),
        ],
    )

Templates are formatted against each run's resolved config (``{model.d_model}``; a tuple prints
as ``8-8``) plus ``{stage}``, ``{index}`` and ``{budget}``; a run entry may carry ``config`` (its
own preset) and ``init_from`` (a template naming a run of an earlier stage); a stage may name its
own prepared ``data`` directory (the 8k-token anchor pretraining data of the paper's A.1 stage). A stage with
``budgets`` (training FLOPs, as ``memlm info`` counts them) repeats its runs once per budget and
sets ``train.steps`` so each run spends its budget: the IsoFLOP design. Expansion is a pure
function of the file: the same names, in the same order, every time.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import itertools
import json
import re
import string
from pathlib import Path
from typing import Any

import ml_collections

from memlm.config import DEFAULT_PRESET, ConfigError, apply_overrides, load_config, validate

NAME_OK = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.=+-]*$")


class SweepError(ValueError):
    """A sweep file cannot be expanded; the message names the file, the run and the bad key."""


@dataclasses.dataclass
class Stage:
    """One group of runs sharing a template, overrides and (optionally) an upstream stage."""

    name: str
    runs: list = dataclasses.field(default_factory=lambda: [{}])
    template: str = "{stage}_{index}"
    overrides: dict = dataclasses.field(default_factory=dict)
    config: str | None = None
    init_from: str | None = None
    budgets: list | None = None
    data: str | None = None  # this stage's prepared data directory (e.g. 8k-token anchor pretraining data)


@dataclasses.dataclass
class Sweep:
    """A study: base preset, common overrides, stages, data preparation, whether to evaluate."""

    stages: list
    config: str = DEFAULT_PRESET  # memlm's packaged default preset
    name: str = ""
    overrides: dict = dataclasses.field(default_factory=dict)
    data: dict | str | None = None  # {"corpus": ..., "overrides": {...}}: prepared once; a str: an existing dir
    eval: bool = False
    description: str = ""


@dataclasses.dataclass
class RunSpec:
    """One expanded run: its name, the command-line overrides that make its config, its upstream run."""

    name: str
    stage: str
    config_file: str
    overrides: dict[str, str]
    init_from: str | None
    cfg: ml_collections.ConfigDict
    knobs: dict[str, Any]
    budget: float | None = None
    config_path: str = ""  # config_file resolved against the directory the sweep runs from
    data: str | None = None  # the stage's own data directory; None: the sweep's

    def args(self) -> list[str]:
        """``--config FILE --config.k=v ...`` as ``memlm train`` takes them."""
        return ["--config", self.config_path or self.config_file,
                *(f"--config.{k}={v}" for k, v in self.overrides.items())]

    @property
    def config_sha(self) -> str:
        """A digest of the resolved config's departures from memlm's defaults, so a changed sweep file is
        noticed on rerun while a memlm upgrade that only adds keys (at their defaults) is not."""
        from memlm.config import default_config

        def flat(tree: dict, prefix: str = "") -> dict:
            out = {}
            for k, v in tree.items():
                out.update(flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
            return out

        base = flat(json.loads(default_config().to_json()))
        mine = flat(json.loads(self.cfg.to_json()))
        changed = {k: v for k, v in mine.items() if k not in base or base[k] != v}
        text = json.dumps(changed, sort_keys=True)
        return hashlib.sha256(f"{text}|{self.init_from}".encode()).hexdigest()[:16]


def product(*axes: dict, **named: list) -> list[dict]:
    """The cartesian product of override axes, in order (the last axis varies fastest).

    ``product({"model.d_model": [32, 64]}, memory=[{"memory.sizes": (8, 8)}, {"memory.type": "none"}])``:
    an axis whose key is a config key takes values; a named axis takes dicts of overrides that
    go together (an anchor's width, heads and FFN size).
    """
    merged: dict[str, list] = {}
    for a in axes:
        merged.update(a)
    merged.update(named)
    keys = list(merged)
    out = []
    for values in itertools.product(*(merged[k] for k in keys)):
        run: dict = {}
        for k, v in zip(keys, values, strict=True):
            run.update(v if isinstance(v, dict) else {k: v})
        out.append(run)
    return out


def zipped(**named: list) -> list[dict]:
    """Runs that take the i-th value of every axis (axes of equal length), e.g. depth with its memory config."""
    lengths = {k: len(v) for k, v in named.items()}
    if len(set(lengths.values())) > 1:
        raise SweepError(f"zipped axes differ in length: {lengths}")
    return [dict(zip(named, vals, strict=True)) for vals in zip(*named.values(), strict=True)]


def override_text(value: Any) -> str:
    """A python value as the text of ``--config.k=v`` (parsed back by memlm.config)."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        value = tuple(value)
    return repr(value)


class _Formatter(string.Formatter):
    def get_field(self, field_name, args, kwargs):
        head, *rest = field_name.split(".")
        if head not in kwargs:
            raise KeyError(field_name)
        obj = kwargs[head]
        for part in rest:
            if not isinstance(obj, ml_collections.ConfigDict | dict) or part not in obj:
                raise KeyError(field_name)
            obj = obj[part]
        return obj, field_name

    def format_field(self, value, format_spec):
        if isinstance(value, tuple | list):
            return "-".join(self.format_field(v, format_spec) for v in value)
        if isinstance(value, float) and not format_spec:
            return f"{value:g}"
        return super().format_field(value, format_spec)


def _format(template: str, context: dict, where: str) -> str:
    try:
        return _Formatter().format(template, **context)
    except KeyError as e:
        raise SweepError(f"{where}: template {template!r} names {e.args[0]!r}, which is neither a config key nor "
                         "stage / index / budget") from None
    except (ValueError, IndexError) as e:
        raise SweepError(f"{where}: bad template {template!r} ({e})") from None


def load_sweep(path: str | Path) -> Sweep:
    """Read ``SWEEP`` from a sweep file (a :class:`Sweep` or a dict of its fields)."""
    path = Path(path)
    if not path.is_file():
        raise SweepError(f"sweep file {str(path)!r} does not exist")
    spec = importlib.util.spec_from_file_location(f"memlm_sweep_{path.stem}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    sweep = getattr(module, "SWEEP", None)
    if sweep is None:
        raise SweepError(f"sweep file {str(path)!r} defines no SWEEP")
    if isinstance(sweep, dict):
        try:
            stages = [s if isinstance(s, Stage) else Stage(**s) for s in sweep.get("stages", [])]
            sweep = Sweep(**{**sweep, "stages": stages})
        except TypeError as e:
            raise SweepError(f"sweep file {str(path)!r}: {e}") from None
    if not isinstance(sweep, Sweep):
        raise SweepError(f"sweep file {str(path)!r}: SWEEP must be a Sweep or a dict, got {type(sweep).__name__}")
    if not sweep.stages:
        raise SweepError(f"sweep file {str(path)!r}: SWEEP has no stages")
    sweep.name = sweep.name or path.stem
    return sweep


def resolve_preset(config_file: str, root: str | Path = ".") -> str:
    """A preset path (``FILE`` or ``FILE:ARG``) relative to ``root``, else to the repository memlm runs from."""
    file_part, colon, arg = config_file.partition(":")
    for base in (Path(root), Path(__file__).resolve().parents[2]):
        candidate = Path(file_part) if Path(file_part).is_absolute() else base / file_part
        if candidate.exists():
            return f"{candidate}{colon}{arg}"
    return config_file


def _entry(entry: Any, where: str) -> dict:
    """A run entry as a dict: already one, or a list of ``--config.k=v`` strings."""
    if isinstance(entry, dict):
        return dict(entry)
    if isinstance(entry, list | tuple) and all(isinstance(a, str) for a in entry):
        out = {}
        for arg in entry:
            if not arg.startswith("--config.") or "=" not in arg:
                raise SweepError(f"{where}: {arg!r} is not of the form --config.key=value")
            k, _, v = arg[len("--config."):].partition("=")
            out[k] = v
        return out
    raise SweepError(f"{where}: a run is a dict of overrides or a list of --config.k=v strings, got {entry!r}")


def _steps_for_budget(cfg: ml_collections.ConfigDict, budget: float) -> int:
    from memlm.model.accounting import accounting

    fl = accounting(cfg)["flops_per_token"]
    uses_memory = cfg.memory.type != "none" and cfg.train.mode != "anchor"
    per_token = fl["anchor_train"] + (fl["memory_train"] if uses_memory else 0)
    return max(1, round(budget / (per_token * cfg.train.batch_size * cfg.data.seq_len)))


def expand(sweep: Sweep, root: str | Path = ".") -> list[RunSpec]:
    """Every run of ``sweep``, validated, with unique names; fails naming the run and the bad key."""
    root = Path(root)
    runs: list[RunSpec] = []
    names: dict[str, str] = {}
    for stage in sweep.stages:
        budgets = stage.budgets or [None]
        index = 0
        for budget in budgets:
            for i, raw in enumerate(stage.runs):
                where = f"sweep {sweep.name!r}, stage {stage.name!r}, run {i}"
                entry = _entry(raw, where)
                config_file = str(entry.pop("config", None) or stage.config or sweep.config)
                upstream = entry.pop("init_from", stage.init_from)
                overrides = {k: override_text(v) for k, v in {**sweep.overrides, **stage.overrides, **entry}.items()}
                resolved = resolve_preset(config_file, root)
                try:
                    cfg = load_config(resolved)
                    apply_overrides(cfg, overrides)
                    if budget is not None:
                        overrides["train.steps"] = str(_steps_for_budget(cfg, float(budget)))
                        apply_overrides(cfg, {"train.steps": overrides["train.steps"]})
                    context = {**cfg, "stage": stage.name, "index": index, "budget": budget}
                    name = _format(stage.template, context, where)
                    overrides = {"name": f"{sweep.name}_{name}", **overrides}
                    cfg.name = overrides["name"]
                    validate(cfg)
                except ConfigError as e:
                    raise SweepError(f"{where} (overrides {entry}): {e}") from None
                if not NAME_OK.match(name):
                    raise SweepError(f"{where}: run name {name!r} (from template {stage.template!r}) must be letters, "
                                     "digits and _ . = + -")
                if name in names:
                    raise SweepError(f"{where}: run name {name!r} is also {names[name]}; add the keys that differ "
                                     f"to the template {stage.template!r}")
                names[name] = where
                init_from = _format(upstream, context, where) if upstream else None
                if init_from is not None and init_from not in {r.name for r in runs}:
                    raise SweepError(f"{where}: init_from {init_from!r} names no run of an earlier stage")
                knobs = {k: v for k, v in entry.items()}
                runs.append(RunSpec(name=name, stage=stage.name, config_file=config_file, overrides=overrides,
                                    init_from=init_from, cfg=cfg, knobs=knobs,
                                    budget=None if budget is None else float(budget), config_path=resolved,
                                    data=stage.data))
                index += 1
    return runs


def data_overrides(sweep: Sweep) -> dict[str, str]:
    """The overrides ``memlm prepare`` gets: the common ones, then the data section's own."""
    own = sweep.data.get("overrides", {}) if isinstance(sweep.data, dict) else {}
    return {k: override_text(v) for k, v in {**sweep.overrides, **own}.items()}
