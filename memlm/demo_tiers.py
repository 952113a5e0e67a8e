"""``memlm demo --tiers`` / ``make demo-tiers``: train with a bank ten times larger than the device
budget it is given.

The embedded default with a wider tree (k = 32: 32 level-1 and 1,024 level-2 blocks) gives a bank
whose training state is set against a device budget of a tenth of it (``bank.device_bytes``).
The demo picks the deepest split that fits (``bank.device_levels``), trains memory and anchor
from scratch with the deep level in host memory (each step brings to the device only the rows its
batch fetches), then evaluates none / generic / fetched with the same tiers.
"""

from __future__ import annotations

import time
from pathlib import Path

import ml_collections

from memlm.config import ConfigError, load_config, validate


def tiered_config(config: str | None = None, ratio: int = 10) -> ml_collections.ConfigDict:
    """The demo's config: the bank's state is ``ratio`` times the device budget; the deepest
    device/host split that fits that budget on one device."""
    from memlm.bank.layout import BankLayout
    from memlm.bank.placement import tier_report
    from memlm.sharding import make_mesh

    cfg = load_config(config)
    cfg.name = f"{cfg.name}_tiers"
    cfg.tree.k = 32
    cfg.train.update(mode="scratch", steps=300)
    cfg.mesh.update(data=1, fsdp=1, tensor=1)
    cfg.memory.sizes = tuple(cfg.memory.sizes)
    layout = BankLayout.from_config(validate(cfg))
    cfg.bank.device_bytes = layout.state_bytes() // ratio
    mesh = make_mesh((1, 1, 1))
    # validated above; the loop only sets device_bytes >= 0 and device_levels >= replicate_levels, both valid
    for n in range(layout.levels[-1].level, cfg.bank.replicate_levels - 1, -1):
        cfg.bank.device_levels = n
        try:
            tier_report(cfg, mesh)
            return cfg
        except ConfigError:
            continue
    raise ConfigError(f"config key 'bank.device_bytes' = {cfg.bank.device_bytes}: no device/host split of "
                      f"{cfg.name}'s bank fits a tenth of its state")


def run_tiers_demo(workdir: str | Path = "runs/demo_tiers", data_dir: str | Path = "data/facts_k32",
                   config: str | None = None) -> dict:
    """Prepare, train with the deep levels off device, evaluate; returns the results."""
    from memlm.bank.layout import BankLayout
    from memlm.bank.placement import tier_report
    from memlm.data.prepare import prepare
    from memlm.eval.plot import format_table
    from memlm.eval.run import evaluate_run, probe_files_of
    from memlm.infer.run import load_run
    from memlm.sharding import make_mesh
    from memlm.train.metrics import read_metrics

    t0 = time.time()
    cfg = tiered_config(config)
    workdir, data_dir = Path(workdir), Path(data_dir)
    state = BankLayout.from_config(cfg).state_bytes()
    tiers = tier_report(cfg, make_mesh((1, 1, 1)))
    on_device = sum(t["device_bytes"] for t in tiers)
    budget = cfg.bank.device_bytes
    print(f"memlm demo --tiers: bank training state {state / 1e6:.1f} MB, device budget {budget / 1e6:.1f} MB "
          f"({state / budget:.0f}x smaller); bank.device_levels={cfg.bank.device_levels}: "
          + ", ".join(f"level {t['level']} {t['tier']} ({t['device_bytes'] / 1e6:.1f} MB on device)" for t in tiers)
          + f", {on_device / 1e6:.1f} MB on device in all", flush=True)
    print(f"\n=== 1/3 prepare the facts corpus with a k={cfg.tree.k} tree -> {data_dir} ===", flush=True)
    prepare(cfg, "facts", str(data_dir))
    print("\n=== 2/3 train anchor and bank, deep levels in host memory ===", flush=True)
    from memlm.train.loop import train

    train(cfg, data_dir, workdir)
    last = read_metrics(workdir)[-1]
    stall = last.get("bank/fetch_stall_per_step_s", 0.0)
    print(f"memlm demo --tiers: final loss {last['loss']:.3f}, {last['tokens_per_s']:,.0f} tokens/s, fetch stall "
          f"{stall * 1e3:.2f} ms/step", flush=True)
    print("\n=== 3/3 evaluate with the same tiers ===", flush=True)
    run = load_run(workdir)
    results = evaluate_run(run, probe_files_of(run, None), run.conditions, quiet=True)
    for probe, res in results.items():
        print(format_table(res, title=f"{probe}: accuracy by frequency bucket (0 = rarest)"))
    print(f"memlm demo --tiers: finished in {(time.time() - t0) / 60:.1f} min")
    return {"results": results, "bank_state_bytes": state, "device_bytes": cfg.bank.device_bytes,
            "on_device_bytes": on_device, "device_levels": cfg.bank.device_levels}
