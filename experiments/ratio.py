"""Memory-to-model-ratio experiment (App. A.7, Tab. 8): six d=1024 anchors that differ only in
depth, each with a memory that keeps anchor + fetched at about 411M and the bank at about 6.34B.

Select one with ``--config=experiments/ratio.py:260m`` (260m, 320m, 350m, 370m, 385m, 410m).
Memories train frozen for 2^39 tokens at a constant 1e-4 (no annealing).
"""

from memlm.config import default_config

ANCHORS = {
    "260m": (12, (3840, 336, 6, 0)),
    "320m": (17, (1445, 256, 8, 0)),
    "350m": (19, (870, 226, 9, 0)),
    "370m": (21, (384, 200, 10, 0)),
    "385m": (22, (264, 94, 16, 0)),
    "410m": (24, None),
}


def get_config(name: str = "260m"):
    if name not in ANCHORS:
        raise ValueError(f"unknown ratio anchor {name!r}; choose one of {', '.join(ANCHORS)}")
    layers, sizes = ANCHORS[name]
    c = default_config()
    c.name = f"ratio_{name}"
    c.model.update(d_model=1024, n_layers=layers, n_heads=16, head_dim=64, d_ff=2816, tied_embeddings=False,
                   vocab_size=50_432, max_seq_len=2048)
    if sizes is None:
        c.memory.type = "none"
        c.train.mode = "anchor"
    else:
        c.memory.update(type="ffn", sizes=sizes, dtype="bfloat16")
        c.train.mode = "frozen"
    c.tree.update(k=16, depth=4)
    c.data.update(seq_len=2048, tokenizer_vocab=50_277)
    c.train.update(batch_size=1024, steps=2**39 // (1024 * 2048), lr=1e-4, min_lr=1e-4, memory_lr=1e-4,
                   memory_min_lr=1e-4, warmup_steps=0, memory_warmup_steps=0, weight_decay=1e-3,
                   memory_weight_decay=1e-3)
    return c
