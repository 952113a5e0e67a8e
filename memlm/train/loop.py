"""``memlm train``: the training loop with resume, checkpoints, preemption and metrics.

The run directory holds ``config.json`` (the full config used), ``checkpoints/`` (orbax),
``bank/`` and ``generic/`` (tensorstore banks, versioned), ``metrics.jsonl`` and
``tensorboard/``. Re-running the same command resumes from the newest complete checkpoint;
the batch is a pure function of (seed, step), so the losses after a resume equal those of an
uninterrupted run.
"""

from __future__ import annotations

import contextlib
import json
import math
import signal
import sys
import time
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np

from memlm.config import ConfigError, validate
from memlm.train import bank_io
from memlm.train.checkpoint import Checkpointer, abstract_like, restore_item
from memlm.train.mesh import build_mesh, check_batch, maybe_initialize_distributed
from memlm.train.metrics import MetricsWriter, device_peak_flops
from memlm.train.step import TrainState, build, device_batch

# Config sections that define the model and bank: a resumed run must not change them.
FROZEN_SECTIONS = ("model", "memory", "tree")


class TrainingError(ValueError):
    """Training cannot go on (non-finite loss, incompatible run directory): the message says why."""


def _check_data(cfg: ml_collections.ConfigDict, data_dir: Path) -> dict:
    from memlm.data.records import read_manifest

    if not (data_dir / "manifest.json").exists():
        raise FileNotFoundError(f"data directory {str(data_dir)!r} has no manifest.json: run `memlm prepare` first")
    manifest = read_manifest(data_dir)
    vocab = int(manifest["tokenizer"]["vocab_size"])
    if vocab > cfg.model.vocab_size:
        raise ConfigError(f"config key 'model.vocab_size' = {cfg.model.vocab_size}: the tokenizer of "
                          f"{str(data_dir)!r} has {vocab} tokens")
    uses_tree = cfg.memory.type != "none" and cfg.train.mode != "anchor"
    if uses_tree and (int(manifest["k"]) != cfg.tree.k or int(manifest["depth"]) != cfg.tree.depth):
        raise ConfigError(f"config keys 'tree.k', 'tree.depth' = ({cfg.tree.k}, {cfg.tree.depth}): the data in "
                          f"{str(data_dir)!r} was routed with a tree of k={manifest['k']}, depth={manifest['depth']}")
    return manifest


def _record_config(cfg: ml_collections.ConfigDict, workdir: Path, data_dir: Path, init_from: str | None) -> None:
    path = workdir / "config.json"
    new = json.loads(cfg.to_json())
    if path.exists():
        old = json.loads(path.read_text())
        for section in FROZEN_SECTIONS:
            if old.get("config", {}).get(section) != new[section]:
                diff = {k: (old["config"][section].get(k), v) for k, v in new[section].items()
                        if old["config"][section].get(k) != v}
                raise ConfigError(f"config section {section!r} differs from the run in {str(workdir)!r} "
                                  f"(was -> now: {diff}); use a new --workdir")
    workdir.mkdir(parents=True, exist_ok=True)
    record = {"config": new, "data_dir": str(data_dir.resolve()),
              "init_from": str(Path(init_from).resolve()) if init_from else None}
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=2))
    tmp.replace(path)


def load_run_config(workdir: str | Path) -> tuple[ml_collections.ConfigDict, dict]:
    """The config a run used, and its record (data_dir, init_from)."""
    path = Path(workdir) / "config.json"
    if not path.exists():
        raise FileNotFoundError(f"{str(workdir)!r} is not a memlm run directory (no config.json)")
    record = json.loads(path.read_text())
    cfg = ml_collections.ConfigDict(record["config"])
    for section in cfg:
        if isinstance(cfg[section], ml_collections.ConfigDict) and "sizes" in cfg[section]:
            cfg[section].sizes = tuple(cfg[section].sizes)
    return validate(cfg), record


def anchor_items(state: TrainState) -> dict:
    return {"params": state.params, "opt": {"opt_state": state.opt_state, "step": state.step}}


