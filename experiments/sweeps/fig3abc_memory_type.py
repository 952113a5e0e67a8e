"""Fig. 3a-c: memory type and size on the frozen 160M (docs/paper.md §7.1, §4.4).

Single-level memories at level 2 (256 blocks), (0, r, 0, 0), of every type: FFN-memories, LoRA on
Q/K, on O/V and on the FFN matrices (rank r), KV-memories (r slots); 2^38 tokens each, the memory
recipe of App. A.2 (warmup 2,500 steps: 10k scaled to 2^38 tokens), anchor frozen after the A1
stage. The figure's x-axis is the memory size; its exact sizes are shown only in the figure, so
r spans 16 ... 256 (a level-2 FFN block of r = 64 is 3.44M fetched, 0.88B in the bank).

    memlm sweep run experiments/sweeps/fig3abc_memory_type.py --out runs/fig3abc
"""

from memlm.sweeps import Stage, Sweep, product

MEMORY_STEPS = 2**38 // (1024 * 2048)
MEMORY_WARMUP = 2_500

SWEEP = Sweep(
    config="experiments/paper_a3.py",
    description="Fig. 3a-c: FFN vs LoRA-QK / LoRA-OV / LoRA-FFN / KV memories at level 2, frozen 160M",
    data="data/dclm",  # DCLM-Baseline prepared with the paper's tree (k = 16, depth 4, 2,048-token sequences)
    eval=True,
    stages=[
        Stage("anchor", config="experiments/paper_a1.py", template="a1", data="data/dclm_8k"),
        Stage("memory", template="{memory.type}_r{memory.sizes}", init_from="a1",
              overrides={"train.steps": MEMORY_STEPS, "train.warmup_steps": MEMORY_WARMUP,
                         "train.memory_warmup_steps": MEMORY_WARMUP, "memory.generic": False},
              runs=product({"memory.type": ["ffn", "lora_qk", "lora_ov", "lora_ffn", "kv"],
                            "memory.sizes": [(0, r, 0, 0) for r in (16, 32, 64, 128, 256)]})),
    ],
)
