"""Beam routing's candidates against a brute-force ranking of every leaf by summed centroid distance."""

import itertools

import numpy as np
import pytest

from memlm.retrieval import Tree, route, route_beam


def random_tree(k=3, depth=3, dim=6, seed=0):
    rng = np.random.default_rng(seed)
    cents = []
    for level in range(1, depth + 1):
        c = rng.normal(size=(k**level, dim)).astype(np.float32)
        cents.append(c / np.linalg.norm(c, axis=1, keepdims=True))
    return Tree(k=k, depth=depth, dim=dim, embedder="test", centroids=cents)


def brute_force(tree, x, width):
    """Every leaf's path, by summed distance to the centroids on it (smallest first)."""
    x = x / np.linalg.norm(x)
    rows = []
    for local in itertools.product(range(tree.k), repeat=tree.depth):
        path, node, cost = [], 0, 0.0
        for level, j in enumerate(local):
            node = node * tree.k + j
            path.append(node)
            cost += float(np.linalg.norm(x - tree.centroids[level][node]))
        rows.append((cost, path))
    rows.sort(key=lambda r: r[0])
    return [p for _, p in rows]


def summed_distance(tree, x, path):
    x = x / np.linalg.norm(x)
    return sum(float(np.linalg.norm(x - tree.centroids[level][node])) for level, node in enumerate(path))


@pytest.mark.parametrize("width", [1, 2, 5])
def test_width_one_is_greedy_and_wider_beams_hold_the_greedy_path_then_near_leaves(width):
    tree = random_tree()
    x = np.random.default_rng(1).normal(size=(40, tree.dim)).astype(np.float32)
    got = route_beam(tree, x, width)
    greedy = route(tree, x)
    assert got.shape == (40, width, tree.depth)
    np.testing.assert_array_equal(got[:, 0], greedy)
    for i in range(len(x)):
        others = got[i, 1:].tolist()
        assert greedy[i].tolist() not in others and len({tuple(p) for p in others}) == len(others)
        costs = [summed_distance(tree, x[i], p) for p in others]
        assert costs == sorted(costs)
        # a beam of `width` keeps, at level 1, the `width` nodes nearest by distance
        d1 = np.linalg.norm(x[i] / np.linalg.norm(x[i]) - tree.centroids[0], axis=1)
        assert {p[0] for p in others} <= set(np.argsort(d1)[:width].tolist())


def test_a_full_width_beam_is_the_exact_ranking():
    tree = random_tree(k=2, depth=3)
    x = np.random.default_rng(2).normal(size=(25, tree.dim)).astype(np.float32)
    width = tree.k**tree.depth
    got = route_beam(tree, x, width)
    greedy = route(tree, x)
    for i in range(len(x)):
        ranked = [p for p in brute_force(tree, x[i], width) if p != greedy[i].tolist()]
        assert got[i, 1:].tolist() == ranked


def test_bad_width_is_refused():
    with pytest.raises(ValueError, match="width"):
        route_beam(random_tree(), np.ones((2, 6), np.float32), 0)