def load_anchor_params(workdir: str | Path, shapes: Any, shardings: Any) -> tuple[int, Any]:
    """The newest complete anchor parameters of another run (for ``--init-from``)."""
    other, _ = load_run_config(workdir)
    mine = {k: tuple(v.shape) for k, v in shapes.items()}
    from memlm.model.functional import AnchorFunctional

    theirs = {k: tuple(v.shape) for k, v in AnchorFunctional(other).shapes.items()}
    if mine != theirs:
        bad = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))
        raise ConfigError(f"--init-from {str(workdir)!r}: its anchor differs in {bad[:4]} (a different model config)")
    step, params, _ = restore_item(workdir, "params", abstract_like(shapes, shardings))
    return step, params


class _Preemption:
    """SIGTERM / SIGINT set a flag; the loop saves at the next step boundary and exits."""

    def __init__(self):
        self.requested = False
        self._old = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(ValueError):  # not in the main thread
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.requested:  # a second signal: stop now
            raise KeyboardInterrupt
        self.requested = True
        print(f"memlm: received signal {signum}: saving a checkpoint and stopping", file=sys.stderr)

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


def _hit_summary(paths: np.ndarray, generic: np.ndarray, k: int, depth: int) -> dict[str, float]:
    out = {}
    rows = paths[~generic]
    for level in range(1, depth + 1):
        if rows.size == 0:
            break
        counts = np.bincount(rows[:, level - 1], minlength=k**level)
        out[f"bank/level{level}_unique_nodes"] = float(np.count_nonzero(counts))
        out[f"bank/level{level}_max_share"] = float(counts.max() / rows.shape[0])
    return out


class _Window:
    """Throughput over the steps since the last log line."""

    def __init__(self):
        self.t0 = time.perf_counter()
        self.steps = 0
        self.tokens = 0
        self.memory_tokens = 0
        self.wait = 0.0

    def add(self, host: dict, memory: bool) -> None:
        n = host["tokens"].size * jax.process_count()
        self.steps += 1
        self.tokens += n
        if memory:  # memory FLOPs are spent on every sequence (fetched or generic)
            self.memory_tokens += n

    def summary(self, flops_per_token: dict, peak: float) -> dict[str, float]:
        dt = max(time.perf_counter() - self.t0, 1e-9)
        flops = (self.tokens * flops_per_token["anchor_train"] + self.memory_tokens * flops_per_token["memory_train"])
        return {"tokens_per_s": self.tokens / dt, "mfu": flops / dt / peak, "step_time_s": dt / max(self.steps, 1),
                "loader_wait_s": self.wait / max(self.steps, 1)}


