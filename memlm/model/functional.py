"""A functional view of the anchor for jitted steps: parameters as a plain nested dict.

The train step, the sharding rules and the checkpoints all see the same pure pytree
(``{"wq": array, ...}``), built from an abstract NNX model (nothing is allocated until
:meth:`init` runs under ``jit`` with its output shardings, so no process ever holds an
unsharded copy). ``apply`` merges the dict back into the NNX module inside the trace.
"""

from __future__ import annotations

import jax
import ml_collections
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from memlm.model.anchor import Anchor, AnchorSpec
from memlm.sharding import logical_to_spec


def _is_var(x) -> bool:
    return isinstance(x, nnx.Variable)


class AnchorFunctional:
    """Pure-function access to an :class:`Anchor`: ``init(key) -> params``, ``apply(params, ...)``."""

    def __init__(self, cfg: ml_collections.ConfigDict | AnchorSpec):
        self.spec = cfg if isinstance(cfg, AnchorSpec) else AnchorSpec.from_config(cfg)
        with nnx.use_eager_sharding(False):
            abstract = nnx.eval_shape(lambda: Anchor(self.spec, rngs=nnx.Rngs(0)))
        self.graphdef, self._abstract = nnx.split(abstract)
        self.axes = self._axes()
        self.shapes = jax.tree.map(lambda v: jax.ShapeDtypeStruct(v.shape, v.dtype), nnx.to_pure_dict(self._abstract))

    def _axes(self) -> dict:
        flat = nnx.to_flat_state(self._abstract)
        out: dict = {}
        for path, var in flat:
            node = out
            for k in path[:-1]:
                node = node.setdefault(k, {})
            node[path[-1]] = tuple(var.get_metadata()["logical_axes"])
        return out

    def shardings(self, mesh: Mesh) -> dict:
        """NamedSharding per parameter from the logical-axis rule table."""
        return jax.tree.map(lambda ax, s: NamedSharding(mesh, logical_to_spec(ax, s.shape, mesh)),
                            self.axes, self.shapes, is_leaf=lambda x: isinstance(x, tuple))

    def init(self, key: jax.Array, mesh: Mesh | None = None) -> dict:
        """Initialised parameters; with ``mesh``, created directly in their shardings."""

        def make(k):
            with nnx.use_eager_sharding(False):
                model = Anchor(self.spec, rngs=nnx.Rngs(params=k))
            return nnx.to_pure_dict(nnx.state(model))

        if mesh is None:
            return jax.jit(make)(key)
        return jax.jit(make, out_shardings=self.shardings(mesh))(key)

    def merge(self, params: dict) -> Anchor:
        state = jax.tree.map(lambda v: v, self._abstract, is_leaf=_is_var)
        nnx.replace_by_pure_dict(state, params)
        return nnx.merge(self.graphdef, state)

    def apply(self, params: dict, *args, **kwargs):
        """Call the anchor with these parameters (see :meth:`Anchor.__call__`)."""
        return self.merge(params)(*args, **kwargs)

    def project(self, params: dict, hidden: jax.Array) -> jax.Array:
        """float32 logits of final-normed hidden states (the output head; see :meth:`Anchor.project`)."""
        return self.merge(params).project(hidden)
