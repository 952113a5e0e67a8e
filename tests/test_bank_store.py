"""The tensorstore bank store: exact save / load (params, moments, counters), incremental saves,
crash safety at every phase of a save and of a rollback, older versions, metadata checks, lazy
creation of a 4096-leaf bank, and path fetch for inference against the device gather."""

import os
import resource

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType
from jax.sharding import PartitionSpec as P
from oracles import sparse_adamw

from memlm.bank import (
    BankLayout,
    BankMismatchError,
    BankStore,
    BankStoreError,
    PathFetcher,
    gather,
    generic_paths,
    init_state,
    leaf_paths,
)
from memlm.bank.init import init_blocks
from memlm.config import load_config


def small_cfg(**memory):
    cfg = load_config()
    cfg.model.update(n_layers=2, d_model=8, d_ff=16, n_heads=2, head_dim=4)
    cfg.memory.update(type="ffn", sizes=(4, 2))
    cfg.memory.update(**memory)
    cfg.tree.update(k=4, depth=2)
    return cfg


LAYOUT = BankLayout.from_config(small_cfg())
SHARD_BYTES = 512  # level 1: 2 nodes per shard, level 2: 4 nodes per shard
_update = jax.jit(lambda s, p, g, t: sparse_adamw(s, p, g, t, lr=1e-2, weight_decay=0.1))


def train(state, rng, steps=2, leaves=None, batch=6):
    layout = state.layout
    n_leaves = layout.levels[-1].nodes if not layout.generic else 1
    for _ in range(steps):
        chosen = rng.choice(leaves, size=batch) if leaves is not None else rng.integers(0, n_leaves, size=batch)
        paths = jnp.asarray(leaf_paths(layout, chosen))
        grads = {a.name: jnp.asarray(rng.normal(size=(batch, *a.shape(layout.fetched_rank))).astype(np.float32))
                 for a in layout.arrays}
        state = _update(state, paths, grads, jnp.ones(batch, bool))
    return state


