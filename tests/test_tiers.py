"""Bank tiers: levels off device (in host memory, or streamed from tensorstore through a bounded
cache) train to exactly the per-step losses and the whole saved state (anchor, optimizer, bank and
generic memory) of the all-device run, on one and on 8 CPU devices, also across a kill in the middle
of a bank save."""

import signal
import time

import pytest

from tests.test_multihost import finish, launch, losses

FLAGS = ["--config.model.d_model=32", "--config.model.n_layers=2", "--config.model.n_heads=2",
         "--config.model.head_dim=16", "--config.model.d_ff=64", "--config.train.batch_size=16",
         "--config.train.microbatch_size=8", "--config.train.log_every=1", "--config.train.checkpoint_every=3",
         "--config.train.steps=6", "--config.train.warmup_steps=2", "--config.train.memory_warmup_steps=2",
         "--config.train.mode=scratch", "--config.bank.replicate_levels=0"]
STREAMED = ["--config.bank.device_levels=0", "--config.bank.host_cache_bytes=20000"]  # a few rows: evictions


def _args(data, run, *extra):
    return ["--data", str(data), "--workdir", str(run), *FLAGS, *extra]


def _assert_same_final_state(run, ref) -> None:
    """Bit for bit: anchor, optimizer, every field of every node of the bank and the generic memory."""
    from state import assert_same_state, run_state

    want = run_state(ref)
    assert all(want[n].any() for n in want if n.endswith("/written")), "a level was never trained"
    assert_same_state(run_state(run), want, exact=True)


@pytest.fixture(scope="module")
def all_device(facts_data, tmp_path_factory):
    """The all-device reference runs, per device count."""
    runs = {}

    def run(devices: int):
        if devices not in runs:
            runs[devices] = tmp_path_factory.mktemp(f"all_device_{devices}") / "run"
            finish(launch(_args(facts_data, runs[devices]), devices=devices))
        return runs[devices]

    return run


# On 8 devices the streamed tier is checked by the kill test below (its resumed run ends on the all-device
# losses and bank), so it is not run a second time here.
@pytest.mark.slow
@pytest.mark.parametrize("devices,tiers", [(1, ("host", "streamed")), (8, ("host",))])
def test_levels_off_device_train_to_the_all_device_losses_and_bank(facts_data, tmp_path, devices, tiers, all_device):
    ref = all_device(devices)
    flags = {"host": ["--config.bank.device_levels=1"], "streamed": STREAMED}
    for tier in tiers:
        finish(launch(_args(facts_data, tmp_path / tier, *flags[tier]), devices=devices))
    want = losses(ref)
    assert sorted(want) == list(range(1, 7))
    for tier in tiers:
        got = losses(tmp_path / tier)
        assert [got[s] for s in sorted(want)] == [want[s] for s in sorted(want)], tier
        _assert_same_final_state(tmp_path / tier, ref)
    if "streamed" in tiers:
        from memlm.train.metrics import read_metrics

        rec = read_metrics(tmp_path / "streamed")[-1]
        assert rec["bank/level2_store_bytes_read"] > 0 and 0 <= rec["bank/level2_cache_hit_rate"] < 1, rec
        assert "bank/fetch_stall_s" in rec


@pytest.mark.slow
def test_killed_mid_bank_save_with_levels_off_device_resumes_to_the_uninterrupted_losses(facts_data, tmp_path,
                                                                                          all_device):
    """Level 2 streamed through the cache, 8 devices: SIGKILL while the step-6 bank version is written
    (dirty host rows half saved); the restart resumes from step 3 and ends where the full run ends."""
    ref, run = all_device(8), tmp_path / "run"
    procs = launch(_args(facts_data, run, *STREAMED), devices=8, extra_env={"MEMLM_KILL_AT": "bank-delta-written:6:0"})
    deadline = time.time() + 600
    while procs[0].poll() is None and time.time() < deadline:
        time.sleep(0.5)
    assert procs[0].returncode == -signal.SIGKILL, procs[0].communicate()[0][-2000:]
    procs[0].communicate()
    assert sorted(int(p.name) for p in (run / "checkpoints").iterdir() if p.name.isdigit()) == [3]
    out = finish(launch(_args(facts_data, run, *STREAMED), devices=8))[0]
    assert "resumed" in out
    want, got = losses(ref), losses(run)
    assert sorted(got) == list(range(1, 7))
    assert [got[s] for s in range(1, 7)] == [want[s] for s in range(1, 7)]
    _assert_same_final_state(run, ref)


def test_a_device_budget_the_bank_exceeds_names_the_levels_to_move_off():
    from memlm.bank.layout import BankLayout
    from memlm.bank.placement import tier_report
    from memlm.config import ConfigError, load_config, validate
    from memlm.sharding import make_mesh
    from memlm.train.step import plan_step

    cfg = load_config("experiments/paper_160m.py")
    mesh = make_mesh((1, 1, 1))
    layout = BankLayout.from_config(cfg)
    tiers = tier_report(cfg, mesh)
    assert [t["tier"] for t in tiers] == ["device"] * 3
    level_bytes = [t["device_bytes"] for t in tiers]
    # a hand count: 2^l nodes x block params x (4-byte master + two 4-byte moments) + counter + flag
    for lv, got in zip(layout.levels, level_bytes, strict=True):
        assert got == lv.nodes * (layout.block_params(lv) * 12 + 5)
    cfg.bank.device_bytes = int(sum(level_bytes[:2]) + 1024 * (level_bytes[2] / 4096) + 1)
    with pytest.raises(ConfigError, match=r"bank.device_levels=2 \(level 3 off device\)"):
        plan_step(validate(cfg), mesh, layout)
    cfg.bank.device_levels = 2  # level 3 in host memory: slots for the batch's 1,024 sequences
    tiers = tier_report(validate(cfg), mesh)
    assert tiers[2]["tier"] == "host" and tiers[2]["device_rows"] == 1024
    assert tiers[2]["off_device_bytes"] == level_bytes[2]
    cfg.bank.device_levels, cfg.bank.device_bytes = -1, 10**9
    with pytest.raises(ConfigError, match="no split fits"):
        plan_step(validate(cfg), mesh, layout)
