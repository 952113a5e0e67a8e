"""Frozen-anchor training of an edit's blocks, from a run's newest checkpoint, saved into the run.

The step is ``memlm train``'s own in ``frozen`` mode (no anchor gradient) with only the edit's levels
learning (``train.memory_levels``), on the edit's training data with no generic-memory draws and no
sibling paths, so only the blocks of those levels on the paths of that data are updated and written
(the bank's row-wise AdamW leaves every other node, its moments and its counter as they were:
bit-identical). The memory learning rate is the edit's own: warmup, then
cosine over the edit's steps. The result is a new bank version and a checkpoint ``steps`` after the
run's newest, holding the same anchor; the edits log (written by the caller, after this) says what
it was. Until then nothing the run reads has changed: an interrupted edit leaves the run as it was
(a bank version written but not yet named by a checkpoint is rolled back on the next open).
"""

from __future__ import annotations

import copy
import math
import sys
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from memlm.edit.documents import EditError


def reset_nodes(bank, seed: int, nodes: dict[int, np.ndarray]):
    """``bank`` (a BankState) with the given nodes per level set back to their initial blocks, zero
    moments and counters, marked dirty (what a never-trained node is)."""
    from memlm.bank.init import init_blocks

    layout = bank.layout
    params = {k: dict(v) for k, v in bank.params.items()}
    mu = {k: dict(v) for k, v in bank.mu.items()}
    nu = {k: dict(v) for k, v in bank.nu.items()}
    count, dirty = dict(bank.count), dict(bank.dirty)
    for level, ids in nodes.items():
        if len(ids) == 0:
            continue
        lv, key = layout.level(level), f"level{level}"
        idx = jnp.asarray(np.asarray(ids, np.int32))
        for array in layout.arrays:
            name = array.name
            fresh = init_blocks(layout, seed, lv, array, idx)
            params[key][name] = params[key][name].at[idx].set(fresh.astype(params[key][name].dtype))
            mu[key][name] = mu[key][name].at[idx].set(0.0)
            nu[key][name] = nu[key][name].at[idx].set(0.0)
        count[key] = count[key].at[idx].set(0)
        dirty[key] = dirty[key].at[idx].set(True)
    return bank.replace(params=params, mu=mu, nu=nu, count=count, dirty=dirty)