def assert_same(a, b):
    for x, y in zip(jax.tree.leaves((a.params, a.mu, a.nu, a.count)), jax.tree.leaves((b.params, b.mu, b.nu, b.count)),
                    strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def files(root):
    out = {}
    for d, _, names in os.walk(root):
        for n in names:
            p = os.path.join(d, n)
            st = os.stat(p)
            out[os.path.relpath(p, root)] = (st.st_ino, st.st_mtime_ns, st.st_size)
    return out


@pytest.fixture
def bank(tmp_path):
    store = BankStore.create(tmp_path / "bank", LAYOUT, seed=3, tree_id="tree-a", shard_bytes=SHARD_BYTES,
                             batch_bytes=1500)  # a few nodes per batch: saves run as several pipelined batches
    return store, store.load()


def test_save_and_load_are_exact_with_moments_counters_and_sharding(bank, tmp_path):
    store, state = bank
    np.testing.assert_array_equal(state.params["level2"]["w1"], init_state(LAYOUT, 3).params["level2"]["w1"])
    state = train(state, np.random.default_rng(0), leaves=np.arange(10))  # leaves 10..15 stay untrained
    version, state = store.save(state)
    assert version == 1 and not any(np.asarray(d).any() for d in state.dirty.values())
    mesh = jax.make_mesh((4, 1, 2), ("data", "fsdp", "tensor"), axis_types=(AxisType.Auto,) * 3)
    reopened = BankStore.open(tmp_path / "bank", LAYOUT, tree_id="tree-a", batch_bytes=200)  # chunks < a shard
    assert reopened.version == 1
    loaded = reopened.load(mesh, replicate_levels=1, rules={"bank_nodes": ("data",), "mem_rank": ("tensor",)})
    assert_same(loaded, state)
    assert loaded.params["level2"]["w3"].sharding.spec == P(("data", "fsdp"), None, "tensor", None)
    assert loaded.params["level1"]["w1"].sharding.spec == P(None, None, None, "tensor")
    assert loaded.count["level2"].sharding.spec == P(("data", "fsdp"))


def test_incremental_save_writes_only_dirty_blocks(bank, tmp_path):
    store, state = bank
    rng = np.random.default_rng(1)
    _, state = store.save(train(state, rng, steps=3))
    before, stats = files(tmp_path / "bank" / "main"), dict(store.stats)
    state = train(state, rng, steps=2, leaves=np.array([0, 1]))  # level 1: node 0; level 2: nodes 0, 1
    _, state = store.save(state)
    assert store.stats["main_rows_written"] - stats["main_rows_written"] == 3
    assert store.stats["delta_rows_written"] - stats["delta_rows_written"] == 3
    after = files(tmp_path / "bank" / "main")
    changed = {p for p in after if before.get(p) != after[p]}
    block_files = {p for p in changed if "/params/" in p or "/mu/" in p or "/nu/" in p}
    expected = {f"level{lv}/{a}/{k}/c/0/0/0/0" for lv in (1, 2) for a in ("w1", "w2", "w3") for k in ("params", "mu",
                                                                                                       "nu")}
    assert block_files == expected  # one shard per array and level: the one holding the dirty nodes
    assert changed - block_files <= {f"level{lv}/{f}/c/0" for lv in (1, 2) for f in ("count", "written")}
    assert len([p for p in after if p.startswith("level2/w1/params/c/")]) == 4  # the other shards were left alone


def crash_at(phase, nth=1):
    seen = []

    def hook(name):
        if name == phase:
            seen.append(name)
            if len(seen) == nth:
                raise RuntimeError(f"simulated crash at {phase}")
    return hook


def test_crash_while_writing_the_delta_leaves_the_previous_version(bank, tmp_path):
    store, state = bank
    rng = np.random.default_rng(2)
    _, v1 = store.save(train(state, rng))
    v2 = train(v1, rng)
    small = BankStore.open(tmp_path / "bank", LAYOUT, writable=True, batch_bytes=1500)  # several delta batches
    small.on_phase = crash_at("delta-batch", nth=2)
    with pytest.raises(RuntimeError, match="simulated crash"):
        small.save(v2)
    assert (tmp_path / "bank" / "before" / "v000000000002").exists()  # a partial delta on disk
    reader = BankStore.open(tmp_path / "bank", LAYOUT)
    assert reader.version == 1
    assert_same(reader.load(), v1)
    writer = BankStore.open(tmp_path / "bank", LAYOUT, writable=True)
    assert not (tmp_path / "bank" / "before" / "v000000000002").exists()  # discarded
    assert writer.save(v2)[0] == 2
    assert_same(BankStore.open(tmp_path / "bank", LAYOUT).load(), v2)


@pytest.mark.parametrize("phase", ["committed", "apply-batch", "applied"])
def test_crash_after_the_commit_gives_the_new_version_and_is_replayed(bank, tmp_path, phase):
    store, state = bank
    rng = np.random.default_rng(3)
    _, v1 = store.save(train(state, rng))
    v2 = train(v1, rng, steps=3)
    store.on_phase = crash_at(phase)
    with pytest.raises(RuntimeError, match="simulated crash"):
        store.save(v2)
    with pytest.raises(BankStoreError, match="interrupted"):  # main may be half-applied: no more saves here
        store.save(v2)
    reader = BankStore.open(tmp_path / "bank", LAYOUT)  # read-only: overlays the complete delta
    assert reader.version == 2
    assert_same(reader.load(), v2)
    writer = BankStore.open(tmp_path / "bank", LAYOUT, writable=True)  # replays it into main
    assert writer.version == 2 and not (tmp_path / "bank" / "after" / "v000000000002").exists()
    assert_same(BankStore.open(tmp_path / "bank", LAYOUT).load(), v2)
    assert_same(BankStore.open(tmp_path / "bank", LAYOUT, version=1).load(), v1)


def test_older_versions_restore_exactly_and_a_rollback_forgets_later_ones(bank, tmp_path, monkeypatch):
    store, state = bank
    rng = np.random.default_rng(4)
    saved = {}
    for _ in range(3):
        version, state = store.save(train(state, rng, leaves=rng.choice(16, size=5, replace=False)))
        saved[version] = state
    assert store.versions == [1, 2, 3]  # keep = 3
    for v in (1, 2, 3):
        assert_same(BankStore.open(tmp_path / "bank", LAYOUT, version=v).load(), saved[v])
    with pytest.raises(BankStoreError, match="version 0 is not restorable"):
        BankStore.open(tmp_path / "bank", LAYOUT, version=0)

    def crash_in_rollback(self, name):
        if name == "apply-batch":
            raise RuntimeError("simulated crash in rollback")
    monkeypatch.setattr(BankStore, "_phase", crash_in_rollback)
    with pytest.raises(RuntimeError, match="simulated crash"):
        BankStore.open(tmp_path / "bank", LAYOUT, version=1, writable=True)
    monkeypatch.undo()
    assert BankStore.open(tmp_path / "bank", LAYOUT).version == 1  # the pending rollback already hides 2, 3
    writer = BankStore.open(tmp_path / "bank", LAYOUT, writable=True)  # finishes the rollback
    assert writer.versions == [1]
    assert_same(writer.load(), saved[1])
    version, _ = writer.save(train(saved[1], rng))
    assert version == 4  # numbers are never reused
    with pytest.raises(BankStoreError, match="not restorable"):
        BankStore.open(tmp_path / "bank", LAYOUT, version=2)


@pytest.mark.parametrize("change,field", [
    (lambda c: c.model.update(d_model=16), "d_model"),
    (lambda c: c.model.update(n_layers=3), "n_layers"),
    (lambda c: c.tree.update(k=2), "k"),
    (lambda c: c.memory.update(sizes=(4, 4)), "sizes"),
    (lambda c: c.memory.update(dtype="bfloat16"), "dtype"),
    (lambda c: c.memory.update(type="lora_ffn"), "memory_type"),
    (None, "tree_id"),
])
def test_opening_with_a_different_model_or_tree_names_the_field(bank, tmp_path, change, field):
    cfg = small_cfg()
    if change is not None:
        change(cfg)
    with pytest.raises(BankMismatchError, match=f"field '{field}'") as err:
        BankStore.open(tmp_path / "bank", BankLayout.from_config(cfg), tree_id="tree-b")
    assert err.value.field == field
    with pytest.raises(BankStoreError, match="no bank here"):
        BankStore.open(tmp_path / "nothing", LAYOUT)
    with pytest.raises(BankStoreError, match="already holds a bank"):
        BankStore.create(tmp_path / "bank", LAYOUT)


def test_a_4096_leaf_bank_is_created_and_opened_without_materialising_it(tmp_path):
    cfg = load_config("experiments/paper_160m.py")
    cfg.memory.update(sizes=(0, 0, 16), dtype="float32")  # App. D: 4096 blocks of 860,160 parameters
    cfg.tree.update(depth=3)
    layout = BankLayout.from_config(cfg)
    assert layout.params() == 4096 * 860_160  # 14 GB of fp32 parameters, 28 GB more of moments
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB, the peak so far
    BankStore.create(tmp_path / "big", layout, seed=11)
    store = BankStore.open(tmp_path / "big", layout)
    on_disk = sum(s for _, _, s in files(tmp_path / "big").values())
    assert on_disk < 64 << 10, on_disk  # metadata only
    fetcher = PathFetcher(store)
    leaf = 4095
    fetched = fetcher.fetch(leaf_paths(layout, np.array([leaf]))[0])
    lv = layout.level(3)
    for i, a in enumerate(layout.arrays):
        # the node's own init, computed directly (jitted, as the store does: eager and jitted float ops may
        # round differently under the tests' --xla_backend_optimization_level=0)
        expected = jax.jit(init_blocks, static_argnums=(0, 1, 2, 3))(layout, 11, lv, a, jnp.array([leaf]))
        np.testing.assert_array_equal(fetched[a.name], expected)
        assert fetched[a.name].shape == (1, *a.shape(16)), i
    grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss
    assert grown < 300 << 10, f"peak RSS grew by {grown} KiB"


def test_path_fetch_equals_the_device_gather_and_caches_shallow_levels(tmp_path):
    cfg = small_cfg(sizes=(4, 2, 2))
    cfg.tree.update(k=2, depth=3)
    layout = BankLayout.from_config(cfg)
    store = BankStore.create(tmp_path / "bank", layout, seed=5)
    rng = np.random.default_rng(5)
    state = train(store.load(), rng, steps=3, leaves=np.arange(6))  # leaves 6, 7 stay at their init
    _, state = store.save(state)
    state = train(state, rng, steps=1, leaves=np.arange(8))
    store.save(state)
    reader = BankStore.open(tmp_path / "bank", layout, version=1)  # an older version, through the overlay
    fetcher = PathFetcher(reader, cache_levels=(1, 2))
    reference = BankStore.open(tmp_path / "bank", layout, version=1).load()
    paths = leaf_paths(layout, np.arange(8))
    expected = gather(reference, jnp.asarray(paths))
    order = [0, 1, 7, 6, 2]  # 1 shares levels 1-2 with 0; 6 with 7
    reads = []
    for b in order:
        before = fetcher.block_reads
        got = fetcher.fetch(paths[b])
        reads.append(fetcher.block_reads - before)
        for name in got:
            np.testing.assert_array_equal(got[name], expected[name][b:b + 1])
    assert reads == [3, 1, 3, 1, 2]  # leaf 2 shares only its level-1 block with leaves 0 and 1
    assert fetcher.cache_hits == 5
    with pytest.raises(ValueError, match="not a child"):
        fetcher.fetch([0, 3, 6])


def test_generic_memory_saves_loads_and_fetches_like_a_bank(tmp_path):
    layout = BankLayout.generic_from_config(small_cfg())
    store = BankStore.create(tmp_path / "generic", layout, seed=9)
    state = train(store.load(), np.random.default_rng(6), steps=2)
    store.save(state)
    assert_same(BankStore.open(tmp_path / "generic", layout).load(), state)
    got = PathFetcher(BankStore.open(tmp_path / "generic", layout)).fetch([0])
    want = gather(state, jnp.asarray(generic_paths(1)))
    for name in got:
        np.testing.assert_array_equal(got[name], want[name])
    with pytest.raises(BankMismatchError, match="field 'generic'"):
        BankStore.open(tmp_path / "generic", BankLayout.from_config(small_cfg()))


def test_any_tensorstore_kvstore_works_ocdbt_and_urls(tmp_path):
    rng = np.random.default_rng(7)
    for location, shard_bytes in (({"driver": "ocdbt", "base": f"file://{tmp_path}/ocdbt/"}, 0),  # a key per block
                                  (f"file://{tmp_path}/url", SHARD_BYTES)):
        store = BankStore.create(location, LAYOUT, seed=1, shard_bytes=shard_bytes)
        _, v1 = store.save(train(store.load(), rng))
        _, v2 = store.save(train(v1, rng))
        assert_same(BankStore.open(location, LAYOUT).load(), v2)
        assert_same(BankStore.open(location, LAYOUT, version=1).load(), v1)
    assert (tmp_path / "ocdbt" / "manifest.ocdbt").exists()


def test_overwrite_replaces_the_bank_and_nothing_else(bank, tmp_path):
    store, state = bank
    store.save(train(state, np.random.default_rng(8)))
    (tmp_path / "bank" / "notes.txt").write_text("not the bank's")
    fresh = BankStore.create(tmp_path / "bank", LAYOUT, seed=3, overwrite=True)
    assert fresh.versions == [0] and not fresh.counts(2).any()
    assert_same(BankStore.open(tmp_path / "bank", LAYOUT).load(), init_state(LAYOUT, 3))
    assert (tmp_path / "bank" / "notes.txt").read_text() == "not the bank's"
