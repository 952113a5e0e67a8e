"""Small configs and references shared by the tests."""

from __future__ import annotations

import functools
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from memlm.config import ConditionError, default_config, validate
from memlm.infer.conditions import parse_conditions
from memlm.memspec import FetchedMemory, block_arrays, fetched_rank


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


def reference_step(cfg, state, batch):
    """An independent whole-batch step on one device: per-sequence fetched memory gathered from the
    bank, full logits, optax AdamW for the anchor and the single-device sparse row-wise AdamW for the
    bank (``tests/oracles.sparse_adamw``), clipped by the joint global norm."""
    import optax
    from oracles import fetched_grad_sq_norm, sparse_adamw

    from memlm.bank import gather
    from memlm.model.functional import AnchorFunctional
    from memlm.train.schedule import cosine_with_warmup
    from memlm.train.step import anchor_optimizer, next_token_loss

    t = cfg.train
    fn = AnchorFunctional(cfg)
    tx = anchor_optimizer(cfg, fn)
    tokens, seg, pos = batch["tokens"], batch["segment_ids"], batch["positions"]
    b = tokens.shape[0]
    paths = jnp.asarray(batch["paths"])
    memory = state.bank is not None
    train_anchor = t.mode != "frozen"
    use_generic = jnp.asarray(batch["generic"]) if state.generic is not None else jnp.zeros((b,), bool)
    # sibling-path rows read their (sibling's) blocks but leave them untouched: masked out of the bank's update
    touched = ~use_generic & ~jnp.asarray(batch.get("sibling", np.zeros(b, bool)))
    fetched = None
    if memory:
        fetched = gather(state.bank, paths)
        fetched = {n: v.astype(cfg.memory.dtype).astype(jnp.float32) for n, v in fetched.items()}
        if state.generic is not None:
            gen = gather(state.generic, jnp.zeros((b, 1), jnp.int32))
            fetched = {n: jnp.where(use_generic.reshape((b,) + (1,) * (v.ndim - 1)),
                                    gen[n].astype(cfg.memory.dtype).astype(jnp.float32), v) for n, v in fetched.items()}

    def loss(params, mem):
        return next_token_loss(fn.apply(params, tokens, seg, pos, memory=mem), tokens, seg)

    argnums = ((0, 1) if train_anchor else 1) if memory else 0
    (value, _), grads = jax.value_and_grad(loss, argnums=argnums, has_aux=True)(state.params, fetched)
    g_params, g_mem = (grads if train_anchor else (None, grads)) if memory else (grads, None)
    sq = jnp.zeros(())
    if g_params is not None:
        sq = sq + optax.tree_utils.tree_norm(g_params, squared=True)
    if g_mem is not None:
        sq = sq + fetched_grad_sq_norm(state.bank.layout, paths, g_mem, touched)
        if state.generic is not None:
            sq = sq + fetched_grad_sq_norm(state.generic.layout, jnp.zeros((b, 1), jnp.int32), g_mem, use_generic)
    scale = jnp.minimum(1.0, t.clip_norm / (jnp.sqrt(sq) + 1e-6))
    params, opt_state, bank, generic = state.params, state.opt_state, state.bank, state.generic
    if g_params is not None:
        updates, opt_state = tx.update(jax.tree.map(lambda g: g * scale, g_params), opt_state, params)
        params = optax.apply_updates(params, updates)
    if g_mem is not None:
        g_mem = jax.tree.map(lambda g: g * scale, g_mem)
        lr = cosine_with_warmup(t.memory_lr, t.memory_min_lr, t.memory_warmup_steps, t.steps)(state.step)
        kw = dict(lr=lr, b1=t.b1, b2=t.b2, eps=t.eps, weight_decay=t.memory_weight_decay)
        bank = sparse_adamw(bank, paths, g_mem, touched, **kw)
        if generic is not None:
            generic = sparse_adamw(generic, jnp.zeros((b, 1), jnp.int32), g_mem, use_generic, **kw)
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state, bank=bank, generic=generic), value


class DictMemoryProvider:
    """A :class:`MemoryProvider` over fixed tables, for tests.

    ``per_text[condition][text]`` is one text's memory (name -> array without a batch axis);
    ``shared[condition]`` is one memory for every text (e.g. the generic memory). The ``none``
    condition always gives None. A text missing from a per-text table is an error naming it.
    """

    def __init__(self, per_text: Mapping[str, Mapping[str, Mapping[str, np.ndarray]]] | None = None,
                 shared: Mapping[str, Mapping[str, np.ndarray]] | None = None):
        self.per_text = dict(per_text or {})
        self.shared = dict(shared or {})
        both = set(self.per_text) & set(self.shared)
        if both:
            raise ConditionError(f"conditions {sorted(both)} are given both per text and shared")
        parse_conditions([*self.per_text, *self.shared] or ["none"])
        self.calls: list[tuple[str, int]] = []  # (condition, number of texts): lets tests see the batching

    def __call__(self, texts: list[str], condition: str) -> FetchedMemory | None:
        parse_conditions([condition])
        self.calls.append((condition, len(texts)))
        if condition == "none":
            return None
        if condition in self.shared:
            return {n: np.asarray(a)[None] for n, a in self.shared[condition].items()}
        table = self.per_text.get(condition)
        if table is None:
            raise ConditionError(f"no memory table for condition {condition!r}")
        missing = [t for t in texts if t not in table]
        if missing:
            raise ConditionError(f"no {condition!r} memory for text {missing[0]!r}")
        names = table[texts[0]].keys()
        return {n: np.stack([np.asarray(table[t][n]) for t in texts]) for n in names}


SMALL_ANCHOR = dict(d_model=32, n_layers=2, n_heads=2, head_dim=16, d_ff=64)


def train_small_run(data_dir, workdir, **eval_keys):
    """A small memory run trained from scratch for 4 steps on ``data_dir`` (the tiny preset with a
    32-wide anchor and the hash embedder, over the 8 test devices); ``eval_keys`` set ``eval.*``."""
    from memlm.config import load_config
    from memlm.train.loop import train

    cfg = load_config("experiments/tiny.py")
    cfg.model.update(SMALL_ANCHOR)
    cfg.tree.embedder = "hash"
    cfg.train.update(mode="scratch", steps=4, batch_size=8, log_every=2, checkpoint_every=4)
    cfg.mesh.update(data=-1, fsdp=1, tensor=1)
    cfg.eval.update(eval_keys)
    train(cfg, data_dir, workdir, quiet=True)
    return workdir
