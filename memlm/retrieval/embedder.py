"""The config-driven embedder factory (the interface is ``memlm.retrieval.interface``).

An embedder maps texts to L2-normalised float32 vectors; the tree is fitted on these vectors and
every text (training document or evaluation context) is routed by them, so training and evaluation
must go through the same embedder instance type and settings. Whether a corpus embeds whole
documents or fixed windows of them (``tree.embed_unit``) is the data pipeline's choice: it calls
``embed`` with whatever texts that choice yields.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from memlm.retrieval.interface import Embedder, EmbedderError

if TYPE_CHECKING:
    import jax
    import ml_collections


def get_embedder(cfg: ml_collections.ConfigDict, mesh: jax.sharding.Mesh | None = None) -> Embedder:
    """The embedder named by ``cfg.tree.embedder`` ("minilm" or "hash").

    MiniLM uses ``cfg.tree.embed_batch`` texts per jitted call and windows of at most
    ``cfg.tree.embed_max_tokens`` word pieces, in ``cfg.tree.embed_dtype``; ``mesh`` (with a ``data``
    axis) shards its batches.
    """
    name = cfg.tree.embedder
    if name == "hash":
        from memlm.retrieval.hashing import HashingEmbedder

        return HashingEmbedder()
    if name == "minilm":
        from memlm.retrieval.minilm import MiniLMEmbedder

        return MiniLMEmbedder(batch=int(cfg.tree.embed_batch), max_tokens=int(cfg.tree.embed_max_tokens), mesh=mesh,
                              dtype=str(cfg.tree.get("embed_dtype", "float32")))
    raise EmbedderError(f"tree.embedder = {name!r}: unknown embedder; choose 'minilm' or 'hash'")


def local_embed_mesh() -> jax.sharding.Mesh | None:
    """A ``data`` mesh over this process's accelerators, so one prepare worker embeds on all of them;
    None on CPU (XLA already runs one CPU device on every core) or with a single device."""
    import jax

    devices = jax.local_devices()
    if jax.default_backend() == "cpu" or len(devices) < 2:
        return None
    return jax.sharding.Mesh(np.asarray(devices), ("data",))


def embed_dtype_of(embedder: Embedder) -> str:
    """The dtype an embedder computes in (the hashing embedder: float32)."""
    return str(getattr(embedder, "dtype", "float32"))
