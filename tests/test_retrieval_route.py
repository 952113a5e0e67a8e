"""Greedy tree routing and blocking, checked against a plain numpy descent."""

from __future__ import annotations

import numpy as np
import pytest

from memlm.retrieval import Tree, route, route_avoiding
from memlm.retrieval.routing import descend_levels


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def random_tree(k: int, depth: int, dim: int, seed: int = 0) -> Tree:
    """Centroids whose children sit near their parent, like a fitted tree's."""
    rng = np.random.default_rng(seed)
    levels, parent = [], np.zeros((1, dim))
    for level in range(1, depth + 1):
        c = np.repeat(parent, k, axis=0) + rng.standard_normal((k**level, dim)) / level
        levels.append(c.astype(np.float32))
        parent = c
    return Tree(k=k, depth=depth, dim=dim, embedder="test", centroids=levels)


def numpy_descent(tree: Tree, x: np.ndarray, block_level=None, avoid=None) -> np.ndarray:
    """Reference: float64, one text at a time, all k children compared by L2 distance."""
    x = x.astype(np.float64)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    out = np.zeros((len(x), tree.depth), np.int64)
    for i, xi in enumerate(x):
        node = 0
        for level in range(1, tree.depth + 1):
            children = node * tree.k + np.arange(tree.k)
            dist = np.sum((tree.centroids[level - 1][children].astype(np.float64) - xi) ** 2, axis=1)
            order = np.argsort(dist, kind="stable")
            if level == block_level:
                banned = children[order[0]] if avoid is None else avoid
                order = [j for j in order if children[j] != banned]
            node = children[order[0]]
            out[i, level - 1] = node
    return out


@pytest.fixture(scope="module")
def tree_and_points():
    tree = random_tree(k=8, depth=3, dim=24)  # 512 leaves: exercises the per-row gather path too
    x = unit(np.random.default_rng(1).standard_normal((600, 24)))
    return tree, x


def test_route_matches_numpy_greedy_descent(tree_and_points):
    tree, x = tree_and_points
    paths = route(tree, x)
    assert paths.dtype == np.int32 and paths.shape == (600, 3)
    np.testing.assert_array_equal(paths, numpy_descent(tree, x))
    # nested: every node's parent is the node one level up
    assert (paths[:, 1:] // tree.k == paths[:, :-1]).all()


def test_route_normalises_inputs_and_streams_chunks(tree_and_points):
    tree, x = tree_and_points
    scaled = x * np.random.default_rng(2).uniform(0.1, 10.0, (len(x), 1)).astype(np.float32)
    np.testing.assert_array_equal(route(tree, scaled), route(tree, x))
    chunked = descend_levels(tree.centroids, tree.k, x, chunk=64)  # 10 chunks, the last one padded
    np.testing.assert_array_equal(chunked, route(tree, x))


@pytest.mark.parametrize("level", [1, 2, 3])
def test_blocked_routing_takes_the_next_best_sibling(tree_and_points, level):
    tree, x = tree_and_points
    greedy = route(tree, x)
    blocked = route(tree, x, block_level=level)
    assert (blocked[:, level - 1] != greedy[:, level - 1]).all()
    assert (blocked[:, level - 1] // tree.k == greedy[:, level - 1] // tree.k).all()  # a sibling
    np.testing.assert_array_equal(blocked[:, : level - 1], greedy[:, : level - 1])
    np.testing.assert_array_equal(blocked, numpy_descent(tree, x, block_level=level))


def test_route_avoiding_never_passes_through_the_node(tree_and_points):
    tree, x = tree_and_points
    greedy = route(tree, x)
    for level in (1, 2):
        node = int(np.bincount(greedy[:, level - 1]).argmax())  # the busiest node of the level
        paths = route_avoiding(tree, x, level, node)
        hit = greedy[:, level - 1] == node
        assert hit.any() and (paths[:, level - 1] != node).all()
        np.testing.assert_array_equal(paths[~hit], greedy[~hit])
        np.testing.assert_array_equal(paths, numpy_descent(tree, x, block_level=level, avoid=node))


def test_route_rejects_bad_arguments(tree_and_points):
    tree, x = tree_and_points
    with pytest.raises(ValueError, match=r"\[n, 24\]"):
        route(tree, x[:, :10])
    with pytest.raises(ValueError, match="block_level"):
        route(tree, x, block_level=4)
    with pytest.raises(ValueError, match="node = 8"):
        route_avoiding(tree, x, 1, 8)
    bad = x.copy()
    bad[5, 0] = np.inf
    with pytest.raises(ValueError, match="non-finite"):
        route(tree, bad)


@pytest.mark.parametrize(("rows", "n_parents"), [(64, 4), (64, 128), (4096, 4096), (4096, 128), (1000, 96)],
                         ids=["dense", "gather", "gather-in-sub-chunks", "parent-tiles", "parent-tiles-odd"])
def test_children_dots_matches_numpy_on_every_path(rows, n_parents):
    """Dense matmul (few nodes), per-row gather (few rows per parent, direct or in sub-chunks) and
    parent tiles (many rows per parent) all give each row's dots with its own k children."""
    from memlm.retrieval.routing import _children_dots

    k, dim = 4, 8
    rng = np.random.default_rng(rows + n_parents)
    cent = rng.standard_normal((n_parents * k, dim)).astype(np.float32)
    x = rng.standard_normal((rows, dim)).astype(np.float32)
    parent = rng.integers(0, n_parents, rows).astype(np.int32)
    expected = np.einsum("nd,nkd->nk", x.astype(np.float64), cent.reshape(n_parents, k, dim)[parent])
    np.testing.assert_allclose(np.asarray(_children_dots(x, parent, cent, k)), expected, rtol=1e-5, atol=1e-5)
