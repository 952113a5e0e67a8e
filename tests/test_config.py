"""Config validation: a bad config fails naming the key and the value."""

import pytest

from memlm.config import ConfigError, apply_overrides, default_config, load_config, mesh_shape, validate

PRESETS = ("tiny", "paper_160m", "paper_410m", "paper_1b4", "paper_a1", "paper_a2", "paper_a3", "paper_a4", "paper_b1",
           "paper_b2", "paper_b3", "paper_c1", "paper_c2", "ratio_260m", "ratio_320m", "ratio_350m", "ratio_370m",
           "ratio_385m", "ratio_410m")


def _bad(overrides: dict, *needles: str):
    cfg = load_config("experiments/tiny.py")
    with pytest.raises(ConfigError) as e:
        apply_overrides(cfg, overrides)
        validate(cfg)
    for n in needles:
        assert n in str(e.value), str(e.value)


def test_every_preset_validates():
    for name in PRESETS:
        validate(load_config(f"experiments/{name}.py"))
    for stage in ("260m_anchor", "320m_anchor", "350m_anchor", "370m_anchor", "385m_anchor", "410m_anchor"):
        validate(load_config(f"experiments/ratio.py:{stage}"))


def test_head_count_that_does_not_divide():
    _bad({"model.n_kv_heads": "3"}, "model.n_kv_heads", "3", "divide")


def test_memory_level_deeper_than_the_tree():
    _bad({"memory.sizes": "(8, 8, 8)"}, "memory.sizes", "(8, 8, 8)", "deeper than the tree")


def test_negative_size():
    _bad({"model.d_model": "-4"}, "model.d_model", "-4")
    _bad({"memory.sizes": "(8, -1)"}, "memory.sizes", "negative")


def test_unknown_memory_type_and_unknown_key():
    _bad({"memory.type": "moe"}, "memory.type", "'moe'", "ffn")
    _bad({"model.dmodel": "4"}, "model.dmodel")


def test_type_mismatch_names_the_key():
    _bad({"train.steps": "ten"}, "train.steps")


def test_mesh_that_does_not_divide_the_devices():
    cfg = default_config()
    cfg.mesh.update(data=3, fsdp=1, tensor=1)
    with pytest.raises(ConfigError, match="mesh"):
        mesh_shape(cfg, 8)
    cfg.mesh.update(data=-1, tensor=2)
    assert mesh_shape(cfg, 8) == (4, 1, 2)


def test_memory_mode_without_memory_is_refused():
    _bad({"memory.type": "none", "train.mode": "cotrain"}, "train.mode", "cotrain")




@pytest.mark.parametrize("name", PRESETS)
def test_presets_match_their_golden_snapshots(name):
    """A change to a preset shows up as a diff of tests/fixtures/presets/<name>.json in review.

    Regenerate after an intended change with ``MEMLM_REGEN_GOLDEN=1 pytest tests/test_config.py``.
    """
    import json
    import os
    from pathlib import Path

    path = Path(__file__).parent / "fixtures" / "presets" / f"{name}.json"
    text = json.dumps(json.loads(load_config(f"experiments/{name}.py").to_json()), indent=1, sort_keys=True) + "\n"
    if os.environ.get("MEMLM_REGEN_GOLDEN"):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    assert path.read_text() == text, f"preset {name} changed: regenerate {path} if intended"


def test_blocking_below_the_deepest_memory_level_is_refused():
    cfg = load_config("experiments/paper_160m.py")  # sizes (256, 64, 16, 0): level 4 holds no memory
    cfg.eval.block_level = 4
    with pytest.raises(ConfigError, match="eval.block_level.*deepest level with memory"):
        validate(cfg)
    cfg.eval.block_level = 3
    validate(cfg)


def test_paper_rows_carry_their_recipes():
    """docs/paper.md 4.3-4.5: token budgets, batches, schedules and contexts of every stage of Table 1."""
    def tokens(c):
        return c.train.steps * c.train.batch_size * c.data.seq_len

    for row in ("a1", "b1", "c1"):
        c = load_config(f"experiments/paper_{row}.py")
        assert (c.train.mode, c.memory.type, tokens(c), c.train.batch_size * c.data.seq_len, c.data.seq_len) == \
            ("anchor", "none", 2**40, 2**20, 8192)
        assert (c.train.lr, c.train.min_lr, c.train.warmup_steps, c.train.weight_decay) == (5e-3, 5e-5, 10_000, 0.05)
    b3 = load_config("experiments/paper_b3.py")
    assert (b3.train.mode, tokens(b3), b3.train.lr) == ("anchor", 2**41, 5e-3)
    for row, mode in (("a2", "cotrain"), ("a3", "frozen"), ("b2", "cotrain"), ("c2", "cotrain")):
        c = load_config(f"experiments/paper_{row}.py")
        assert (c.train.mode, tokens(c), c.data.seq_len, c.train.lr, c.train.min_lr, c.train.weight_decay) == \
            (mode, 2**40, 2048, 1e-4, 1e-5, 1e-3)
        assert c.train.batch_size == (2048 if row == "c2" else 1024)
    a4 = load_config("experiments/paper_a4.py")
    assert (a4.train.mode, tokens(a4), a4.train.lr, a4.train.min_lr, a4.train.weight_decay, a4.train.warmup_steps) == \
        ("scratch", 2**41, 1e-3, 1e-5, 0.1, 10_000)
    anchor = load_config("experiments/ratio_410m.py")  # App. A.7 stage 1
    assert (anchor.train.mode, tokens(anchor), anchor.train.lr, anchor.train.min_lr, anchor.train.weight_decay) == \
        ("anchor", 2**38, 1e-3, 1e-5, 0.1)
    memory = load_config("experiments/ratio_260m.py")  # App. A.7 stage 2: constant 1e-4
    assert (memory.train.mode, tokens(memory), memory.train.memory_lr, memory.train.memory_min_lr) == \
        ("frozen", 2**39, 1e-4, 1e-4)


