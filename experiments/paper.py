"""Every stage of the paper's recipes, by the rows of Table 1 (docs/paper.md §4, §6.1).

Rows: ``A1`` / ``B1`` / ``C1`` anchor pretraining (2^40 tokens from scratch, App. A.1), ``A2`` /
``B2`` / ``C2`` co-training from them (another 2^40 tokens, the memory recipe of App. A.2), ``A3``
frozen-anchor memory training, ``A4`` anchor and memory from scratch (2^41 tokens, App. A.5) and
``B3`` the dense 410M for 2^41 tokens (the compute-matched control). Select one with
``--config=experiments/paper.py:A1`` or the per-row files ``experiments/paper_a1.py`` ...

The helpers (:func:`anchor`, :func:`anchor_pretraining`, :func:`memory_training`,
:func:`from_scratch`) are what the study sweeps in ``experiments/sweeps/`` build on, so every
number of a recipe is written once, here. Not reproduced: dataset decomposition (the variable
sequence-length curriculum of A.1 pretraining); its 8,192-token context is a fixed length here.
"""

from memlm.config import default_config

MEMORY_TOKENS_PER_STEP = 1024 * 2048  # App. A.2: 2M-token batches of 2,048-token sequences
ANCHOR_TOKENS_PER_STEP = 2**20  # App. A.1: 1M-token batches
ANCHOR_CONTEXT = 8192
WARMUP_AT_2_40 = 10_000  # warmup steps of a 2^40-token run; other lengths keep the ratio (App. A.2)

# name -> (model shapes, the Table 1 memory config, micro-batch of the memory recipe, FSDP-sharded)
ANCHORS = {
    "160m": (dict(d_model=512, n_layers=35, n_heads=12, head_dim=32, d_ff=2048, tied_embeddings=True),
             (256, 64, 16, 0), 64, False),
    "410m": (dict(d_model=1024, n_layers=24, n_heads=16, head_dim=64, d_ff=2816, tied_embeddings=False),
             (512, 128, 32, 0), 32, True),
    "1b4": (dict(d_model=2048, n_layers=24, n_heads=16, head_dim=128, d_ff=5632, tied_embeddings=False),
            (768, 256, 16, 0), 16, True),
}

# Table 1: row -> (anchor, stage, seen tokens of the stage, the row it starts from)
ROWS = {
    "A1": ("160m", "anchor", 2**40, None),
    "A2": ("160m", "cotrain", 2**40, "A1"),
    "A3": ("160m", "frozen", 2**40, "A1"),
    "A4": ("160m", "scratch", 2**41, None),
    "B1": ("410m", "anchor", 2**40, None),
    "B2": ("410m", "cotrain", 2**40, "B1"),
    "B3": ("410m", "anchor", 2**41, None),
    "C1": ("1b4", "anchor", 2**40, None),
    "C2": ("1b4", "cotrain", 2**40, "C1"),
}


def anchor(name: str):
    """The OpenLM anchor ``name`` (160m, 410m, 1b4) with its Table 1 FFN-memory (bf16), tree k=16, depth 4."""
    if name not in ANCHORS:
        raise ValueError(f"unknown paper anchor {name!r}; choose one of {', '.join(ANCHORS)}")
    shapes, sizes, micro, sharded = ANCHORS[name]
    c = default_config()
    c.name = f"paper_{name}"
    c.model.update(vocab_size=50_432, max_seq_len=2048, **shapes)
    c.memory.update(type="ffn", sizes=sizes, dtype="bfloat16")
    c.tree.update(k=16, depth=4)
    c.data.update(seq_len=2048, tokenizer_vocab=50_277)
    c.train.update(microbatch_size=micro, checkpoint_every=1000)
    if sharded:  # FSDP anchor, every bank level split by node (bench/RESULTS.md)
        c.mesh.update(data=1, fsdp=-1)
        c.bank.replicate_levels = 0
    return c


def warmup_for(tokens: int) -> int:
    """App. A.2: 10k warmup steps for a 2^40-token run, the same ratio for other lengths."""
    return round(WARMUP_AT_2_40 * tokens / 2**40)


def anchor_pretraining(c, tokens: int = 2**40, lr: float = 5e-3, min_lr: float = 5e-5, weight_decay: float = 0.05,
                       warmup_steps: int = WARMUP_AT_2_40):
    """App. A.1 (rows A1, B1, C1): dense anchor, 1M-token batches of 8,192 tokens, cosine 5e-3 -> 5e-5."""
    micro_tokens = c.train.microbatch_size * c.data.seq_len  # keep the memory recipe's tokens per micro-step
    c.memory.type = "none"
    c.model.max_seq_len = ANCHOR_CONTEXT
    c.data.seq_len = ANCHOR_CONTEXT
    batch = ANCHOR_TOKENS_PER_STEP // ANCHOR_CONTEXT
    c.train.update(mode="anchor", batch_size=batch, steps=tokens // ANCHOR_TOKENS_PER_STEP, lr=lr, min_lr=min_lr,
                   warmup_steps=warmup_steps, weight_decay=weight_decay,
                   microbatch_size=max(1, min(batch, micro_tokens // ANCHOR_CONTEXT)) if micro_tokens else 0)
    return c


def memory_training(c, mode: str, tokens: int = 2**40, batch: int = 1024, lr: float = 1e-4, min_lr: float = 1e-5,
                    warmup_steps: int | None = None):
    """App. A.2 (A2, A3, B2, C2 and the memory sweeps): 2,048-token sequences packed per leaf, cosine
    1e-4 -> 1e-5 (anchor and memory alike: A.2 applies to all memory jobs), weight decay 1e-3."""
    warmup = warmup_for(tokens) if warmup_steps is None else warmup_steps
    c.train.update(mode=mode, batch_size=batch, steps=tokens // (batch * c.data.seq_len), warmup_steps=warmup,
                   lr=lr, min_lr=min_lr, weight_decay=1e-3, memory_lr=lr, memory_min_lr=min_lr,
                   memory_warmup_steps=warmup, memory_weight_decay=1e-3)
    return c


def from_scratch(c, tokens: int = 2**41, batch: int = 1024):
    """App. A.5 (A4): anchor and memory jointly from random init, cosine 1e-3 -> 1e-5, 10k warmup, wd 0.1."""
    c.train.update(mode="scratch", batch_size=batch, steps=tokens // (batch * c.data.seq_len),
                   warmup_steps=WARMUP_AT_2_40, lr=1e-3, min_lr=1e-5, weight_decay=0.1, memory_lr=1e-3,
                   memory_min_lr=1e-5, memory_warmup_steps=WARMUP_AT_2_40, memory_weight_decay=0.1)
    return c


def row(name: str):
    """The config of Table 1's row ``name`` (A1 ... C2)."""
    key = name.upper()
    if key not in ROWS:
        raise ValueError(f"unknown Table 1 row {name!r}; choose one of {', '.join(ROWS)}")
    size, stage, tokens, _ = ROWS[key]
    c = anchor(size)
    if stage == "anchor":
        anchor_pretraining(c, tokens)
    elif stage == "scratch":
        from_scratch(c, tokens)
    else:
        # C2 used 4M-token batches (2,048 x 2,048) for GPU utilisation.
        memory_training(c, stage, tokens, batch=2048 if size == "1b4" else 1024,
                        warmup_steps=WARMUP_AT_2_40)
    c.name = f"paper_{key.lower()}"
    return c


def get_config(name: str = "A2"):
    return row(name)
