"""Devices and mesh: multi-host initialisation and the (data, fsdp, tensor) mesh from config."""

from __future__ import annotations

import math
import os

import jax
import ml_collections
from jax.sharding import Mesh

from memlm.config import ConfigError, mesh_shape
from memlm.sharding import DP_AXES, make_mesh

_MULTI_PROCESS_ENV = ("JAX_COORDINATOR_ADDRESS", "COORDINATOR_ADDRESS", "SLURM_NTASKS", "TPU_WORKER_HOSTNAMES",
                      "MEGASCALE_COORDINATOR_ADDRESS")


def maybe_initialize_distributed(coordinator: str | None = None, num_processes: int | None = None,
                                 process_id: int | None = None, local_device_ids: list[int] | None = None) -> None:
    """Start ``jax.distributed`` when flags or the environment describe several processes.

    Flags (``--coordinator HOST:PORT --num-processes N --process-id I``) win over the
    environment; without them SLURM, TPU pods and an explicit coordinator variable are left to
    jax's own detection, and a single process needs nothing, so a laptop, one GPU and a pod run
    the same command. Collectives between processes on CPU go through gloo.
    """
    if jax.distributed.is_initialized():
        return
    given = [coordinator, num_processes, process_id]
    if any(x is not None for x in given):
        if any(x is None for x in given):
            raise ConfigError("--coordinator, --num-processes and --process-id go together (all three or none)")
        if not 0 <= process_id < num_processes:
            raise ConfigError(f"--process-id {process_id} is outside [0, --num-processes {num_processes})")
        if num_processes == 1:
            return
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                                   process_id=process_id, local_device_ids=local_device_ids,
                                   initialization_timeout=300)
        return
    if os.environ.get("SLURM_NTASKS", "1") != "1" or any(
            os.environ.get(k) for k in _MULTI_PROCESS_ENV if k != "SLURM_NTASKS"):
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(local_device_ids=local_device_ids)


def build_mesh(cfg: ml_collections.ConfigDict) -> Mesh:
    """The training mesh; fails naming ``mesh`` when its sizes do not match the devices."""
    return make_mesh(mesh_shape(cfg, jax.device_count()))


def check_batch(cfg: ml_collections.ConfigDict, mesh: Mesh) -> None:
    """The global batch must split evenly over the data-parallel devices and the processes."""
    dp = math.prod(mesh.shape[a] for a in DP_AXES)
    b = cfg.train.batch_size
    if b % dp:
        raise ConfigError(f"config key 'train.batch_size' = {b}: not divisible by the data-parallel size {dp} "
                          f"(mesh data={mesh.shape['data']} x fsdp={mesh.shape['fsdp']})")
    if b % jax.process_count():
        raise ConfigError(f"config key 'train.batch_size' = {b}: not divisible by {jax.process_count()} processes")
