"""Metrics that tell the truth: ``metrics.jsonl``, TensorBoard events and a console line.

MFU = tokens/s x training FLOPs per token / (peak FLOP/s x devices), with the FLOPs per token
of :func:`memlm.model.accounting.accounting` (6N over every matrix the token passes, causal
attention halved, memory FLOPs = 6 x fetched parameters, counted only for sequences that
fetch). The peak is the device's dense bf16 figure from its data sheet where known, else a
measured matmul rate (CPU), and the source is logged with it.
"""

from __future__ import annotations

import json
import secrets
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

# Dense bf16 peak FLOP/s per device, from vendor data sheets.
PEAK_FLOPS = {
    "H100": 989e12, "H200": 989e12, "H800": 989e12, "GH200": 989e12, "B200": 2250e12, "A100": 312e12,
    "A10G": 125e12, "L4": 121e12, "TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v5p": 459e12,
    "TPU v6 lite": 918e12, "TPU v6e": 918e12,
}


def device_peak_flops() -> tuple[float, str]:
    """(peak FLOP/s of one device, where the number comes from)."""
    kind = jax.devices()[0].device_kind
    for name, peak in PEAK_FLOPS.items():
        if name.lower() in kind.lower():
            return peak, f"data sheet ({kind})"
    n = 512
    a = jnp.ones((n, n), jnp.float32)
    mm = jax.jit(lambda x: x @ x)
    mm(a).block_until_ready()
    t = time.perf_counter()
    for _ in range(10):
        out = mm(a)
    out.block_until_ready()
    return 2 * n**3 * 10 / (time.perf_counter() - t) / jax.local_device_count(), f"measured fp32 matmul ({kind})"


TRACKERS = ("tensorboard", "wandb")


class TrackerError(ValueError):
    """A tracker named in ``train.trackers`` cannot be used (its package is missing)."""


class MetricsWriter:
    """Writes each logged step to ``metrics.jsonl`` (always: the run's record), TensorBoard and, when
    ``train.trackers`` names it, Weights & Biases (process 0 only).

    wandb: the run is named after the config and run directory, its files go under ``RUN/wandb/``,
    a resumed run continues the same wandb run (its id is kept in ``RUN/wandb_id``), and
    ``WANDB_MODE=offline`` records without network (``wandb sync`` uploads later).
    """

    def __init__(self, workdir: str | Path, enabled: bool | None = None, trackers: str = "tensorboard",
                 config: dict | None = None, project: str = "memlm"):
        from memlm.run.paths import is_local, location

        self.enabled = jax.process_index() == 0 if enabled is None else enabled
        root = location(workdir)
        self.path = root / "metrics.jsonl"
        self._local = is_local(root)
        self._lines: list[str] | None = None  # remote stores cannot append: the file is rewritten whole
        self._tb = self._wandb = None
        names = [t.strip() for t in str(trackers).split(",") if t.strip()]
        if self.enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if not self._local:
                self._lines = self.path.read_text().splitlines(keepends=True) if self.path.exists() else []
            if "tensorboard" in names:
                try:
                    from tensorboardX import SummaryWriter

                    self._tb = SummaryWriter(str(root / "tensorboard"), flush_secs=10) if self._local else None
                except ImportError:  # TensorBoard events are optional; metrics.jsonl always exists
                    self._tb = None
            if "wandb" in names:
                self._wandb = _wandb_run(root, config or {}, project)

    def write(self, step: int, scalars: dict[str, Any], histograms: dict[str, np.ndarray] | None = None) -> None:
        if not self.enabled:
            return
        clean = {k: (float(v) if isinstance(v, np.floating | np.integer | float | int) else v)
                 for k, v in scalars.items()}
        line = json.dumps({"step": int(step), **clean}) + "\n"
        if self._lines is None:
            with open(self.path, "a") as f:
                f.write(line)
        else:
            self._lines.append(line)
            self.path.write_text("".join(self._lines))
        if self._tb is not None:
            for k, v in clean.items():
                if isinstance(v, float | int):
                    self._tb.add_scalar(k, v, step)
            for k, h in (histograms or {}).items():
                if h.size:
                    self._tb.add_histogram(k, h, step)
        if self._wandb is not None:
            self._wandb.log({k: v for k, v in clean.items() if isinstance(v, float | int)}, step=int(step))

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None


def _wandb_run(root: Path, config: dict, project: str):
    """A wandb run for this run directory: the same wandb run again when it resumes."""
    try:
        import wandb
    except ImportError:
        raise TrackerError("train.trackers names wandb, which is not installed: pip install 'memlm[track]'") from None
    id_file = root / "wandb_id"
    run_id = id_file.read_text().strip() if id_file.exists() else secrets.token_hex(4)
    if not id_file.exists():
        id_file.write_text(run_id + "\n")
    name = f"{config.get('name', 'memlm')}-{root.name}"
    return wandb.init(project=project, name=name, id=run_id, resume="allow", dir=str(root), config=config,
                      settings=wandb.Settings(console="off", x_disable_stats=True))


def read_metrics(workdir: str | Path) -> list[dict]:
    """All logged steps of a run, one record per step: records of the same step (training scalars and an
    evaluation row, or a step logged again after a resume) merge, the later one's values winning."""
    from memlm.run.paths import location

    path = location(workdir) / "metrics.jsonl"
    if not path.exists():
        return []
    by_step: dict[int, dict] = {}
    for line in path.read_text().splitlines():
        if line.strip():
            rec = json.loads(line)
            by_step.setdefault(rec["step"], {}).update(rec)
    return [by_step[s] for s in sorted(by_step)]