def test_route_beam_needs_a_width_and_its_generic_candidate_a_generic_memory():
    _bad({"eval.route_beam": "0"}, "eval.route_beam", "0")
    _bad({"eval.route_beam_generic": "true", "memory.generic": "false"}, "eval.route_beam_generic", "generic")
    _bad({"eval.route_descent": "sideways"}, "eval.route_descent", "sideways")
    _bad({"eval.route_descent": "likelihood", "eval.route_beam": "2"}, "eval.route_beam", "route_descent")
    _bad({"eval.route_anchor_confidence": "1.5"}, "eval.route_anchor_confidence", "1.5")
    _bad({"eval.route_anchor_confidence": "0.5", "memory.generic": "false"}, "eval.route_anchor_confidence",
         "generic")
    cfg = load_config("experiments/tiny.py")
    apply_overrides(cfg, {"eval.route_beam": "4", "eval.route_beam_generic": "true"})
    validate(cfg)
    apply_overrides(cfg, {"eval.route_anchor_confidence": "0.5", "memory.generic": "false",
                          "eval.route_beam_generic": "false", "eval.route_fallback": "none"})
    validate(cfg)


def test_a_run_recorded_before_a_key_existed_opens_with_its_default():
    import json

    from memlm.run.directory import config_from_record

    cfg = load_config("experiments/tiny.py")
    apply_overrides(cfg, {"eval.route_beam": "3"})
    record = {"config": json.loads(cfg.to_json())}
    del record["config"]["eval"]["route_beam"], record["config"]["eval"]["route_gate"]
    got = config_from_record(record)
    assert (got.eval.route_beam, got.eval.route_gate) == (1, "off")
    assert got.memory.sizes == (32, 32) and got.model.d_model == cfg.model.d_model
    record["config"]["eval"]["route_beem"] = 2
    with pytest.raises(ConfigError, match="eval.route_beem"):
        config_from_record(record)


def test_the_default_preset_ships_inside_the_package():
    """``pip install memlm`` has a default: the packaged tiny preset, which experiments/tiny.py re-exports."""
    from pathlib import Path

    import memlm
    from memlm.config import DEFAULT_PRESET

    assert Path(DEFAULT_PRESET).parent == Path(memlm.__file__).resolve().parent / "presets"
    assert load_config().to_json() == load_config(DEFAULT_PRESET).to_json() == \
        load_config("experiments/tiny.py").to_json()
    validate(load_config())


def test_a_run_recorded_with_a_removed_key_still_opens_and_continues(tmp_path):
    """data.shuffle_buffer was read nowhere and is gone from the schema: an old run's config.json that
    has it loads without it, and resuming it is no config change."""
    import json

    from memlm.config import REMOVED_KEYS
    from memlm.run.directory import RunDir, config_from_record

    cfg = load_config("experiments/tiny.py")
    for section, keys in REMOVED_KEYS.items():
        for k in keys:
            assert k not in cfg[section]
    record = {"config": json.loads(cfg.to_json()), "data_dir": None, "init_from": None}
    record["config"]["data"]["shuffle_buffer"] = 0
    got = config_from_record(record)
    assert got.to_json() == cfg.to_json()
    (tmp_path / "config.json").write_text(json.dumps(record))
    assert load_config(str(tmp_path)).to_json() == cfg.to_json()
    RunDir(tmp_path).check_config(cfg)  # no "train section differs" for a key memlm no longer has
    with pytest.raises(ConfigError, match="unknown config key"):
        apply_overrides(load_config("experiments/tiny.py"), {"data.shuffle_buffer": "5"})


def test_sibling_paths_need_a_probability_below_one_and_a_tree_level():
    _bad({"train.sibling_path_prob": "1.0"}, "train.sibling_path_prob", "[0, 1)")
    _bad({"train.sibling_path_prob": "-0.1"}, "train.sibling_path_prob", "[0, 1)")
    _bad({"train.sibling_path_level": "3"}, "train.sibling_path_level", "1..2")
    _bad({"train.sibling_path_prob": "0.1", "train.mode": "frozen"}, "train.sibling_path_prob", "frozen")
    cfg = load_config("experiments/tiny.py")
    apply_overrides(cfg, {"train.sibling_path_prob": "0.1", "train.sibling_path_level": "2"})
    validate(cfg)
