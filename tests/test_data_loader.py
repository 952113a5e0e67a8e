"""The grain loader: determinism, resumption, host split, epochs, generic flag."""

import json

import numpy as np
import pytest

from memlm.data.loader import Loader, generic_draw, sibling_leaves
from memlm.data.records import ShardWriter, encode_sequence, write_json

SEQ_LEN, DEPTH, N = 16, 2, 40


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """40 sequences in 3 shards, in leaf order as prepare writes them (k = 4, depth 2: 16 leaves);
    sequence i starts with token i+1 and has path (leaf(i) // 4, leaf(i))."""
    d = tmp_path_factory.mktemp("loader")
    with ShardWriter(d / "shards", per_shard=15) as w:
        for i in range(N):
            n = 4 + i % 9
            toks = np.concatenate([[i + 1], np.arange(n - 1) + 100])
            w.write(encode_sequence(toks, np.array([n - 2, 2]), np.array([leaf(i) // 4, leaf(i)]), leaf(i), SEQ_LEN))
        shards = w.close()
    counts = np.bincount([leaf(i) for i in range(N)], minlength=16).tolist()
    write_json(d / "manifest.json", {"shards": [f"shards/{s}" for s in shards], "sequences": N, "seq_len": SEQ_LEN,
                                     "depth": DEPTH, "k": 4, "leaf_histogram": {"sequences": counts}})
    return d


def leaf(i):
    return i * 16 // N


def ids(batch):
    return (batch["tokens"][:, 0] - 1).tolist()


def test_batches_have_the_documented_shapes_and_dtypes(data_dir):
    b = next(iter(Loader(data_dir, batch_size=8, seed=0, generic_prob=0.2)))
    assert b["tokens"].shape == b["segment_ids"].shape == b["positions"].shape == (8, SEQ_LEN)
    assert b["paths"].shape == (8, DEPTH) and b["generic"].shape == (8,)
    assert all(b[k].dtype == np.int32 for k in ("tokens", "segment_ids", "positions", "paths"))
    assert b["generic"].dtype == np.bool_
    for row, i in enumerate(ids(b)):
        assert b["paths"][row].tolist() == [leaf(i) // 4, leaf(i)]
        n = 4 + i % 9
        assert b["segment_ids"][row].tolist() == [1] * (n - 2) + [2, 2] + [0] * (SEQ_LEN - n)


def test_each_epoch_is_a_permutation_and_epochs_differ(data_dir):
    loader = Loader(data_dir, batch_size=8, seed=3, generic_prob=0.0)
    it = iter(loader)
    stream = [i for _ in range(10) for i in ids(next(it))]  # 80 samples = 2 epochs
    assert sorted(stream[:N]) == list(range(N)) and sorted(stream[N:]) == list(range(N))
    assert stream[:N] != stream[N:], "each epoch is reshuffled"
    assert stream[:N] != list(range(N)), "the order is shuffled across shards"
    other = Loader(data_dir, batch_size=8, seed=4, generic_prob=0.0)
    assert ids(other.batch_at(0)) != ids(loader.batch_at(0))


def test_batch_is_a_pure_function_of_seed_and_step(data_dir):
    a = Loader(data_dir, batch_size=8, seed=7, generic_prob=0.3)
    b = Loader(data_dir, batch_size=8, seed=7, generic_prob=0.3, num_threads=1, prefetch=1)
    it = iter(a)
    for step in range(7):
        x = next(it)
        for y in (a.batch_at(step), b.batch_at(step)):
            assert all(np.array_equal(x[k], y[k]) for k in x)


def test_iterating_from_a_step_yields_exactly_the_uninterrupted_batches(data_dir):
    """Resuming needs only the step: no iterator state is saved (a run restarts on any process count)."""
    loader = Loader(data_dir, batch_size=8, seed=1, generic_prob=0.3)
    it = iter(loader)
    for _ in range(4):
        next(it)
    expected = [next(it) for _ in range(8)]  # crosses an epoch boundary
    resumed = Loader(data_dir, batch_size=8, seed=1, generic_prob=0.3).iterate(4)
    for want in expected:
        got = next(resumed)
        assert all(np.array_equal(want[k], got[k]) for k in want)


def test_a_global_batch_is_sorted_by_leaf_and_split_in_contiguous_leaf_ranges(data_dir):
    """Co-location: process h (and within it device d) gets a contiguous range of leaves, so its
    sequences fetch the bank rows its devices own."""
    hosts = [Loader(data_dir, batch_size=16, seed=2, generic_prob=0.0, process_index=h, process_count=4)
             for h in range(4)]
    for step in range(3):
        leaves = [h.batch_at(step)["paths"][:, -1] for h in hosts]
        flat = np.concatenate(leaves)
        assert np.all(np.diff(flat) >= 0), flat
    index, _ = hosts[0].global_rows(0)
    assert sorted(index.tolist()) == sorted(Loader(data_dir, batch_size=16, seed=2, generic_prob=0.0)
                                            .global_rows(0)[0].tolist())


def test_a_subtree_loader_reads_only_that_level1_subtree(data_dir):
    manifest = json.loads((data_dir / "manifest.json").read_text())
    k, depth = manifest["k"], manifest["depth"]
    for sub in (0, k - 1):
        loader = Loader(data_dir, batch_size=8, seed=0, generic_prob=0.0, subtree=sub)
        counts = np.asarray(manifest["leaf_histogram"]["sequences"])
        per = k ** (depth - 1)
        assert loader.count == counts[sub * per:(sub + 1) * per].sum()
        for step in range(3):
            assert (loader.batch_at(step)["paths"][:, 0] == sub).all()


def test_hosts_split_each_global_batch_disjointly_and_completely(data_dir):
    single = Loader(data_dir, batch_size=8, seed=5, generic_prob=0.3)
    hosts = [Loader(data_dir, batch_size=8, seed=5, generic_prob=0.3, process_index=h, process_count=4)
             for h in range(4)]
    for step in range(12):
        glob = single.batch_at(step)
        parts = [h.batch_at(step) for h in hosts]
        assert all(p["tokens"].shape[0] == 2 for p in parts)
        for h, part in enumerate(parts):  # host h holds the h-th contiguous quarter of the leaf-sorted batch
            for k in glob:
                assert np.array_equal(part[k], glob[k][2 * h:2 * h + 2]), (step, h, k)
        assert sorted(i for p in parts for i in ids(p)) == sorted(ids(glob))


def test_generic_flag_is_drawn_with_the_asked_probability_per_global_sample():
    draws = np.array([generic_draw(11, i) for i in range(20_000)])
    assert abs((draws < 1 / 17).mean() - 1 / 17) < 0.006
    assert draws.min() >= 0.0 and draws.max() < 1.0
    assert generic_draw(11, 5) == generic_draw(11, 5) != generic_draw(12, 5)


def test_generic_flag_follows_the_draw_and_is_off_at_probability_zero(data_dir):
    loader = Loader(data_dir, batch_size=8, seed=9, generic_prob=0.5)
    flags = np.concatenate([loader.batch_at(s)["generic"] for s in range(5)])
    positions = np.concatenate([loader.global_rows(s)[1] for s in range(5)])  # rows are sorted by leaf
    assert sorted(positions.tolist()) == list(range(40))
    assert flags.tolist() == [generic_draw(9, int(p)) < 0.5 for p in positions]
    off = Loader(data_dir, batch_size=8, seed=9, generic_prob=0.0)
    assert not any(off.batch_at(s)["generic"].any() for s in range(5))


def test_sibling_leaves_change_the_asked_level_only_at_the_asked_rate():
    """Depth 3, k = 5: a drawn row's leaf keeps its ancestors above the level, takes another child
    there (each other child about equally often), and ineligible (generic) rows never change."""
    k, depth, n = 5, 3, 20_000
    rng = np.random.default_rng(0)
    leaves, eligible = rng.integers(0, k**depth, n), rng.random(n) < 0.9
    drawn = {}
    for level in (1, 2, 3):
        new, flags = drawn[level] = sibling_leaves(3, np.arange(n), leaves, eligible, prob=0.2, level=level, k=k,
                                                   depth=depth)
        assert not flags[~eligible].any() and (new[~flags] == leaves[~flags]).all()
        assert abs(flags[eligible].mean() - 0.2) < 0.015
        own, got = leaves[flags] // k ** (depth - level), new[flags] // k ** (depth - level)
        assert (own // k == got // k).all() and (own != got).all()
        offsets = np.bincount((got - own) % k, minlength=k)[1:]
        assert offsets.min() > 0.8 * offsets.mean()
        if level < depth:  # below the level, children are drawn, not copied
            assert (new[flags] % k != leaves[flags] % k).mean() > 0.7
    again = sibling_leaves(3, np.arange(n), leaves, eligible, prob=0.2, level=2, k=k, depth=depth)
    other = sibling_leaves(4, np.arange(n), leaves, eligible, prob=0.2, level=2, k=k, depth=depth)
    assert (again[0] == drawn[2][0]).all() and (again[1] == drawn[2][1]).all()
    assert (other[1] != again[1]).any()


def test_sibling_paths_in_batches_match_global_leaves_and_split_over_hosts(data_dir):
    """The paths a batch carries are the leaves the bank tiers prefetch (``global_leaves``), on one
    process and on four; generic rows keep their own path."""
    single = Loader(data_dir, batch_size=8, seed=5, generic_prob=0.3, sibling_prob=0.5)
    hosts = [Loader(data_dir, batch_size=8, seed=5, generic_prob=0.3, sibling_prob=0.5, process_index=h,
                    process_count=4) for h in range(4)]
    flagged = 0
    for step in range(5):
        glob = single.batch_at(step)
        leaves, generic = single.global_leaves(step)
        assert (glob["paths"][:, -1] == leaves).all() and (glob["paths"][:, 0] == leaves // 4).all()
        assert not (glob["sibling"] & glob["generic"]).any()
        own = np.array([leaf(i) for i in ids(glob)])
        assert ((own != leaves) == glob["sibling"]).all() and ((own // 4 != leaves // 4) == glob["sibling"]).all()
        flagged += glob["sibling"].sum()
        for h, part in enumerate(hosts):
            for key in glob:
                assert np.array_equal(part.batch_at(step)[key], glob[key][2 * h:2 * h + 2]), (step, h, key)
    assert 0 < flagged < 40
    assert "sibling" not in Loader(data_dir, batch_size=8, seed=5, generic_prob=0.3).batch_at(0)


def test_bad_loader_arguments_and_missing_data_fail_clearly(data_dir, tmp_path):
    with pytest.raises(ValueError, match="not divisible"):
        Loader(data_dir, batch_size=6, seed=0, generic_prob=0.1, process_count=4)
    with pytest.raises(ValueError, match="not a prepared data directory"):
        Loader(tmp_path, batch_size=4, seed=0, generic_prob=0.1)
