"""The paper's recipe in miniature, as a sweep a 2-core CPU runs in minutes (README: Scaling-law sweeps).

Three stages on the facts corpus (prepared once, hashed embedder, k=8, depth 2):

1. ``anchor``: pretrain three dense anchors (d = 32, 64, 128) from scratch (rows A1 / B1 / C1);
2. ``memory``: continue each for the same steps with no memory, a small (8, 8) and a larger
   (32, 32) FFN-memory, co-trained from stage 1 (rows A2 / B2 / C2; the dense continuation is B3's
   compute-matched control): 9 runs, loss against size per memory configuration;
3. ``isoflop``: dense anchors of four widths at two training budgets, steps set from the exact
   FLOPs per token (IsoFLOP profiles).

    memlm sweep run experiments/sweeps/tiny.py --out runs/sweep_tiny
    memlm sweep collect experiments/sweeps/tiny.py --out runs/sweep_tiny
    memlm sweep report experiments/sweeps/tiny.py --out runs/sweep_tiny
"""

from memlm.sweeps import Stage, Sweep, product


def anchor(d: int, heads: int, head_dim: int) -> dict:
    return {"model.d_model": d, "model.n_heads": heads, "model.head_dim": head_dim, "model.d_ff": 4 * d}


ANCHORS = [anchor(32, 2, 16), anchor(64, 2, 32), anchor(128, 4, 32)]
ISOFLOP_ANCHORS = [anchor(32, 2, 16), anchor(64, 2, 32), anchor(96, 3, 32), anchor(128, 4, 32)]

SWEEP = Sweep(
    config="experiments/tiny.py",
    description="tiny anchors x FFN-memory sizes, and IsoFLOP profiles, on the facts corpus",
    data=dict(corpus="facts"),
    overrides={
        "tree.embedder": "hash", "data.facts_documents": 3000, "data.tokenizer_vocab": 1024,
        "model.vocab_size": 1024, "model.n_layers": 2, "model.remat": "none", "train.batch_size": 16,
        "train.log_every": 10, "train.checkpoint_every": 1000, "train.keep_checkpoints": 1,
        "eval.conditions": "none,generic,fetched",
    },
    eval=True,
    stages=[
        Stage("anchor", template="anchor_d{model.d_model}", runs=product(anchor=ANCHORS),
              overrides={"memory.type": "none", "train.mode": "anchor", "train.steps": 150}),
        Stage("memory", template="d{model.d_model}_mem{memory.sizes}", init_from="anchor_d{model.d_model}",
              runs=product(anchor=ANCHORS,
                           memory=[{"memory.type": "none", "memory.sizes": (0, 0), "train.mode": "anchor"},
                                                   {"memory.sizes": (8, 8), "train.mode": "cotrain"},
                                                   {"memory.sizes": (32, 32), "train.mode": "cotrain"}]),
              overrides={"train.steps": 150, "train.lr": 1e-3, "train.min_lr": 1e-4, "train.warmup_steps": 10}),
        Stage("isoflop", template="iso_C{budget:.0e}_d{model.d_model}", runs=product(anchor=ISOFLOP_ANCHORS),
              budgets=[2e11, 6e11],
              overrides={"memory.type": "none", "train.mode": "anchor", "train.warmup_steps": 10}),
    ],
)
