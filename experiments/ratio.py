"""Memory-to-model-ratio experiment (App. A.7, Tab. 8, Fig. 4b): six d=1024 anchors that differ only
in depth, each with a memory that keeps anchor + fetched at about 411M and the bank at about 6.34B.

Two stages (App. A.7):

1. ``--config=experiments/ratio.py:260m_anchor`` (and 320m ... 410m): the anchor alone, 2^38 tokens,
   cosine 1e-3 -> 1e-5, weight decay 0.1. A.7 gives no batch, context or warmup: those of anchor
   pretraining (A.1: 1M-token batches, 8,192 tokens) with the warmup ratio of A.2 (2,500 steps).
2. ``--config=experiments/ratio.py:260m`` (320m, 350m, 370m, 385m): the memory of the frozen anchor,
   2^39 tokens at a constant 1e-4 (no annealing, to show convergence), ``--init-from`` stage 1.

The 410m has no memory: its only stage is the anchor one (``ratio_410m.py``).
"""

import importlib.util
from pathlib import Path

_spec = importlib.util.spec_from_file_location("memlm_paper", Path(__file__).with_name("paper.py"))
_paper = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_paper)

ANCHORS = {
    "260m": (12, (3840, 336, 6, 0)),
    "320m": (17, (1445, 256, 8, 0)),
    "350m": (19, (870, 226, 9, 0)),
    "370m": (21, (384, 200, 10, 0)),
    "385m": (22, (264, 94, 16, 0)),
    "410m": (24, None),
}
ANCHOR_TOKENS = 2**38
MEMORY_TOKENS = 2**39


def get_config(name: str = "260m"):
    key, _, stage = name.partition("_")
    if key not in ANCHORS or stage not in ("", "anchor"):
        raise ValueError(f"unknown ratio anchor {name!r}; choose one of {', '.join(ANCHORS)} (memory stage) or "
                         f"{', '.join(k + '_anchor' for k in ANCHORS)} (anchor stage)")
    layers, sizes = ANCHORS[key]
    if sizes is None and not stage:
        raise ValueError(f"ratio anchor {key} has no memory: its only stage is {key}_anchor")
    c = _paper.anchor("410m")
    c.model.n_layers = layers
    c.train.microbatch_size = 0
    c.train.checkpoint_every = 200
    c.mesh.update(data=-1, fsdp=1)
    c.bank.replicate_levels = 1
    if sizes is not None:
        c.memory.sizes = sizes
    if stage:
        c.name = f"ratio_{key}_anchor"
        _paper.anchor_pretraining(c, ANCHOR_TOKENS, lr=1e-3, min_lr=1e-5, weight_decay=0.1,
                                  warmup_steps=_paper.warmup_for(ANCHOR_TOKENS))
    else:
        c.name = f"ratio_{key}"
        _paper.memory_training(c, "frozen", MEMORY_TOKENS, lr=1e-4, min_lr=1e-4, warmup_steps=0)
    return c
