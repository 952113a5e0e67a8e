"""Sparse row-wise AdamW: equals optax.adamw when every node is touched every step, and a plain
numpy reference of the documented semantics with partial touches and duplicate paths."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from oracles import fetched_grad_sq_norm, sparse_adamw

from memlm.bank import BankLayout, gather, generic_paths, init_state, leaf_paths
from memlm.config import load_config

HP = dict(lr=3e-2, b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.1)


def small_cfg(dtype="float32", kind="ffn"):
    cfg = load_config()
    cfg.model.update(n_layers=2, d_model=8, d_ff=16, n_heads=2, head_dim=4)
    cfg.memory.update(type=kind, sizes=(4, 0, 2), dtype=dtype)
    cfg.tree.update(k=2, depth=3)
    return cfg


def level_grads(layout, grads):
    """Split fetched grads per level by slicing the rank axis (independent of split_fetched)."""
    out, start = {}, 0
    for lv in layout.levels:
        out[lv.level] = {}
        for a in layout.arrays:
            g = np.asarray(grads[a.name], np.float64)
            out[lv.level][a.name] = np.take(g, np.arange(start, start + lv.rank), axis=a.rank_axis + 1)
        start += lv.rank
    return out


def numpy_step(ref, layout, paths, grads, touched, lr, b1, b2, eps, weight_decay):
    """The documented semantics, node by node, in float64 (params rounded to the bank dtype)."""
    per_level = level_grads(layout, grads)
    for lv in layout.levels:
        sums = {}
        for b in range(paths.shape[0]):
            if touched[b]:
                n = int(paths[b, lv.level - 1])
                for name, g in per_level[lv.level].items():
                    sums.setdefault(n, {}).setdefault(name, 0.0)
                    sums[n][name] = sums[n][name] + g[b]
        for n, gs in sums.items():
            ref["count"][lv.key][n] += 1
            ref["dirty"][lv.key][n] = True
            c = ref["count"][lv.key][n]
            for name, g in gs.items():
                m = b1 * ref["mu"][lv.key][name][n] + (1 - b1) * g
                v = b2 * ref["nu"][lv.key][name][n] + (1 - b2) * g * g
                p = ref["params"][lv.key][name][n].astype(np.float64)
                p = p - lr * ((m / (1 - b1**c)) / (np.sqrt(v / (1 - b2**c)) + eps) + weight_decay * p)
                ref["mu"][lv.key][name][n], ref["nu"][lv.key][name][n] = m, v
                ref["params"][lv.key][name][n] = p.astype(ref["params"][lv.key][name].dtype)


def to_numpy(state):
    f64 = lambda x: np.array(x, np.float64)
    return {"params": jax.tree.map(np.array, state.params), "mu": jax.tree.map(f64, state.mu),
            "nu": jax.tree.map(f64, state.nu),
            "count": jax.tree.map(np.array, state.count), "dirty": jax.tree.map(np.array, state.dirty)}


def random_grads(rng, layout, batch):
    state_shapes = {a.name: (batch, *a.shape(layout.fetched_rank)) for a in layout.arrays}
    return {k: jnp.asarray(rng.normal(size=s).astype(np.float32)) for k, s in state_shapes.items()}


update = jax.jit(lambda s, p, g, t: sparse_adamw(s, p, g, t, **HP))


def test_every_node_touched_every_step_equals_optax_adamw():
    layout = BankLayout.from_config(small_cfg())
    state = init_state(layout, seed=1)
    leaves = 2**layout.depth
    paths = jnp.asarray(leaf_paths(layout, np.arange(leaves)))  # level-1 nodes fetched 4 times each
    touched = jnp.ones(leaves, bool)
    dense = jax.tree.map(np.asarray, state.params)
    tx = optax.adamw(HP["lr"], b1=HP["b1"], b2=HP["b2"], eps=HP["eps"], weight_decay=HP["weight_decay"])
    opt = tx.init(dense)
    rng = np.random.default_rng(0)
    for _ in range(4):
        grads = random_grads(rng, layout, leaves)
        per_level = level_grads(layout, grads)
        dense_grads = {}
        for lv in layout.levels:
            dense_grads[lv.key] = {}
            for name, g in per_level[lv.level].items():
                total = np.zeros((lv.nodes, *g.shape[1:]))
                np.add.at(total, np.asarray(paths[:, lv.level - 1]), g)
                dense_grads[lv.key][name] = total.astype(np.float32)
        updates, opt = tx.update(dense_grads, opt, dense)
        dense = optax.apply_updates(dense, updates)
        state = update(state, paths, grads, touched)
    for lv in layout.levels:
        assert (np.asarray(state.count[lv.key]) == 4).all()
        for a in layout.arrays:
            np.testing.assert_allclose(state.params[lv.key][a.name], dense[lv.key][a.name], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_partial_touches_and_duplicates_match_numpy_reference(dtype):
    layout = BankLayout.from_config(small_cfg(dtype))
    state = init_state(layout, seed=2)
    ref = to_numpy(state)
    rng = np.random.default_rng(1)
    batch = 6
    for step in range(5):
        leaves = rng.integers(0, 2, size=batch) if step % 2 else rng.integers(0, 6, size=batch)
        paths = leaf_paths(layout, leaves)  # many duplicates per level; leaves 6, 7 never fetched
        touched = rng.random(batch) < 0.6
        grads = random_grads(rng, layout, batch)
        state = update(state, jnp.asarray(paths), grads, jnp.asarray(touched))
        numpy_step(ref, layout, paths, grads, touched, **HP)
    got = to_numpy(state)
    tol = dict(rtol=1e-5, atol=1e-7) if dtype == "float32" else dict(rtol=1e-2, atol=1e-3)
    for lv in layout.levels:
        np.testing.assert_array_equal(got["count"][lv.key], ref["count"][lv.key])
        np.testing.assert_array_equal(got["dirty"][lv.key], ref["dirty"][lv.key])
        untouched = ref["count"][lv.key] == 0
        if lv is layout.levels[-1]:
            assert untouched.any() and (~untouched).any(), "the test must leave some leaves untouched, touch others"
        for a in layout.arrays:
            p0 = np.asarray(init_state(layout, seed=2).params[lv.key][a.name])
            np.testing.assert_array_equal(got["params"][lv.key][a.name][untouched], p0[untouched])
            assert not np.asarray(got["mu"][lv.key][a.name][untouched]).any()
            for k in ("params", "mu", "nu"):
                np.testing.assert_allclose(np.asarray(got[k][lv.key][a.name], np.float64),
                                           np.asarray(ref[k][lv.key][a.name], np.float64), **tol)


def test_generic_memory_is_a_one_node_bank_updated_when_touched():
    layout = BankLayout.generic_from_config(small_cfg())
    assert [(lv.nodes, lv.rank) for lv in layout.levels] == [(1, 6)]
    state = init_state(layout, seed=3)
    ref = to_numpy(state)
    rng = np.random.default_rng(2)
    for touched in ([True, False, True], [False, False, False], [False, True, False]):
        paths = generic_paths(3)
        grads = random_grads(rng, layout, 3)
        state = update(state, jnp.asarray(paths), grads, jnp.asarray(touched))
        numpy_step(ref, layout, paths, grads, np.array(touched), **HP)
    assert int(state.count["level1"][0]) == 2  # the all-untouched step does not count
    for a in layout.arrays:
        np.testing.assert_allclose(state.params["level1"][a.name], ref["params"]["level1"][a.name], rtol=1e-5,
                                   atol=1e-7)


def test_fetched_grad_sq_norm_is_the_norm_of_per_node_sums():
    layout = BankLayout.from_config(small_cfg())
    rng = np.random.default_rng(3)
    paths = leaf_paths(layout, np.array([0, 1, 1, 5, 7]))
    touched = np.array([True, True, True, False, True])
    grads = random_grads(rng, layout, 5)
    expected = 0.0
    for lv in layout.levels:
        for g in level_grads(layout, grads)[lv.level].values():
            sums = {}
            for b in np.flatnonzero(touched):
                n = int(paths[b, lv.level - 1])
                sums[n] = sums.get(n, 0.0) + g[b]
            expected += sum(float(np.sum(s * s)) for s in sums.values())
    got = jax.jit(fetched_grad_sq_norm, static_argnums=0)(layout, jnp.asarray(paths), grads, jnp.asarray(touched))
    np.testing.assert_allclose(float(got), expected, rtol=1e-5)


def test_gather_then_update_reads_what_was_written():
    """Training signal flows: after an update, gather returns the updated blocks for those paths."""
    layout = BankLayout.from_config(small_cfg())
    state = init_state(layout, seed=4)
    paths = jnp.asarray(leaf_paths(layout, np.array([3, 6])))
    before = gather(state, paths)
    grads = {k: jnp.ones_like(v, jnp.float32) for k, v in before.items()}
    after = gather(update(state, paths, grads, jnp.array([True, True])), paths)
    for name in before:  # a positive gradient moves every fetched entry down by about lr
        assert (np.asarray(after[name]) < np.asarray(before[name])).all()
