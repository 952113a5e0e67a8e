"""Balanced hierarchical k-means and the tree file: recovery, balance, determinism, edge cases, I/O."""

from __future__ import annotations

import json

import numpy as np
import pytest

from memlm.retrieval import Tree, TreeError, fit_tree, route

FIT = dict(steps=8, batch=512)


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def hierarchical_mixture(seed=0, dim=32, per=150):
    """4 well-separated super-clusters, each of 4 sub-clusters: labels (super, sub) per point."""
    rng = np.random.default_rng(seed)
    supers = 4.0 * rng.standard_normal((4, dim))
    subs = supers[:, None, :] + 1.0 * rng.standard_normal((4, 4, dim))
    sup = np.repeat(np.arange(4), 4 * per)
    sub = np.tile(np.repeat(np.arange(4), per), 4)
    x = subs[sup, sub] + 0.1 * rng.standard_normal((len(sup), dim))
    perm = rng.permutation(len(sup))
    return unit(x[perm]), sup[perm], sup[perm] * 4 + sub[perm]


def purity(nodes: np.ndarray, labels: np.ndarray) -> float:
    """Share of points whose node's majority label is their own label."""
    hits = sum(np.bincount(labels[nodes == v]).max() for v in np.unique(nodes))
    return hits / len(labels)


def test_tree_recovers_a_known_hierarchical_mixture():
    x, sup, sub = hierarchical_mixture()
    tree = fit_tree(x, k=4, depth=2, seed=0, embedder_name="test", **FIT)
    paths = route(tree, x)
    assert purity(paths[:, 0], sup) == 1.0
    assert purity(paths[:, 1], sub) > 0.98
    # and the other way round: each true cluster sits in one node (no cluster is split)
    assert purity(sub, paths[:, 1]) > 0.98


def test_balancing_lowers_the_largest_leaf_share_on_skewed_data():
    rng = np.random.default_rng(1)
    dim, k = 16, 8
    centres = 3.0 * rng.standard_normal((k, dim))
    weights = np.array([0.65] + [0.05] * 7)  # one tight cluster holds 65% of the data
    labels = rng.choice(k, size=8000, p=weights)
    noise = np.where(labels == 0, 0.1, 0.5)[:, None]
    x = unit(centres[labels] + noise * rng.standard_normal((len(labels), dim)))
    on = fit_tree(x, k=k, depth=1, balance_factor=1.5, seed=0, embedder_name="test", **FIT)
    off = fit_tree(x, k=k, depth=1, balance_factor=None, seed=0, embedder_name="test", **FIT)
    share_on, share_off = on.stats["level_1"]["largest_share"], off.stats["level_1"]["largest_share"]
    assert share_off > 0.6  # k-means alone keeps the big cluster whole
    assert share_on < 0.25
    assert off.fit["balance_factor"] is None and on.fit["balance_factor"] == 1.5


def test_fit_statistics_are_the_routed_counts():
    x, _, _ = hierarchical_mixture(seed=2)
    tree = fit_tree(x, k=4, depth=2, seed=0, embedder_name="test", **FIT)
    paths = route(tree, x)
    assert tree.stats["n_points"] == len(x)
    for level in (1, 2):
        counts = np.bincount(paths[:, level - 1], minlength=4**level)
        np.testing.assert_array_equal(tree.counts[level - 1], counts)
        s = tree.stats[f"level_{level}"]
        assert s["largest_share"] == pytest.approx(counts.max() / len(x))
        assert s["smallest_share"] == pytest.approx(counts.min() / len(x))
        assert s["empty_nodes"] == int((counts == 0).sum())
        assert s["nodes"] == 4**level


def test_fit_is_deterministic_for_a_seed_and_independent_of_grouping():
    x, _, _ = hierarchical_mixture(seed=3)
    a = fit_tree(x, k=4, depth=2, seed=7, embedder_name="test", **FIT)
    b = fit_tree(x, k=4, depth=2, seed=7, embedder_name="test", **FIT)
    for ca, cb in zip(a.centroids, b.centroids, strict=True):
        np.testing.assert_array_equal(ca, cb)
    assert a.id == b.id
    # one node per vmapped call instead of all four together: the same nodes, up to float rounding
    c = fit_tree(x, k=4, depth=2, seed=7, embedder_name="test", group_bytes=1, **FIT)
    for ca, cc in zip(a.centroids, c.centroids, strict=True):
        np.testing.assert_allclose(ca, cc, atol=1e-5)
    d = fit_tree(x, k=4, depth=2, seed=8, embedder_name="test", **FIT)
    assert d.id != a.id


def test_fit_reads_a_memmap_like_an_array(tmp_path):
    x, _, _ = hierarchical_mixture(seed=4)
    np.save(tmp_path / "x.npy", x)
    mm = np.load(tmp_path / "x.npy", mmap_mode="r")
    a = fit_tree(x, k=4, depth=2, seed=0, embedder_name="test", **FIT)
    b = fit_tree(mm, k=4, depth=2, seed=0, embedder_name="test", **FIT)
    assert a.id == b.id


