"""Fig. 4a / Table 7: hierarchical configurations on the frozen 160M (docs/paper.md §6.2, §4.4).

Every row of Table 7: fetched size varied at a fixed 4.6B bank (2^40 tokens) and at a fixed 18.7B
bank (2^41 tokens, deeper level 4), anchor frozen after the A1 stage.

    memlm sweep run experiments/sweeps/fig4a_bank_size.py --out runs/fig4a
"""

from memlm.sweeps import Stage, Sweep

STEP_TOKENS = 1024 * 2048
BANK_4_6B = [(0, 16, 4, 1), (98, 42, 18, 0), (256, 64, 16, 0), (768, 96, 12, 0), (1792, 112, 7, 0), (5376, 0, 0, 0)]
BANK_18_7B = [(256, 64, 16, 4), (328, 156, 74, 0), (1216, 164, 22, 3), (4096, 320, 17, 2)]


def _runs(configs, tokens: int) -> list[dict]:
    warmup = round(10_000 * tokens / 2**40)
    return [{"memory.sizes": c, "train.steps": tokens // STEP_TOKENS, "train.warmup_steps": warmup,
             "train.memory_warmup_steps": warmup} for c in configs]


SWEEP = Sweep(
    config="experiments/paper_a3.py",
    description="Table 7: fetched size at a 4.6B and an 18.7B bank, frozen 160M",
    data="data/dclm",
    eval=True,
    stages=[
        Stage("anchor", config="experiments/paper_a1.py", template="a1", data="data/dclm_8k"),
        Stage("memory", template="r{memory.sizes}", init_from="a1",
              runs=_runs(BANK_4_6B, 2**40) + _runs(BANK_18_7B, 2**41)),
    ],
)
