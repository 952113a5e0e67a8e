"""The run directory: its recorded config, its checkpoints and banks, and the lock of the trainer.

Layout (DESIGN §6)::

    RUN_DIR/config.json     {"config": <the full config>, "data_dir": ..., "init_from": ...}
    RUN_DIR/checkpoints/    orbax: anchor, optimizer, the bank versions each step pairs with
    RUN_DIR/bank/, generic/ tensorstore banks, versioned (memlm.bank.store)
    RUN_DIR/metrics.jsonl, tensorboard/, eval/

Train, eval, serve and convert all open runs through :class:`RunDir`. Its rules keep trained
work safe: the sections that define the model and bank (``model``, ``memory``, ``tree``) never
change in a run; the ``train`` section changes only when the caller says it means it (a new
``train.steps`` re-shapes the cosine mid-run); and one trainer at a time holds the run's lock.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
from collections.abc import Iterator
from typing import Any

import ml_collections
from etils import epath

from memlm.config import ConfigError, config_from_json, validate
from memlm.run.paths import is_local, location

FROZEN_SECTIONS = ("model", "memory", "tree")  # they define the anchor and the bank
GUARDED_SECTIONS = ("train",)  # changing them mid-run needs an explicit flag
LEASE_SECONDS = 600  # a remote run's lease goes stale this long after its holder's last heartbeat


class RunDirError(ValueError):
    """A run directory cannot be used as asked; the message says why, in one line."""


def _diff(old: dict, new: dict) -> dict:
    keys = sorted(set(old) | set(new))
    return {k: (old.get(k), new.get(k)) for k in keys if old.get(k) != new.get(k)}


def config_from_record(record: dict) -> ml_collections.ConfigDict:
    """The validated ConfigDict of a ``config.json`` record (tuples restored; keys added since the run
    was recorded keep their defaults, so an older run still opens)."""
    return validate(config_from_json(record, "config.json"))


class RunDir:
    """One run directory (a local path or a URL)."""

    def __init__(self, path: str | os.PathLike | epath.Path):
        self.path = location(path)

    def __str__(self) -> str:
        return os.fspath(self.path)

    @property
    def config_path(self) -> epath.Path:
        return self.path / "config.json"

    @property
    def checkpoints(self) -> epath.Path:
        return self.path / "checkpoints"

    def bank(self, name: str = "bank") -> epath.Path:
        return self.path / name

    def exists(self) -> bool:
        return self.config_path.exists()

    # ---- the recorded config -------------------------------------------------------------------
    def record(self) -> dict:
        if not self.config_path.exists():
            raise FileNotFoundError(f"{self} is not a memlm run directory (no config.json)")
        return json.loads(self.config_path.read_text())

    def load_config(self) -> tuple[ml_collections.ConfigDict, dict]:
        """The config the run used, and its record (``data_dir``, ``init_from``)."""
        record = self.record()
        return config_from_record(record), record

    def check_config(self, cfg: ml_collections.ConfigDict, allow_train_change: bool = False) -> None:
        """Refuse a config the recorded run cannot continue with (the message names the section)."""
        if not self.config_path.exists():
            return
        # a key memlm no longer has is no change, nor is one added since at its default
        old = json.loads(config_from_record(self.record()).to_json())
        new = json.loads(cfg.to_json())
        for section in FROZEN_SECTIONS:
            if old.get(section) != new[section]:
                raise ConfigError(f"config section {section!r} differs from the run in {self} (was -> now: "
                                  f"{_diff(old.get(section, {}), new[section])}); use a new --workdir")
        if not allow_train_change:
            for section in GUARDED_SECTIONS:
                if old.get(section) != new[section]:
                    raise ConfigError(f"config section {section!r} differs from the run in {self} (was -> now: "
                                      f"{_diff(old.get(section, {}), new[section])}); pass --allow-config-change "
                                      "if you mean to change it mid-run")

    def write_config(self, cfg: ml_collections.ConfigDict, data_dir: str | None, init_from: str | None,
                     **extra: Any) -> None:
        """Record the config (atomically: a reader never sees half a file). The one writer of a run's
        ``config.json``: train, merge and convert all record through it; ``extra`` adds fields after
        ``init_from`` (a conversion's ``converted_from``)."""
        self.path.mkdir(parents=True, exist_ok=True)
        record = {"config": json.loads(cfg.to_json()),
                  "data_dir": None if data_dir is None else str(location(data_dir)),
                  "init_from": None if init_from is None else str(location(init_from)), **extra}
        tmp = self.path / "config.json.tmp"
        tmp.write_text(json.dumps(record, indent=2))
        tmp.replace(self.config_path)

    # ---- checkpoints -----------------------------------------------------------------------------
    def checkpoint_steps(self) -> list[int]:
        """Steps with a checkpoint directory, newest first (complete or not)."""
        if not self.checkpoints.exists():
            return []
        return sorted((int(p.name) for p in self.checkpoints.iterdir() if p.name.isdigit()), reverse=True)

    # ---- the trainer's lock ----------------------------------------------------------------------
    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Hold the run for one trainer. Local runs use ``flock`` (the kernel drops it with the
        process, so a killed trainer leaves nothing stuck); remote runs a lease file whose holder
        refreshes it (:meth:`heartbeat`) and which goes stale ``LEASE_SECONDS`` after the last one."""
        self.path.mkdir(parents=True, exist_ok=True)
        if is_local(self.path):
            import fcntl

            path = self.path / ".lock"
            f = open(os.fspath(path), "a+")  # noqa: SIM115 - held for the whole run
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                f.seek(0)
                holder = f.read().strip() or "another process"
                f.close()
                raise RunDirError(f"{self} is being trained by {holder}; wait for it or use another "
                                  "--workdir") from None
            f.seek(0)
            f.truncate()
            f.write(f"pid {os.getpid()} on {socket.gethostname()}")
            f.flush()
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)
                f.close()
            return
        lease = self.path / ".lease.json"
        me = {"host": socket.gethostname(), "pid": os.getpid(), "time": time.time()}
        if lease.exists():
            other = json.loads(lease.read_text())
            if (other.get("host"), other.get("pid")) != (me["host"], me["pid"]) and \
                    time.time() - float(other.get("time", 0)) < LEASE_SECONDS:
                raise RunDirError(f"{self} is being trained by pid {other.get('pid')} on {other.get('host')} "
                                  f"(lease refreshed {time.time() - float(other['time']):.0f} s ago)")
        self._lease = lease
        lease.write_text(json.dumps(me))
        try:
            yield
        finally:
            with contextlib.suppress(Exception):
                lease.unlink()

    def heartbeat(self) -> None:
        """Refresh a remote run's lease (no-op for local runs)."""
        lease = getattr(self, "_lease", None)
        if lease is not None:
            lease.write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "time": time.time()}))
