"""Fig. 3d: single-level FFN-memories by depth on the frozen 160M (docs/paper.md §7.2, §4.4).

One level at a time, (r,0,0,0) ... (0,0,0,r), at three bank sizes per level (a block is
3 r L d = 53,760 r parameters, times 16^l blocks): about 0.22B, 0.88B and 3.5B for levels 1-3;
3.5B and 14B for level 4 (r >= 1). Deeper levels get more tokens because each block is updated
less often: 2^36 / 2^38 / 2^40 / 2^41 tokens at levels 1 / 2 / 3 / 4, warmup 10k scaled to each.
The figure's exact sizes are shown only in the figure.

    memlm sweep run experiments/sweeps/fig3d_level_depth.py --out runs/fig3d
"""

from memlm.sweeps import Stage, Sweep

STEP_TOKENS = 1024 * 2048
LEVELS = {  # level -> (tokens, per-layer units r at that level)
    1: (2**36, (256, 1024, 4096)),
    2: (2**38, (16, 64, 256)),
    3: (2**40, (1, 4, 16)),
    4: (2**41, (1, 4)),
}


def _runs() -> list[dict]:
    runs = []
    for level, (tokens, sizes) in LEVELS.items():
        warmup = round(10_000 * tokens / 2**40)
        for r in sizes:
            runs.append({"memory.sizes": tuple(r if i == level - 1 else 0 for i in range(4)),
                         "train.steps": tokens // STEP_TOKENS, "train.warmup_steps": warmup,
                         "train.memory_warmup_steps": warmup})
    return runs


SWEEP = Sweep(
    config="experiments/paper_a3.py",
    description="Fig. 3d: single-level FFN-memories at levels 1-4 by bank size, frozen 160M",
    data="data/dclm",
    eval=True,
    stages=[
        Stage("anchor", config="experiments/paper_a1.py", template="a1", data="data/dclm_8k"),
        Stage("memory", template="level_r{memory.sizes}", init_from="a1", runs=_runs()),
    ],
)
