"""Fig. 4b / Table 8: the memory-to-model ratio at a fixed 411M runtime and a 6.34B bank (App. A.7).

Stage 1 trains the six d = 1024 anchors (12 ... 24 layers) for 2^38 tokens (cosine 1e-3 -> 1e-5,
weight decay 0.1); stage 2 freezes each and trains its memory for 2^39 tokens at a constant 1e-4.
The 410M has no memory: its anchor stage is its point of the curve. Both stages' numbers are in
experiments/ratio.py.

    memlm sweep run experiments/sweeps/fig4b_ratio.py --out runs/fig4b
"""

from memlm.sweeps import Stage, Sweep

ANCHORS = ("260m", "320m", "350m", "370m", "385m", "410m")

SWEEP = Sweep(
    config="experiments/ratio.py:260m",
    description="Table 8: fetched-to-anchor split of a 411M runtime budget",
    data="data/dclm",
    eval=True,
    stages=[
        Stage("anchor", template="anchor_L{model.n_layers}", data="data/dclm_8k",
              runs=[{"config": f"experiments/ratio.py:{a}_anchor"} for a in ANCHORS]),
        Stage("memory", template="memory_L{model.n_layers}", init_from="anchor_L{model.n_layers}",
              runs=[{"config": f"experiments/ratio.py:{a}"} for a in ANCHORS if a != "410m"]),
    ],
)
