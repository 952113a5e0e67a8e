"""Devices and mesh: multi-host initialisation and the (data, fsdp, tensor) mesh from config."""

from __future__ import annotations

import os

import jax
import ml_collections
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from memlm.config import ConfigError, mesh_shape
from memlm.sharding import make_mesh

_MULTI_PROCESS_ENV = ("JAX_COORDINATOR_ADDRESS", "COORDINATOR_ADDRESS", "SLURM_NTASKS", "TPU_WORKER_HOSTNAMES",
                      "MEGASCALE_COORDINATOR_ADDRESS")


def maybe_initialize_distributed() -> None:
    """Call ``jax.distributed.initialize`` when the environment describes several processes.

    On SLURM, TPU pods and with an explicit coordinator, jax discovers the cluster itself; a
    single process needs nothing, so a laptop, one GPU and a pod run the same command.
    """
    if jax.distributed.is_initialized():
        return
    if os.environ.get("SLURM_NTASKS", "1") != "1" or any(
            os.environ.get(k) for k in _MULTI_PROCESS_ENV if k != "SLURM_NTASKS"):
        jax.distributed.initialize()


def build_mesh(cfg: ml_collections.ConfigDict) -> Mesh:
    """The training mesh; fails naming ``mesh`` when its sizes do not match the devices."""
    return make_mesh(mesh_shape(cfg, jax.device_count()))


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
    """Batch-leading arrays split over the data-parallel axes."""
    return NamedSharding(mesh, P(("data", "fsdp"), *([None] * (ndim - 1))))


def check_batch(cfg: ml_collections.ConfigDict, mesh: Mesh) -> None:
    """The global batch must split evenly over the data-parallel devices and the processes."""
    dp = mesh.shape["data"] * mesh.shape["fsdp"]
    b = cfg.train.batch_size
    if b % dp:
        raise ConfigError(f"config key 'train.batch_size' = {b}: not divisible by the data-parallel size {dp} "
                          f"(mesh data={mesh.shape['data']} x fsdp={mesh.shape['fsdp']})")
    if b % jax.process_count():
        raise ConfigError(f"config key 'train.batch_size' = {b}: not divisible by {jax.process_count()} processes")
