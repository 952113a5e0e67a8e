"""The run directory: its config, checkpoints paired with bank versions, the trainer's lock, and
opening a run for inference. Train, eval, serve and convert all use it; it imports none of them."""

from memlm.run.checkpoints import Checkpointer, CheckpointError, abstract_like, restore_item
from memlm.run.directory import RunDir, RunDirError
from memlm.run.paths import location

__all__ = ["CheckpointError", "Checkpointer", "RunDir", "RunDirError", "abstract_like", "location", "restore_item"]