def edit_config(cfg, steps: int, lr: float, batch_size: int | None, levels: list[int]):
    """The run's config as the edit trains: frozen anchor, only ``levels`` of the bank learning, the
    edit's steps and memory learning rate."""
    from memlm.config import validate

    c = copy.deepcopy(cfg)
    t = c.train
    t.mode, t.steps, t.subtree, t.sibling_path_prob, t.eval_every = "frozen", int(steps), -1, 0.0, 0
    t.memory_lr, t.memory_min_lr = float(lr), float(lr) / 10
    t.memory_warmup_steps = min(int(t.memory_warmup_steps), max(1, steps // 10))
    t.memory_levels = tuple(sorted(levels))
    if batch_size:
        t.batch_size = int(batch_size)
    return validate(c)


def default_steps(sequences: int, epochs: float, batch_size: int) -> int:
    """Steps that show each of ``sequences`` about ``epochs`` times."""
    return max(1, math.ceil(epochs * sequences / batch_size))


def train_blocks(cfg, workdir: Path, data_dir: Path, *, steps: int, lr: float, edit: int, levels: list[int],
                 reset: dict[int, np.ndarray] | None = None, batch_size: int | None = None,
                 origin: tuple[Path, dict[int, np.ndarray]] | None = None, quiet: bool = False) -> dict[str, Any]:
    """Train the blocks of ``levels`` on ``data_dir``'s paths for ``steps`` from the run's newest
    checkpoint (after ``reset``: per level the nodes set back to their initial blocks); save into the run.
    ``origin`` = (file, nodes per level): those nodes' rows are written there first, as they were
    (:mod:`memlm.edit.origin`)."""
    from memlm.data.loader import Loader
    from memlm.run import bank_io
    from memlm.run.checkpoints import Checkpointer, abstract_like
    from memlm.run.directory import RunDir
    from memlm.train.loop import _Preemption, anchor_items
    from memlm.train.mesh import build_mesh, check_batch
    from memlm.train.step import TrainState, build, device_batch

    ecfg = edit_config(cfg, steps, lr, batch_size, levels)
    log = (lambda *a: None) if quiet else (lambda *a: print(*a, flush=True))
    mesh = build_mesh(ecfg)
    check_batch(ecfg, mesh)
    fns = build(ecfg, mesh)
    loader = Loader(data_dir, batch_size=ecfg.train.batch_size, seed=ecfg.train.seed + edit, generic_prob=0.0,
                    num_threads=ecfg.data.num_threads, prefetch=ecfg.data.prefetch)
    from memlm.data.records import read_manifest

    run_manifest = read_manifest(RunDir(workdir).record()["data_dir"])
    banks = bank_io.RunBanks(workdir, fns.bank_layout, fns.generic_layout, ecfg, mesh,
                             tree_id=str(run_manifest["tree"]["id"]), plan=fns.plan, leaves_at=loader.global_leaves,
                             shardings=fns.state_shardings.bank)
    if banks.off_device:
        raise EditError("this run keeps bank levels off device (bank.device_levels): edits train on-device banks "
                        "only; pass --config.bank.device_levels=-1 if the bank fits")
    run = RunDir(workdir)
    with run.lock():
        ckpt = Checkpointer(workdir, keep=int(cfg.train.keep_checkpoints))
        try:
            abstract = abstract_like(anchor_items(fns.abstract_state()), anchor_items(fns.state_shardings))
            restored = ckpt.restore(abstract, bank_ok=banks.why_not)
            if restored is None:
                raise EditError(f"{str(workdir)!r} has no checkpoint to edit: train it first")
            step0, items, meta = restored
            loaded = banks.load(meta)
            state = TrainState(step=jnp.zeros((), jnp.int32), params=items["params"],
                               opt_state=items["opt"]["opt_state"], bank=loaded.get("bank"),
                               generic=loaded.get("generic"))
            origin_bytes = 0
            if origin is not None:
                from memlm.edit.origin import save_origin

                origin_bytes = save_origin(origin[0], state.bank, origin[1])
            if reset:
                state = state.replace(bank=jax.jit(lambda b: reset_nodes(b, ecfg.train.seed + 1, reset),
                                                   out_shardings=fns.state_shardings.bank)(state.bank))
            log(f"memlm: training the edit's blocks from step {step0}: {steps} steps of "
                f"{ecfg.train.batch_size} sequences ({loader.num_sequences} in the edit's data), memory lr {lr:g}, "
                f"level(s) {', '.join(map(str, levels))} learning; the anchor and every other block frozen")
            t0 = time.perf_counter()
            losses = []
            with _Preemption() as preempt:
                for s in range(steps):
                    state, metrics = fns.step(state, device_batch(loader.batch_at(s), fns.batch_shardings))
                    last = s + 1 == steps
                    if s % 4 == 3 or last or s == 0:  # block every few steps (CPU collectives)
                        loss = float(jax.device_get(metrics["loss"]))
                        losses.append((s + 1, loss))
                        if not math.isfinite(loss):
                            raise EditError(f"non-finite loss at edit step {s + 1}; the run was not changed")
                        if preempt.requested:
                            raise KeyboardInterrupt
                        if (s + 1) % max(1, steps // 10) == 0 or last or s == 0:
                            el = time.perf_counter() - t0
                            log(f"edit step {s + 1:>5}/{steps}  loss {loss:.3f}  {el / (s + 1):.2f} s/step")
            seconds = time.perf_counter() - t0
            new_step = step0 + steps
            state = state.replace(step=jnp.asarray(items["opt"]["step"] + steps, jnp.int32))
            saved, versions = banks.save({"bank": state.bank, "generic": state.generic}, new_step)
            ckpt.save(new_step, anchor_items(state), {**versions, "step": new_step, "edit": edit})
        finally:
            ckpt.close()
    print(f"memlm: saved bank version {versions.get('bank_version')} as checkpoint {new_step} of {workdir}",
          file=sys.stderr if quiet else sys.stdout)
    return {"from_step": int(step0), "step": int(new_step), "steps": int(steps), "seconds": round(seconds, 2),
            "loss_first": losses[0][1], "loss_last": losses[-1][1], "lr": float(lr),
            "batch_size": int(ecfg.train.batch_size), **({"origin_bytes": origin_bytes} if origin else {}),
            **{k: int(v) for k, v in versions.items()}}
