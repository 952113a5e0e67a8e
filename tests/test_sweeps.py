"""Sweeps: fits recover known laws, expansion is deterministic and strict, a killed sweep finishes on rerun."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from memlm.sweeps import SweepError, expand, load_sweep
from memlm.sweeps.fit import fit_isoflop, fit_parametric, law

REPO = Path(__file__).resolve().parent.parent

# ---- (a) fits ------------------------------------------------------------------------------------------------
TRUE = dict(E=1.7, A=400.0, alpha=0.34, B=410.0, beta=0.28, G=0.05)


def _theta(t):
    return np.array([t["E"], np.log(t["A"]), t["alpha"], np.log(t["B"]), t["beta"], t["G"]])


def test_parametric_fit_recovers_a_known_law_inside_its_intervals():
    rng = np.random.default_rng(3)
    n, d, ratio = np.meshgrid(np.logspace(6, 9, 5), np.logspace(8, 11, 5), [0.0, 10.0, 100.0], indexing="ij")
    n, d, m = n.ravel(), d.ravel(), (ratio * n).ravel()
    loss = law(_theta(TRUE), n, d, m) + rng.normal(0, 0.01, n.size)
    fit = fit_parametric(n, d, m, loss, n_boot=100, seed=0)
    p = fit["params"]
    for name in ("alpha", "beta", "G"):
        lo, hi = p[name]["interval"]
        assert lo <= TRUE[name] <= hi, (name, TRUE[name], p[name])
        assert hi - lo < 0.05, (name, p[name])  # informative, not just wide
    assert not (p["alpha"]["interval"][0] <= 0.40 <= p["alpha"]["interval"][1])  # a wrong exponent is excluded
    assert abs(p["E"]["value"] - TRUE["E"]) < 0.05
    assert fit["rmse"] < 0.02


def test_isoflop_fit_recovers_the_compute_optimal_size_exponent():
    """For L = E + A/N^a + B/D^b at C = 6ND, N*(C) grows as C^(b / (a + b))."""
    t = TRUE
    a, b = t["alpha"], t["beta"]
    rng = np.random.default_rng(1)
    ns, ds, cs, losses = [], [], [], []
    for c in (1e17, 1e18, 1e19, 1e20):
        n_opt = (a * t["A"] / (b * t["B"])) ** (1 / (a + b)) * (c / 6) ** (b / (a + b))
        for x in np.logspace(-1, 1, 9):
            n = n_opt * x
            ns.append(n)
            ds.append(c / (6 * n))
            cs.append(c)
            losses.append(t["E"] + t["A"] / n**a + t["B"] / (c / (6 * n)) ** b + rng.normal(0, 0.003))
    fit = fit_isoflop(ns, ds, cs, losses, n_boot=100)
    lo, hi = fit["n_star"]["interval"]
    assert lo <= b / (a + b) <= hi and hi - lo < 0.05, fit["n_star"]
    lo, hi = fit["d_star"]["interval"]
    assert lo <= a / (a + b) <= hi, fit["d_star"]
    assert len(fit["curves"]) == 4


# ---- (b) expansion ---------------------------------------------------------------------------------------------
def _sweep_file(tmp_path, body: str, name: str = "s.py") -> Path:
    path = tmp_path / name
    path.write_text("from memlm.sweeps import Stage, Sweep, product\n" + body)
    return path


def test_expansion_is_deterministic_and_names_follow_the_template():
    sweep = REPO / "experiments" / "sweeps" / "tiny.py"
    one, two = expand(load_sweep(sweep)), expand(load_sweep(sweep))
    assert [(r.name, r.overrides, r.init_from, r.config_sha) for r in one] == \
        [(r.name, r.overrides, r.init_from, r.config_sha) for r in two]
    names = [r.name for r in one]
    assert names[:5] == ["anchor_d32", "anchor_d64", "anchor_d128", "d32_mem0-0", "d32_mem8-8"]
    by = {r.name: r for r in one}
    assert by["d64_mem32-32"].init_from == "anchor_d64"
    assert by["d64_mem32-32"].cfg.memory.sizes == (32, 32) and by["d64_mem32-32"].cfg.model.d_model == 64
    # IsoFLOP runs: steps spend the budget by the exact FLOPs per token.
    from memlm.model.accounting import accounting

    for r in one:
        if r.budget:
            fl = accounting(r.cfg)["flops_per_token"]["anchor_train"]
            spent = fl * r.cfg.train.steps * r.cfg.train.batch_size * r.cfg.data.seq_len
            assert abs(spent / r.budget - 1) < 0.05, (r.name, spent, r.budget)


def test_config_digest_ignores_new_keys_at_their_default_but_not_a_changed_value(monkeypatch):
    """A memlm upgrade that adds a key (the default and every resolved config gain it at its default) keeps
    finished runs' digests, so a rerun does not redo them; a changed value in the run's config does not."""
    import memlm.config

    run = expand(load_sweep(REPO / "experiments" / "sweeps" / "tiny.py"))[3]
    before = run.config_sha
    original = memlm.config.default_config

    def upgraded():
        cfg = original()
        cfg.train.new_knob = 7
        return cfg

    monkeypatch.setattr(memlm.config, "default_config", upgraded)
    run.cfg.train.new_knob = 7
    assert run.config_sha == before
    run.cfg.train.new_knob = 8  # the sweep sets the new key away from its default: a different run
    assert run.config_sha != before
    run.cfg.train.new_knob = 7
    run.cfg.train.lr = run.cfg.train.lr * 2
    assert run.config_sha != before


@pytest.mark.parametrize("runs,needles", [
    ('[{"model.dmodel": 4}]', ("stage 'grid'", "model.dmodel")),
    ('[{"train.steps": "ten"}]', ("train.steps", "ten")),
    ('[{"memory.type": "moe"}]', ("memory.type", "moe")),
    ('[["--config.train.steps"]]', ("--config.key=value",)),
    ('product({"train.lr": [1e-3, 2e-3]})', ("run name 'same'", "template")),
])
def test_bad_overrides_fail_naming_the_key(tmp_path, runs, needles):
    path = _sweep_file(tmp_path, f'SWEEP = Sweep(stages=[Stage("grid", template="same", runs={runs})])\n')
    with pytest.raises(SweepError) as e:
        expand(load_sweep(path))
    for n in needles:
        assert n in str(e.value), str(e.value)


def test_unknown_upstream_and_template_key_are_refused(tmp_path):
    path = _sweep_file(tmp_path, 'SWEEP = Sweep(stages=[Stage("m", template="x", init_from="nope")])\n')
    with pytest.raises(SweepError, match="init_from 'nope'"):
        expand(load_sweep(path))
    path = _sweep_file(tmp_path, 'SWEEP = Sweep(stages=[Stage("m", template="{model.widht}")])\n', "t.py")
    with pytest.raises(SweepError, match="model.widht"):
        expand(load_sweep(path))


@pytest.mark.parametrize("name", sorted(p.name for p in (REPO / "experiments" / "sweeps").glob("*.py")))
def test_every_sweep_file_expands_with_valid_configs(name):
    from memlm.config import validate

    runs = expand(load_sweep(REPO / "experiments" / "sweeps" / name))
    assert len(runs) >= 2
    for r in runs:
        validate(r.cfg)
        assert r.init_from is None or r.init_from in {x.name for x in runs}


# ---- (c) a killed sweep, rerun -------------------------------------------------------------------------------
def _files(run_dir: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(run_dir)): (p.stat().st_mtime_ns, p.stat().st_size)
            for p in sorted(run_dir.rglob("*")) if p.is_file() and p.name != ".lock"}


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_a_child_whose_runner_died_before_its_setup_stops_before_it_runs():
    """The runner can be killed between a child's fork and its ``prctl``; the kernel would then never
    signal the child, which would train beside the rerun's trainer. The setup sees the parent gone.
    (Checked from a process without jax, as the runner is: this one's threads make a fork unsafe.)"""
    script = """
import functools, os, subprocess, sys
from memlm.sweeps.runner import _child_setup, _die_with_parent
child = [sys.executable, "-c", "print('ran')"]
ours = subprocess.run(child, preexec_fn=_child_setup(), capture_output=True, text=True)
gone = os.getpid() + 1_000_000  # a parent that is not this process: as after the runner died
orphan = subprocess.run(child, preexec_fn=functools.partial(_die_with_parent, gone), capture_output=True, text=True)
print(ours.returncode, ours.stdout.strip() or "-", orphan.returncode, orphan.stdout.strip() or "-")
"""
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["0", "ran", str(-signal.SIGTERM), "-"]


@pytest.mark.slow
def test_a_killed_sweep_reruns_only_the_missing_runs(tmp_path, facts_data):
    from memlm.sweeps.collect import collect

    path = _sweep_file(tmp_path, f'''
SWEEP = Sweep(
    config={str(REPO / "experiments" / "tiny.py")!r},
    data={str(facts_data)!r},
    overrides={{"model.vocab_size": 1024, "model.d_model": 32, "model.n_heads": 2, "model.head_dim": 16,
               "model.d_ff": 64, "model.n_layers": 1, "model.remat": "none", "memory.type": "none",
               "train.batch_size": 4, "train.log_every": 1, "train.checkpoint_every": 3, "train.warmup_steps": 1}},
    stages=[Stage("grid", template="s{{train.steps}}", runs=product({{"train.steps": [4, 6, 8]}}))],
)
''')
    out = tmp_path / "out"
    env = dict(os.environ, XLA_FLAGS=os.environ["MEMLM_TEST_XLA_FLAGS"])  # one device per trainer
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [sys.executable, "-m", "memlm.cli", "sweep", "run", str(path), "--out", str(out)]
    first = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    marker = out / "runs" / "s4" / "sweep_done.json"
    deadline = time.time() + 120
    while not marker.exists() and first.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert marker.exists(), first.communicate()[0].decode()[-2000:]
    first.send_signal(signal.SIGKILL)  # no chance to clean up: its trainer gets SIGTERM from the kernel
    first.wait()
    assert not (out / "runs" / "s8" / "sweep_done.json").exists()
    before = _files(out / "runs" / "s4")
    events_before = len((out / "events.jsonl").read_text().splitlines())

    # The two missing runs side by side (--parallel 2): the rerun still has to skip s4 and finish both.
    rerun = subprocess.run([*cmd, "--parallel", "2"], env=env, capture_output=True, text=True, timeout=240)
    assert rerun.returncode == 0, rerun.stdout[-2000:] + rerun.stderr[-2000:]
    events = [json.loads(x) for x in (out / "events.jsonl").read_text().splitlines()[events_before:]]
    acted = {(e["run"], e["action"]) for e in events}
    assert ("s4", "skip") in acted and ("s4", "train") not in acted
    assert ("s6", "done") in acted and ("s8", "done") in acted
    assert _files(out / "runs" / "s4") == before  # the finished run was not touched
    for name, steps in (("s6", 6), ("s8", 8)):
        ck = [int(p.name) for p in (out / "runs" / name / "checkpoints").iterdir() if p.name.isdigit()]
        assert max(ck) == steps
        logged = [json.loads(x)["step"] for x in (out / "runs" / name / "metrics.jsonl").read_text().splitlines()]
        assert logged[-1] == steps

    rows = collect(path, out, quiet=True)
    first_bytes = (out / "results.csv").read_bytes(), (out / "results.json").read_bytes()
    collect(path, out, quiet=True)
    assert ((out / "results.csv").read_bytes(), (out / "results.json").read_bytes()) == first_bytes
    assert [r["status"] for r in rows] == ["done"] * 3
    assert [r["tokens"] for r in rows] == [s * 4 * 128 for s in (4, 6, 8)]
    assert all(r["flops"] == r["tokens"] * (r["flops_per_token.anchor"] + r["flops_per_token.attention"])
               for r in rows)
