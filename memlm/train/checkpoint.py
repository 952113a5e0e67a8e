"""Checkpoints: anchor, optimizer state, data-iterator state and the bank version, with orbax.

The anchor side (step, parameters, optimizer state) and the grain iterator go through one
orbax ``CheckpointManager`` (async saves, keep-latest-N). The bank is saved beside it by its
own store (only dirty blocks, versioned); each checkpoint records the bank version it pairs
with, and a checkpoint counts as complete only when orbax finalised it *and* that bank version
can be opened. Restoring walks back from the newest step: a corrupt or partial checkpoint is
reported by name and the previous complete one is used.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp


class Checkpointer:
    """One run's checkpoints under ``workdir/checkpoints``."""

    def __init__(self, workdir: str | Path, keep: int = 3, async_save: bool = True):
        self.dir = Path(workdir).resolve() / "checkpoints"
        self.manager = ocp.CheckpointManager(
            self.dir,
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save,
                                                 create=True),
        )

    def save(self, step: int, items: dict[str, Any], meta: dict, data_iter: Any | None = None) -> None:
        """Save ``items`` (name -> pytree, e.g. params and optimizer state), ``meta`` and the iterator."""
        import grain

        args = {name: ocp.args.StandardSave(tree) for name, tree in items.items()}
        args["meta"] = ocp.args.JsonSave(meta)
        if data_iter is not None:
            args["data"] = grain.checkpoint.CheckpointSave(data_iter)
        self.manager.save(step, args=ocp.args.Composite(**args), force=True)

    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps(), reverse=True)

    def restore(self, abstract_items: dict[str, Any], data_iter: Any | None = None,
                bank_ok=lambda meta: True) -> tuple[int, dict[str, Any], dict] | None:
        """(step, items, meta) of the newest complete checkpoint, or None when there is none.

        ``abstract_items`` carry the target shardings (ShapeDtypeStructs); ``bank_ok(meta)``
        says whether the bank version that checkpoint names can be opened.
        """
        import grain

        for step in self.steps():
            name = self.dir / str(step)
            try:
                args = {name: ocp.args.StandardRestore(tree) for name, tree in abstract_items.items()}
                args["meta"] = ocp.args.JsonRestore()
                if data_iter is not None:
                    args["data"] = grain.checkpoint.CheckpointRestore(data_iter)
                out = self.manager.restore(step, args=ocp.args.Composite(**args))
                meta = dict(out["meta"])
                if not bank_ok(meta):
                    raise ValueError(f"bank version {meta.get('bank_version')} is missing or incomplete")
                return step, {name: out[name] for name in abstract_items}, meta
            except Exception as e:  # noqa: BLE001 - any failure means this checkpoint is unusable
                print(f"memlm: checkpoint {name} is corrupt or incomplete ({type(e).__name__}: "
                      f"{str(e).splitlines()[0][:200]}); falling back to the previous one", file=sys.stderr)
        return None

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def abstract_like(tree: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs of ``tree`` (arrays or ShapeDtypeStructs) carrying ``shardings``."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def restore_item(workdir: str | Path, name: str, abstract: Any) -> tuple[int, Any, dict]:
    """One item (e.g. ``params``) of the newest complete checkpoint of a run, with its meta
    (the bank versions it pairs with)."""
    ckdir = Path(workdir).resolve() / "checkpoints"
    if not ckdir.exists():
        raise FileNotFoundError(f"{str(workdir)!r} has no checkpoints")
    mngr = ocp.CheckpointManager(ckdir)
    try:
        for step in sorted(mngr.all_steps(), reverse=True):
            try:
                out = mngr.restore(step, args=ocp.args.Composite(
                    **{name: ocp.args.StandardRestore(abstract), "meta": ocp.args.JsonRestore()}))
                return step, out[name], dict(out["meta"])
            except Exception as e:  # noqa: BLE001
                print(f"memlm: checkpoint {ckdir / str(step)} unusable ({type(e).__name__}: "
                      f"{str(e).splitlines()[0][:200]}); trying an older one", file=sys.stderr)
    finally:
        mngr.close()
    raise FileNotFoundError(f"{str(workdir)!r}: no complete checkpoint in {ckdir}")
