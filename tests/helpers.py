"""Small configs and references shared by the tests."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from memlm.config import default_config, validate
from memlm.memspec import block_arrays, fetched_rank


def small_config(memory_type: str = "ffn", sizes=(4, 4), **model):
    """A 3-layer float32 anchor small enough to compile in a second or two."""
    c = default_config()
    c.model.update(dict(d_model=32, n_layers=3, n_heads=4, head_dim=8, d_ff=64, vocab_size=128, vocab_multiple=64,
                        max_seq_len=64, compute_dtype="float32", remat="none", attention="xla", tied_embeddings=False))
    c.model.update(model)
    c.memory.update(type=memory_type, sizes=tuple(sizes))
    c.tree.update(k=4, depth=2)
    c.data.update(seq_len=32)
    return validate(c)


def random_memory(cfg, batch: int, key: jax.Array, at_init: bool = False, scale: float = 0.3) -> dict:
    """A FetchedMemory for ``batch`` sequences; ``at_init`` zeroes what the type initialises to zero."""
    out = {}
    r = fetched_rank(cfg)
    for i, ba in enumerate(block_arrays(cfg)):
        shape = (batch, *ba.shape(r))
        value = scale * jax.random.normal(jax.random.fold_in(key, i), shape, jnp.float32)
        out[ba.name] = jnp.zeros(shape, jnp.float32) if at_init and ba.init == "zeros" else value
    return out


@functools.cache
def jit_forward(f):
    """A jitted full forward ``(params, tokens, memory) -> logits`` of an AnchorFunctional (compiled once)."""
    return jax.jit(lambda p, t, m: f.apply(p, t, memory=m))


def small_model(seed: int = 0):
    """(config, functional, params) of the small FFN-memory anchor used by the scoring tests."""
    from memlm.model.functional import AnchorFunctional

    cfg = small_config("ffn", sizes=(4, 4))
    f = AnchorFunctional(cfg)
    return cfg, f, f.init(jax.random.key(seed))


class CharTokenizer:
    """A tokenizer over code points (id 0 is EOT): enough for scoring and generation tests."""

    eot_id = 0

    def encode(self, text):
        return [ord(c) for c in text]

    def decode(self, ids):
        return "".join(chr(i) for i in ids)
