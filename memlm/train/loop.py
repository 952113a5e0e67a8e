"""``memlm train``: the training loop with resume, checkpoints, preemption and metrics.

The run directory holds ``config.json`` (the full config used), ``checkpoints/`` (orbax),
``bank/`` and ``generic/`` (tensorstore banks, versioned), ``metrics.jsonl`` and
``tensorboard/``. Re-running the same command resumes from the newest complete checkpoint;
the batch is a pure function of (seed, step), so the losses after a resume equal those of an
uninterrupted run.
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import sys
import time
from typing import Any

import jax
import ml_collections
import numpy as np

from memlm.config import ConfigError, validate
from memlm.data.progress import format_seconds
from memlm.run import bank_io
from memlm.run.checkpoints import Checkpointer, abstract_like, restore_item
from memlm.run.directory import RunDir
from memlm.run.paths import location
from memlm.train.mesh import build_mesh, check_batch, maybe_initialize_distributed
from memlm.train.metrics import MetricsWriter, device_peak_flops
from memlm.train.step import TrainState, build, device_batch


class TrainingError(ValueError):
    """Training cannot go on (non-finite loss, incompatible run directory): the message says why."""


def _check_data(cfg: ml_collections.ConfigDict, data_dir) -> dict:
    from memlm.data.records import read_manifest

    if not (data_dir / "manifest.json").exists():
        raise FileNotFoundError(f"data directory {str(data_dir)!r} has no manifest.json: run `memlm prepare` first")
    manifest = read_manifest(data_dir)
    from memlm.data.tokenizer import check_template, load_tokenizer

    tok_file = data_dir / manifest["tokenizer"].get("path", "tokenizer.json")
    if tok_file.exists():
        check_template(manifest["tokenizer"].get("template"), load_tokenizer(tok_file, 1), str(data_dir))
    vocab = int(manifest["tokenizer"]["vocab_size"])
    if vocab > cfg.model.vocab_size:
        raise ConfigError(f"config key 'model.vocab_size' = {cfg.model.vocab_size}: the tokenizer of "
                          f"{str(data_dir)!r} has {vocab} tokens")
    uses_tree = cfg.memory.type != "none" and cfg.train.mode != "anchor"
    if uses_tree and (int(manifest["k"]) != cfg.tree.k or int(manifest["depth"]) != cfg.tree.depth):
        raise ConfigError(f"config keys 'tree.k', 'tree.depth' = ({cfg.tree.k}, {cfg.tree.depth}): the data in "
                          f"{str(data_dir)!r} was routed with a tree of k={manifest['k']}, depth={manifest['depth']}")
    return manifest


def anchor_items(state: TrainState) -> dict:
    return {"params": state.params, "opt": {"opt_state": state.opt_state, "step": state.step}}


def load_anchor_params(workdir, shapes: Any, shardings: Any) -> tuple[int, Any]:
    """The newest complete anchor parameters of another run (for ``--init-from``)."""
    from memlm.model.functional import AnchorFunctional

    other, _ = RunDir(workdir).load_config()
    mine = {k: tuple(v.shape) for k, v in shapes.items()}
    theirs = {k: tuple(v.shape) for k, v in AnchorFunctional(other).shapes.items()}
    if mine != theirs:
        bad = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))
        raise ConfigError(f"--init-from {str(workdir)!r}: its anchor differs in {bad[:4]} (a different model config)")
    step, params, _ = restore_item(workdir, "params", abstract_like(shapes, shardings))
    return step, params


def agreed(flag: bool) -> bool:
    """Whether any process raised ``flag``: every process gets the same answer, so all of them
    save the same step and stop together (a preemption notice may reach only some hosts)."""
    if jax.process_count() == 1:
        return flag
    from jax.experimental import multihost_utils

    return bool(np.asarray(multihost_utils.process_allgather(np.int32(flag))).any())


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
        self.stall = 0.0  # waiting for off-device bank rows

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
                "loader_wait_s": self.wait / max(self.steps, 1), "bank/fetch_stall_per_step_s": self.stall / max(
                    self.steps, 1)}


def _progress(quiet: bool, total: int, done: int):
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    bar = Progress(TextColumn("[bold]train"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                   TextColumn("{task.fields[info]}"), TimeRemainingColumn(), disable=quiet or not sys.stderr.isatty())
    bar.add_task("train", total=total, completed=done, info="")
    return bar


def train(cfg: ml_collections.ConfigDict, data_dir: str = "data/facts", workdir: str = "runs/tiny",
          init_from: str | None = None, quiet: bool = False, allow_config_change: bool = False,
          distributed: dict | None = None) -> dict:
    """Train per ``cfg.train`` (mode, steps, ...); resume from ``workdir`` when it has checkpoints.

    Nothing in the run directory changes before it is known that the run can go on: a config
    that differs from the run's in a section that defines the model or bank (or, without
    ``allow_config_change``, in ``train``), and checkpoints of which none restores, stop the
    run with one line and leave every file as it was. ``distributed``: the ``--coordinator``,
    ``--num-processes``, ``--process-id`` (and ``--local-device-ids``) of several processes.
    """
    maybe_initialize_distributed(**(distributed or {}))
    validate(cfg)
    t = cfg.train
    data_dir, run = location(data_dir), RunDir(workdir)
    workdir = run.path
    leader = jax.process_index() == 0
    has_checkpoints = bool(run.checkpoint_steps())
    if t.mode in ("frozen", "cotrain") and not init_from and not has_checkpoints:
        raise ConfigError(f"config key 'train.mode' = {t.mode!r} starts from a pretrained anchor: pass --init-from")
    mesh = build_mesh(cfg)
    check_batch(cfg, mesh)
    manifest = _check_data(cfg, data_dir)
    run.check_config(cfg, allow_train_change=allow_config_change)

    from memlm.data.loader import make_loader

    with run.lock() if leader else contextlib.nullcontext():
        fns = build(cfg, mesh)
        loader = make_loader(cfg, data_dir)
        banks = bank_io.RunBanks(workdir, fns.bank_layout, fns.generic_layout, cfg, mesh,
                                 tree_id=str(manifest["tree"]["id"]), plan=fns.plan, leaves_at=loader.global_leaves,
                                 shardings=fns.state_shardings.bank)
        abstract = abstract_like(anchor_items(fns.abstract_state()), anchor_items(fns.state_shardings))
        ckpt = None
        restored = None
        if has_checkpoints:
            probe = Checkpointer(workdir, keep=t.keep_checkpoints)
            try:
                restored = probe.restore(abstract, bank_ok=banks.why_not)  # raises CheckpointError: nothing changed
            finally:
                probe.close()
            if restored is not None:
                _check_edits(workdir, restored[0], t.steps)
        log = (lambda *a: None) if quiet or not leader else (lambda *a: print(*a, flush=True))
        if restored is not None and restored[0] < t.steps:
            _note_learned(workdir, log)
        if leader:
            run.write_config(cfg, os.fspath(data_dir), init_from)
        ckpt = Checkpointer(workdir, keep=t.keep_checkpoints)
        if restored is not None:
            step0, items, meta = restored
            loaded = banks.load(meta)
            state = TrainState(step=items["opt"]["step"], params=items["params"], opt_state=items["opt"]["opt_state"],
                               bank=loaded.get("bank"), generic=loaded.get("generic"))
            log(f"memlm train: resumed {workdir} at step {step0}")
        else:
            step0 = 0
            state = fns.init(t.seed, with_banks=False)
            if init_from:
                src_step, params = load_anchor_params(init_from, fns.fn.shapes, fns.state_shardings.params)
                state = state.replace(params=params)
                log(f"memlm train: anchor initialised from {init_from} (step {src_step})")
            created = banks.create()
            state = state.replace(bank=created.get("bank"), generic=created.get("generic"))
        return _loop(cfg, run, fns, loader, banks, ckpt, state, step0, log, quiet)


def _check_edits(workdir, step: int, steps: int) -> None:
    """A run that forgot documents (``memlm forget``) does not train on its data again: it would learn
    them back. Nothing is changed; the message says what to do instead."""
    from memlm.edit.documents import read_log

    if step < steps and any(e["verb"] == "forget" for e in read_log(workdir)):
        raise ConfigError(f"{workdir} has forgotten documents (memlm forget, edits/log.jsonl): training on its "
                          "data again would learn them back. Prepare the data without them and train a new run "
                          "(--init-from), or use memlm learn for new documents")


def _note_learned(workdir, log) -> None:
    """Training further a run that ``memlm learn`` taught: say that its data holds none of the learned
    documents, and that edit routing keeps comparing the learned leaves with their rows before the learn."""
    from memlm.edit.documents import read_log

    learns = [e["edit"] for e in read_log(workdir) if e["verb"] == "learn"]
    if learns:
        log(f"memlm train: {workdir} was taught by memlm learn (edit {', '.join(map(str, learns))}): its data holds "
            "none of the learned documents, and edit routing keeps comparing the learned leaves with their rows "
            "before the learn (docs/editing.md)")


def _evaluate(cfg, workdir, ckpt, writer: MetricsWriter, step: int, log) -> None:
    """``train.eval_every``: evaluate the checkpoint just saved (every process does the same reads and
    forwards; process 0 writes the row)."""
    from memlm.train.evaluation import evaluate_step, format_eval

    ckpt.wait()
    t0 = time.perf_counter()
    scalars = evaluate_step(cfg, workdir)
    writer.write(step, {**scalars, "eval/seconds": time.perf_counter() - t0})
    log(format_eval(step, scalars))


def _loop(cfg, run, fns, loader, banks, ckpt, state, step0, log, quiet) -> dict:
    from memlm.model.accounting import accounting

    t = cfg.train
    workdir = run.path
    acc = accounting(cfg)
    fl = acc["flops_per_token"]
    peak, peak_src = device_peak_flops()
    known_peak = peak_src.startswith("data sheet")  # else MFU is against a measured matmul rate: an estimate
    n_dev = jax.device_count()
    bytes_per_block = acc["fetched_params"] * np.dtype(cfg.memory.dtype).itemsize if fns.bank_layout else 0
    writer = MetricsWriter(workdir, trackers=t.trackers, config=cfg.to_dict(), project=t.wandb_project)
    log(f"memlm train: {cfg.name} mode={t.mode} steps={t.steps} batch={t.batch_size}x{cfg.data.seq_len} "
        f"(micro-batch {fns.plan.microbatch}) devices={n_dev} processes={jax.process_count()} "
        f"mesh={dict(fns.state_shardings.step.mesh.shape)} anchor={acc['anchor_params']:,} params "
        f"fetched={acc['fetched_params'] if fns.bank_layout else 0:,} -> {workdir}")

    last_good = step0
    window = _Window()
    result: dict[str, Any] = {"preempted": False}
    step = step0
    data_iter = loader.iterate(step0)
    t_start = time.perf_counter()
    bar = _progress(quiet or jax.process_index() != 0, t.steps, step0)
    with _Preemption() as preempt, bar:
        task = bar.tasks[0].id
        while step < t.steps:
            tw = time.perf_counter()
            host = next(data_iter)
            window.wait += time.perf_counter() - tw
            tiers = banks.tiers
            if tiers is not None:  # this step's rows of the off-device levels onto the device
                bank, host["slots"] = tiers.install(state.bank, step)
                state = state.replace(bank=bank)
                window.stall += tiers.stall_s
            state, metrics = fns.step(state, device_batch(host, fns.batch_shardings))
            if tiers is not None:
                if step + 1 < t.steps:
                    tiers.prefetch(step + 1)
                tiers.write_back(state.bank)
            step += 1
            window.add(host, fns.bank_layout is not None)
            log_now = step % t.log_every == 0 or step == t.steps
            eval_now = t.eval_every > 0 and (step % t.eval_every == 0 or step == t.steps)
            save_now = step % t.checkpoint_every == 0 or step == t.steps or eval_now  # evaluation opens the checkpoint
            # Block every few steps: multi-device CPU collectives can deadlock when too many steps queue.
            # The same steps on every process: that is where they agree on a preemption.
            first = step == step0 + 1
            if not (log_now or save_now or first or step % 4 == 0):
                continue
            stop = agreed(preempt.requested)
            save_now = save_now or stop
            m = jax.device_get(metrics)
            loss = float(m["loss"])
            if not math.isfinite(loss):
                ckpt.wait()
                raise TrainingError(f"non-finite loss ({loss}) at step {step}; stopped. The last good checkpoint "
                                    f"is step {last_good} in {workdir / 'checkpoints'}")
            if first and not log_now:
                log(f"step {step:>6}  loss {loss:.3f}  first step {time.perf_counter() - t_start:.1f} s "
                    "(compilation included)")
            if log_now:
                scalars = {k: float(v) for k, v in m.items()}
                scalars.update(window.summary(fl, peak * n_dev))
                if banks.tiers is not None:
                    scalars.update(banks.tiers.metrics())
                hist = None
                if fns.bank_layout is not None:
                    scalars.update(_hit_summary(host["paths"], host["generic"], cfg.tree.k, cfg.tree.depth))
                    scalars["bank/bytes_fetched"] = float((~host["generic"]).sum() * bytes_per_block)
                    hist = {"bank/leaf_hits": host["paths"][~host["generic"], -1]}
                writer.write(step, scalars, hist)
                mfu = f"MFU {100 * scalars['mfu']:.2f}%" + ("" if known_peak else " (est.)")
                info = f"loss {loss:.3f}  {scalars['tokens_per_s']:,.0f} tok/s  {mfu}"
                bar.update(task, completed=step, info=info)
                if bar.disable:
                    eta = format_seconds((t.steps - step) * scalars["step_time_s"])
                    log(f"step {step:>6}  {info}  grad {scalars['grad_norm']:.3f}  "
                        f"loader wait {1e3 * scalars['loader_wait_s']:.1f} ms  {scalars['step_time_s']:.2f} s/step  "
                        f"ETA {eta}")
                result["last"] = scalars
                window = _Window()
                run.heartbeat()
            if save_now:
                saved, meta = banks.save({"bank": state.bank, "generic": state.generic}, step)
                state = state.replace(bank=saved.get("bank", state.bank), generic=saved.get("generic", state.generic))
                ckpt.save(step, anchor_items(state), {**meta, "step": step})
                last_good = step
            if eval_now and not stop:
                _evaluate(cfg, workdir, ckpt, writer, step, log)
            if stop:
                result["preempted"] = True
                break
    ckpt.close()
    writer.close()
    if banks.tiers is not None:
        banks.tiers.close()
    result.update(step=step, workdir=str(workdir), peak_flops=peak, peak_source=peak_src)
    log(f"memlm train: {'stopped' if result['preempted'] else 'finished'} at step {step}; checkpoints in "
        f"{workdir / 'checkpoints'}, metrics in {workdir / 'metrics.jsonl'}")
    return result