def _progress(quiet: bool, total: int, done: int):
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    bar = Progress(TextColumn("[bold]train"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                   TextColumn("{task.fields[info]}"), TimeRemainingColumn(), disable=quiet or not sys.stderr.isatty())
    bar.add_task("train", total=total, completed=done, info="")
    return bar


def train(cfg: ml_collections.ConfigDict, data_dir: str | Path = "data/facts", workdir: str | Path = "runs/tiny",
          init_from: str | None = None, quiet: bool = False) -> dict:
    """Train per ``cfg.train`` (mode, steps, ...); resume from ``workdir`` when it has checkpoints."""
    maybe_initialize_distributed()
    validate(cfg)
    t = cfg.train
    data_dir, workdir = Path(data_dir), Path(workdir)
    if t.mode in ("frozen", "cotrain") and not init_from and not (workdir / "checkpoints").exists():
        raise ConfigError(f"config key 'train.mode' = {t.mode!r} starts from a pretrained anchor: pass --init-from")
    mesh = build_mesh(cfg)
    check_batch(cfg, mesh)
    manifest = _check_data(cfg, data_dir)
    _record_config(cfg, workdir, data_dir, init_from)

    from memlm.data.loader import make_loader
    from memlm.model.accounting import accounting

    fns = build(cfg, mesh)
    loader = make_loader(cfg, data_dir)
    data_iter = iter(loader)
    ckpt = Checkpointer(workdir, keep=t.keep_checkpoints)
    banks = bank_io.RunBanks(workdir, fns.bank_layout, fns.generic_layout, cfg, mesh,
                             tree_id=str(manifest["tree"]["id"]))

    state = fns.init(t.seed, with_banks=False)
    abstract = abstract_like(anchor_items(state), anchor_items(fns.state_shardings))
    restored = ckpt.restore(abstract, data_iter, bank_ok=banks.can_open)
    log = (lambda *a: None) if quiet else (lambda *a: print(*a, flush=True))
    if restored is not None:
        step0, items, meta = restored
        loaded = banks.load(meta)
        state = TrainState(step=items["opt"]["step"], params=items["params"], opt_state=items["opt"]["opt_state"],
                           bank=loaded.get("bank"), generic=loaded.get("generic"))
        log(f"memlm train: resumed {workdir} at step {step0}")
    else:
        step0 = 0
        if init_from:
            src_step, params = load_anchor_params(init_from, fns.fn.shapes, fns.state_shardings.params)
            state = state.replace(params=params)
            log(f"memlm train: anchor initialised from {init_from} (step {src_step})")
        created = banks.create()
        state = state.replace(bank=created.get("bank"), generic=created.get("generic"))

    acc = accounting(cfg)
    fl = acc["flops_per_token"]
    peak, peak_src = device_peak_flops()
    n_dev = jax.device_count()
    bytes_per_block = acc["fetched_params"] * np.dtype(cfg.memory.dtype).itemsize if fns.bank_layout else 0
    writer = MetricsWriter(workdir)
    log(f"memlm train: {cfg.name} mode={t.mode} steps={t.steps} batch={t.batch_size}x{cfg.data.seq_len} "
        f"devices={n_dev} mesh={dict(mesh.shape)} anchor={acc['anchor_params']:,} params "
        f"fetched={acc['fetched_params'] if fns.bank_layout else 0:,} -> {workdir}")

    last_good = step0
    window = _Window()
    result: dict[str, Any] = {"preempted": False}
    step = step0
    bar = _progress(quiet, t.steps, step0)
    with _Preemption() as preempt, bar:
        task = bar.tasks[0].id
        while step < t.steps:
            tw = time.perf_counter()
            host = next(data_iter)
            window.wait += time.perf_counter() - tw
            state, metrics = fns.step(state, device_batch(host, fns.batch_shardings))
            step += 1
            window.add(host, fns.bank_layout is not None)
            log_now = step % t.log_every == 0 or step == t.steps
            save_now = step % t.checkpoint_every == 0 or step == t.steps or preempt.requested
            # Block every few steps: multi-device CPU collectives can deadlock when too many steps queue.
            if not (log_now or save_now or step % 4 == 0):
                continue
            m = jax.device_get(metrics)
            loss = float(m["loss"])
            if not math.isfinite(loss):
                ckpt.wait()
                raise TrainingError(f"non-finite loss ({loss}) at step {step}; stopped. The last good checkpoint "
                                    f"is step {last_good} in {workdir / 'checkpoints'}")
            if log_now:
                scalars = {k: float(v) for k, v in m.items()}
                scalars.update(window.summary(fl, peak * n_dev))
                hist = None
                if fns.bank_layout is not None:
                    scalars.update(_hit_summary(host["paths"], host["generic"], cfg.tree.k, cfg.tree.depth))
                    scalars["bank/bytes_fetched"] = float((~host["generic"]).sum() * bytes_per_block)
                    hist = {"bank/leaf_hits": host["paths"][~host["generic"], -1]}
                writer.write(step, scalars, hist)
                info = f"loss {loss:.3f}  {scalars['tokens_per_s']:,.0f} tok/s  MFU {100 * scalars['mfu']:.2f}%"
                bar.update(task, completed=step, info=info)
                if bar.disable:
                    log(f"step {step:>6}  {info}  grad {scalars['grad_norm']:.3f}  "
                        f"loader wait {1e3 * scalars['loader_wait_s']:.1f} ms")
                result["last"] = scalars
                window = _Window()
            if save_now:
                saved, meta = banks.save({"bank": state.bank, "generic": state.generic})
                state = state.replace(bank=saved.get("bank", state.bank), generic=saved.get("generic", state.generic))
                ckpt.save(step, anchor_items(state), {**meta, "step": step}, data_iter)
                last_good = step
            if preempt.requested:
                result["preempted"] = True
                break
    ckpt.close()
    writer.close()
    result.update(step=step, workdir=str(workdir), peak_flops=peak, peak_source=peak_src)
    log(f"memlm train: {'stopped' if result['preempted'] else 'finished'} at step {step}; checkpoints in "
        f"{workdir / 'checkpoints'}, metrics in {workdir / 'metrics.jsonl'}")
    return result
