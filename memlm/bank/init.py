"""Block initialisation as a pure function of (seed, bank kind, level, array, node).

Every node's initial block comes from its own key, ``fold_in`` of the seed with the bank kind
(hierarchical or generic), the level, the array's position in the block and the node index,
so any subset of nodes can be initialised on its own: the device tier initialises each shard
where it lives, and the store never writes a block that was never trained (it recomputes it on
read). The same node gives the same values whichever way it is produced on one backend.

Initialisers (``BlockArray.init``):
- ``"normal"``: N(0, init_std^2) truncated to [-2 init_std, 2 init_std] (paper: truncated normal
  for W1/W2; the samples are ``init_std * z`` with z standard normal truncated at +-2).
- ``"zeros"``: W3 and the LoRA B factors, so the model with memory equals the anchor at step 0.
- ``"kaiming_uniform"``: U(-1/sqrt(fan_in), 1/sqrt(fan_in)) (LoRA A factors).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from memlm.bank.layout import BankLayout, LevelLayout
from memlm.memspec import BlockArray


def node_block(key: jax.Array, array: BlockArray, r: int, init_std: float) -> jax.Array:
    """One node's block of ``array`` (float32), from that node's key."""
    shape = array.shape(r)
    if array.init == "normal":
        return init_std * jax.random.truncated_normal(key, -2.0, 2.0, shape, jnp.float32)
    if array.init == "zeros":
        return jnp.zeros(shape, jnp.float32)
    if array.init == "kaiming_uniform":
        bound = 1.0 / np.sqrt(array.fan_in)
        return jax.random.uniform(key, shape, jnp.float32, -bound, bound)
    raise ValueError(f"block array {array.name!r}: unknown init {array.init!r}")


def init_blocks(layout: BankLayout, seed: int, lv: LevelLayout, array: BlockArray, nodes: jax.Array) -> jax.Array:
    """Initial blocks ``[len(nodes), *shape(r_l)]`` in the master dtype for the given node indices (jittable)."""
    base = jax.random.fold_in(jax.random.key(seed), int(layout.generic))
    base = jax.random.fold_in(jax.random.fold_in(base, lv.level), layout.arrays.index(array))
    blocks = jax.vmap(lambda n: node_block(jax.random.fold_in(base, n), array, lv.rank, layout.init_std))(nodes)
    return blocks.astype(layout.master_dtype)


def bucket(n: int) -> int:
    """Padded row count for host-side jitted helpers: 8, 32, 128, ... so few shapes get compiled."""
    size = 8
    while size < n:
        size *= 4
    return size


@functools.partial(jax.jit, static_argnums=(0, 2, 3))
def _init_rows_jit(layout: BankLayout, seed: jax.Array, level: int, name: str, nodes: jax.Array) -> jax.Array:
    return init_blocks(layout, seed, layout.level(level), layout.array(name), nodes)


def init_rows(layout: BankLayout, seed: int, level: int, name: str, nodes: np.ndarray) -> np.ndarray:
    """Host copy of the initial blocks of ``nodes``, computed on the CPU backend in chunks of at
    most 512 nodes (row counts padded to a few bucket sizes, so that few shapes get compiled)."""
    nodes = np.asarray(nodes, np.int32)
    lv, a = layout.level(level), layout.array(name)
    out = np.zeros((nodes.shape[0], *a.shape(lv.rank)), dtype=jnp.dtype(layout.master_dtype))
    if a.init == "zeros":
        return out
    cpu = jax.local_devices(backend="cpu")[0]  # this process's CPU (jax.devices("cpu")[0] is process 0's)
    for start in range(0, nodes.shape[0], 512):
        part = nodes[start:start + 512]
        idx = np.zeros(bucket(part.shape[0]), np.int32)
        idx[:part.shape[0]] = part
        with jax.default_device(cpu):
            rows = _init_rows_jit(layout, np.uint32(seed), level, name, jnp.asarray(idx))
        out[start:start + part.shape[0]] = np.asarray(rows)[:part.shape[0]]
    return out
