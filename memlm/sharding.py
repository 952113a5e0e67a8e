"""Logical axis names and the one rule table that maps them to mesh axes.

Every parameter and key activation carries logical names ("embed", "mlp", "heads", ...).
Changing parallelism is a change of mesh sizes, not of code: the mesh has three axes
(``data``, ``fsdp``, ``tensor``) and this table says which logical axis lands where. A mesh
axis of size 1 is dropped, a mesh axis is never used twice in one spec, and a dimension that
the mesh axes do not divide stays replicated, so one table serves every preset and topology.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh
from jax.sharding import PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")
DP_AXES = ("data", "fsdp")  # the data-parallel mesh axes: the batch and a bank level's nodes split over both

# logical axis -> mesh axes, in priority order.
RULES: dict[str, tuple[str, ...]] = {
    "batch": DP_AXES,
    "bank_nodes": DP_AXES,  # the bank's node axis: sharded over the data-parallel axes
    "vocab": ("tensor",),
    "embed": ("fsdp",),
    "heads": ("tensor",),
    "kv_heads": ("tensor",),
    "q_heads": ("tensor",),
    "mlp": ("tensor",),
    "mem_rank": ("tensor",),
    "layers": (),
    "head_dim": (),
    "seq": (),
    "norm": (),
}


def make_mesh(shape: Sequence[int], devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A (data, fsdp, tensor) mesh with Auto axes (GSPMD style)."""
    devices = list(devices if devices is not None else jax.devices())
    n = int(np.prod(shape))
    return jax.make_mesh(tuple(shape), MESH_AXES, axis_types=(AxisType.Auto,) * 3, devices=devices[:n])


def logical_to_spec(axes: Sequence[str | None], shape: Sequence[int], mesh: Mesh,
                    rules: dict[str, tuple[str, ...]] | None = None) -> P:
    """PartitionSpec for an array with these logical axes and shape on ``mesh``."""
    rules = RULES if rules is None else rules
    used: set[str] = set()
    spec: list[str | tuple[str, ...] | None] = []
    for name, dim in zip(axes, shape, strict=True):
        chosen: list[str] = []
        size = 1
        for mesh_axis in rules.get(name, ()) if name else ():
            n = mesh.shape.get(mesh_axis, 1)
            if n == 1 or mesh_axis in used or dim % (size * n):
                continue
            chosen.append(mesh_axis)
            size *= n
        used.update(chosen)
        spec.append(None if not chosen else chosen[0] if len(chosen) == 1 else tuple(chosen))
    return P(*spec)


def constrain(x: jax.Array, axes: Sequence[str | None]) -> jax.Array:
    """with_sharding_constraint by logical names, when a mesh is active; identity otherwise."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh is None or mesh.empty or mesh.size == 1:
        return x
    return jax.lax.with_sharding_constraint(x, logical_to_spec(axes, x.shape, mesh))
