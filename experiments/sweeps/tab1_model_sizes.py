"""Table 1: the three anchor sizes, each pretrained (A1 / B1 / C1) and then given its ~10% memory
by co-training (A2 / B2 / C2), with the frozen (A3) and from-scratch (A4) 160M rows and the
compute-matched dense 410M (B3). Every number is in experiments/paper.py.

    memlm sweep run experiments/sweeps/tab1_model_sizes.py --out runs/tab1 --emit slurm
"""

from memlm.sweeps import Stage, Sweep

SWEEP = Sweep(
    config="experiments/paper_a2.py",
    description="Table 1: model sizes x training schedule",
    data="data/dclm",  # 2,048-token sequences packed per leaf of the k = 16, depth 4 tree
    eval=True,
    stages=[
        Stage("pretrain", template="{name}", data="data/dclm_8k",  # 8,192-token sequences (App. A.1)
              runs=[{"config": f"experiments/paper_{r}.py"} for r in ("a1", "b1", "c1", "b3")]),
        Stage("scratch", template="{name}", runs=[{"config": "experiments/paper_a4.py"}]),
        Stage("memory", template="{name}", runs=[
            {"config": "experiments/paper_a2.py", "init_from": "paper_a1"},
            {"config": "experiments/paper_a3.py", "init_from": "paper_a1"},
            {"config": "experiments/paper_b2.py", "init_from": "paper_b1"},
            {"config": "experiments/paper_c2.py", "init_from": "paper_c1"},
        ]),
    ],
)