def test_node_with_fewer_points_than_k():
    """3 points, k = 8: the first children are the points, the rest copies that are never routed to;
    children of an empty node copy its centroid."""
    rng = np.random.default_rng(5)
    pts = unit(rng.standard_normal((3, 16)))
    tree = fit_tree(pts, k=8, depth=2, seed=0, embedder_name="test", **FIT)
    level1, level2 = tree.centroids
    assert all(np.isfinite(c).all() for c in tree.centroids)
    # the first three children are the points (in some order), the other five exact copies of them
    match = np.abs(level1[:3, None, :] - pts[None]).max(-1) < 1e-6  # [child, point]
    assert (match.sum(0) == 1).all() and (match.sum(1) == 1).all()
    first = {tuple(r) for r in level1[:3]}
    assert all(tuple(r) in first for r in level1[3:])
    # each point has its own leaf, whose centroid is the point itself
    paths = route(tree, pts)
    assert len(set(paths[:, 1].tolist())) == 3
    np.testing.assert_allclose(level2[paths[:, 1]], pts, atol=1e-6)
    # children of the empty level-1 nodes 3..7 copy their parent's centroid
    for node in range(3, 8):
        np.testing.assert_array_equal(level2[node * 8 : node * 8 + 8], np.broadcast_to(level1[node], (8, 16)))
    # any query routes to one of the real points' nodes: copies lose ties to the lower index
    q = unit(rng.standard_normal((500, 16)))
    qp = route(tree, q)
    assert (qp[:, 0] < 3).all()
    assert (qp[:, 1] // 8 == qp[:, 0]).all()


def test_duplicate_points_share_a_path_and_keep_routing_defined():
    rng = np.random.default_rng(6)
    two = unit(rng.standard_normal((2, 16)))
    x = np.repeat(two, [400, 100], axis=0)
    tree = fit_tree(x, k=4, depth=2, seed=0, embedder_name="test", **FIT)
    assert all(np.isfinite(c).all() for c in tree.centroids)
    paths = route(tree, x)
    assert (paths[:400] == paths[0]).all() and (paths[400:] == paths[400]).all()
    assert (paths[0] != paths[400]).all()


def test_fit_rejects_bad_input():
    x = unit(np.random.default_rng(0).standard_normal((50, 8)))
    with pytest.raises(ValueError, match="k = 1"):
        fit_tree(x, k=1, depth=1)
    with pytest.raises(ValueError, match="balance_factor"):
        fit_tree(x, k=2, depth=1, balance_factor=0.5)
    bad = x.copy()
    bad[3, 2] = np.nan
    with pytest.raises(ValueError, match="non-finite"):
        fit_tree(bad, k=2, depth=1, **FIT)
    with pytest.raises(ValueError, match="shape"):
        fit_tree(x[0], k=2, depth=1)


@pytest.fixture(scope="module")
def small_tree():
    x, _, _ = hierarchical_mixture(seed=8)
    return fit_tree(x, k=4, depth=2, seed=3, embedder_name="hash", **FIT), x


def test_tree_file_round_trip(tmp_path, small_tree):
    tree, x = small_tree
    path = tree.save(tmp_path / "tree.npz")
    back = Tree.load(path, expect_dim=32, expect_embedder="hash")
    assert (back.k, back.depth, back.dim, back.embedder, back.seed) == (4, 2, 32, "hash", 3)
    assert back.id == tree.id and back.stats == tree.stats and back.fit == tree.fit
    for a, b in zip(tree.centroids + tree.counts, back.centroids + back.counts, strict=True):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(route(back, x), route(tree, x))


def test_tree_file_mismatch_and_corruption_fail_clearly(tmp_path, small_tree):
    tree, _ = small_tree
    path = tree.save(tmp_path / "tree.npz")
    with pytest.raises(TreeError, match="'dim' = 32.*384"):
        Tree.load(path, expect_dim=384)
    with pytest.raises(TreeError, match="'embedder' = 'hash'.*'minilm'"):
        Tree.load(path, expect_embedder="minilm")
    with pytest.raises(TreeError, match="does not exist"):
        Tree.load(tmp_path / "absent.npz")
    junk = tmp_path / "junk.npz"
    junk.write_bytes(b"not a zip file at all")
    with pytest.raises(TreeError, match="corrupt"):
        Tree.load(junk)

    def rewrite(name, **changes):
        with np.load(path) as z:
            arrays = {n: z[n] for n in z.files}
        meta = json.loads(arrays["meta"].tobytes())
        for key, value in changes.items():
            if key in meta:
                meta[key] = value
            else:
                arrays[key] = value
        arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), np.uint8)
        out = tmp_path / name
        np.savez(out, **arrays)
        return out

    tampered = tree.centroids[1].copy()
    tampered[0, 0] += 0.5
    with pytest.raises(TreeError, match="'id'"):
        Tree.load(rewrite("tampered.npz", centroids_2=tampered))
    with pytest.raises(TreeError, match="centroids_2"):
        Tree.load(rewrite("shape.npz", centroids_2=tree.centroids[1][:5]))
    with pytest.raises(TreeError, match="centroids_3"):
        Tree.load(rewrite("depth.npz", depth=3))
    with pytest.raises(TreeError, match="format"):
        Tree.load(rewrite("format.npz", format="something-else"))
