"""Bank layout and device tier: sizes as the paper counts them, gather order, and a sharded bank
(8 fake devices) that gathers and updates exactly like a single-device one. The training step's
exchange (no collective carries a whole level) is tested in test_step.py."""


import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType
from jax.sharding import PartitionSpec as P
from oracles import sparse_adamw

from memlm.bank import (
    BankLayout,
    bank_shardings,
    clear_dirty,
    gather,
    init_state,
    leaf_paths,
    split_fetched,
)
from memlm.config import ConfigError, load_config


def small_cfg(sizes=(4, 2), k=4, depth=2):
    cfg = load_config()
    cfg.model.update(n_layers=2, d_model=8, d_ff=16, n_heads=2, head_dim=4)
    cfg.memory.update(type="ffn", sizes=sizes)
    cfg.tree.update(k=k, depth=depth)
    return cfg


def test_paper_160m_bank_has_the_papers_sizes():
    layout = BankLayout.from_config(load_config("experiments/paper_160m.py"))
    assert [(lv.level, lv.rank, lv.nodes) for lv in layout.levels] == [(1, 256, 16), (2, 64, 256), (3, 16, 4096)]
    assert [layout.block_params(lv) for lv in layout.levels] == [3 * r * 35 * 512 for r in (256, 64, 16)]
    assert round(layout.fetched_params() / 1e6, 2) == 18.06  # docs/paper.md §2.5
    assert round(layout.params() / 1e9, 3) == 4.624
    assert layout.bytes() == 2 * layout.params()  # bfloat16 bank
    w3 = layout.array("w3")
    assert layout.array_shape(layout.levels[0], w3) == (16, 35, 256, 512)
    assert layout.logical_axes(w3) == ("bank_nodes", "layers", "mem_rank", "embed")
    generic = BankLayout.generic_from_config(load_config("experiments/paper_160m.py"))
    assert [(lv.rank, lv.nodes) for lv in generic.levels] == [(336, 1)]


def test_no_memory_type_has_no_bank():
    cfg = small_cfg()
    cfg.memory.type = "none"
    with pytest.raises(ConfigError, match="memory.type"):
        BankLayout.from_config(cfg)


def test_check_paths_names_the_broken_link():
    layout = BankLayout.from_config(small_cfg())
    layout.check_paths(leaf_paths(layout, np.arange(16)))
    with pytest.raises(ValueError, match="not a child"):
        layout.check_paths(np.array([[0, 5]]))
    with pytest.raises(ValueError, match="out of range"):
        layout.check_paths(np.array([[4, 17]]))


def test_gather_concatenates_levels_along_the_rank_axis_in_level_order():
    layout = BankLayout.from_config(small_cfg())
    state = init_state(layout, seed=0)
    leaves = np.array([5, 5, 15, 0])
    paths = leaf_paths(layout, leaves)
    np.testing.assert_array_equal(paths, np.stack([leaves // 4, leaves], 1))
    fetched = gather(state, jnp.asarray(paths))
    for a in layout.arrays:
        l1 = np.asarray(state.params["level1"][a.name])[leaves // 4]
        l2 = np.asarray(state.params["level2"][a.name])[leaves]
        np.testing.assert_array_equal(fetched[a.name], np.concatenate([l1, l2], axis=a.rank_axis + 1))
        assert fetched[a.name].shape == (4, *a.shape(6))
    parts = split_fetched(layout, fetched)
    np.testing.assert_array_equal(parts["level2"]["w3"], np.asarray(state.params["level2"]["w3"])[leaves])


def test_init_follows_the_spec():
    cfg = small_cfg(sizes=(64, 64))
    layout = BankLayout.from_config(cfg)
    p = init_state(layout, seed=0).params["level2"]
    w1 = np.asarray(p["w1"])
    assert np.abs(w1).max() <= 2 * cfg.memory.init_std + 1e-7
    assert 0.7 * cfg.memory.init_std < w1.std() < cfg.memory.init_std
    assert not np.asarray(p["w3"]).any()
    assert not np.array_equal(w1[0], w1[1]) and not np.array_equal(w1, np.asarray(p["w2"]))


def mesh_4x2():
    return jax.make_mesh((4, 1, 2), ("data", "fsdp", "tensor"), axis_types=(AxisType.Auto,) * 3)


def test_sharded_bank_gathers_and_updates_like_a_single_device_bank():
    layout = BankLayout.from_config(small_cfg())
    mesh = mesh_4x2()
    rules = {"bank_nodes": ("data", "fsdp"), "mem_rank": ("tensor",)}
    sharded = init_state(layout, 7, mesh, replicate_levels=1, rules=rules)
    single = init_state(layout, 7)
    assert sharded.params["level1"]["w1"].sharding.spec == P(None, None, None, "tensor")
    assert sharded.params["level2"]["w1"].sharding.spec == P(("data", "fsdp"), None, None, "tensor")
    assert sharded.mu["level2"]["w3"].sharding.spec == P(("data", "fsdp"), None, "tensor", None)
    assert sharded.count["level2"].sharding.spec == P(("data", "fsdp"))
    assert len(sharded.params["level2"]["w1"].addressable_shards[0].data) == 4  # 16 nodes over data = 4
    for a, b in zip(jax.tree.leaves(sharded), jax.tree.leaves(single), strict=True):
        np.testing.assert_array_equal(a, b)

    shardings = bank_shardings(layout, mesh, replicate_levels=1, rules=rules)
    hp = dict(lr=1e-2, weight_decay=0.1)
    step_sharded = jax.jit(lambda s, p, g, t: sparse_adamw(s, p, g, t, **hp), out_shardings=shardings,
                           donate_argnums=0)
    step_single = jax.jit(lambda s, p, g, t: sparse_adamw(s, p, g, t, **hp))
    gather_jit = jax.jit(gather)
    rng = np.random.default_rng(0)
    for step in range(3):
        paths = jnp.asarray(leaf_paths(layout, rng.integers(0, 16, size=8)))
        touched = jnp.asarray(rng.random(8) < 0.8)
        fa, fb = gather_jit(sharded, paths), gather_jit(single, paths)
        for name in fa:  # bit-equal until the two compiled updates round differently
            np.testing.assert_allclose(fa[name], fb[name], rtol=0 if step == 0 else 1e-5, atol=0 if step == 0 else 1e-7)
        grads = {k: jnp.asarray(rng.normal(size=v.shape).astype(np.float32)) for k, v in fb.items()}
        sharded = step_sharded(sharded, paths, grads, touched)
        single = step_single(single, paths, grads, touched)
        jax.block_until_ready(sharded)
    assert sharded.params["level2"]["w2"].sharding.spec == P(("data", "fsdp"), None, None, "tensor")
    for a, b in zip(jax.tree.leaves(sharded), jax.tree.leaves(single), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    cleared = clear_dirty(sharded)
    assert not any(np.asarray(d).any() for d in cleared.dirty.values())
    assert cleared.dirty["level2"].sharding.spec == P(("data", "fsdp"))
