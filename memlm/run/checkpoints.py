"""Checkpoints of a run: anchor parameters, optimizer state and the bank versions they pair with.

One orbax ``CheckpointManager`` (async saves, keep-latest-N; under ``jax.distributed`` every
process writes its own shards and process 0 the metadata) holds, per step, the items
``params`` and ``opt`` (pytrees) and ``meta`` (JSON: the step, the bank and generic versions
it pairs with). The data position is not saved: the batch is a pure function of (seed, step),
so a checkpoint restores onto any mesh or process count (the targets' shardings say where
every shard goes) and the loader simply starts at the restored step.

A checkpoint counts as complete only when orbax finalised it *and* the bank versions it names
can be opened. :meth:`Checkpointer.restore` returns the newest complete one, or raises
:class:`CheckpointError` listing, one line per checkpoint, why none restores: the caller stops
there and changes nothing (a run's trained bank is never replaced because its checkpoints did
not load).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath

from memlm.run.paths import location


class CheckpointError(ValueError):
    """No checkpoint of a run that has checkpoints can be restored; the message lists why."""


def _reason(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:240] if text else ''}"


class Checkpointer:
    """One run's checkpoints under ``RUN_DIR/checkpoints``."""

    def __init__(self, workdir: str | os.PathLike | epath.Path, keep: int = 3, async_save: bool = True):
        self.dir = location(workdir) / "checkpoints"
        self.manager = ocp.CheckpointManager(
            self.dir, options=ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save,
                                                           create=True))

    def save(self, step: int, items: dict[str, Any], meta: dict) -> None:
        """Save ``items`` (name -> pytree) and ``meta`` as ``step`` (every process calls this)."""
        args = {name: ocp.args.StandardSave(tree) for name, tree in items.items()}
        args["meta"] = ocp.args.JsonSave(meta)
        self.manager.save(step, args=ocp.args.Composite(**args), force=True)

    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps(), reverse=True)

    def restore(self, abstract_items: dict[str, Any],
                bank_ok: Callable[[dict], str | None] = lambda meta: None) -> tuple[int, dict[str, Any], dict] | None:
        """(step, items, meta) of the newest complete checkpoint; None when the run has none.

        ``abstract_items`` carry the target shardings (ShapeDtypeStructs). ``bank_ok(meta)`` returns
        why the bank versions a checkpoint names cannot be opened (None when they can).
        """
        reasons = []
        for step in self.steps():
            try:
                args = {name: ocp.args.StandardRestore(tree) for name, tree in abstract_items.items()}
                args["meta"] = ocp.args.JsonRestore()
                meta = dict(self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"])
                why = bank_ok(meta)
                if why:
                    reasons.append(f"checkpoint {step}: {why}")
                    continue
                out = self.manager.restore(step, args=ocp.args.Composite(**args))
                return step, {name: out[name] for name in abstract_items}, meta
            except Exception as e:  # noqa: BLE001 - any failure means this checkpoint is unusable
                reasons.append(f"checkpoint {step}: {_reason(e)}")
        if reasons:
            raise CheckpointError(f"{self.dir} has checkpoints but none restores ({'; '.join(reasons)}); nothing "
                                  "was changed. Fix the cause (e.g. the data or config the run was trained with) "
                                  "or train in a new --workdir")
        return None

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def abstract_like(tree: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs of ``tree`` (arrays or ShapeDtypeStructs) carrying ``shardings``."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def restore_item(workdir: str | os.PathLike | epath.Path, name: str, abstract: Any) -> tuple[int, Any, dict]:
    """One item (e.g. ``params``) of the newest complete checkpoint of a run, with its meta
    (the bank versions it pairs with). Older checkpoints are tried when a newer one is damaged."""
    ckdir = location(workdir) / "checkpoints"
    if not ckdir.exists():
        raise FileNotFoundError(f"{os.fspath(location(workdir))!r} has no checkpoints")
    mngr = ocp.CheckpointManager(ckdir)
    reasons = []
    try:
        for step in sorted(mngr.all_steps(), reverse=True):
            try:
                out = mngr.restore(step, args=ocp.args.Composite(
                    **{name: ocp.args.StandardRestore(abstract), "meta": ocp.args.JsonRestore()}))
                return step, out[name], dict(out["meta"])
            except Exception as e:  # noqa: BLE001
                reasons.append(f"checkpoint {step}: {_reason(e)}")
    finally:
        mngr.close()
    raise FileNotFoundError(f"{os.fspath(ckdir)!r}: no complete checkpoint ({'; '.join(reasons) or 'none saved'})")
