"""Routing diagnostics: prepare's leaf counts and tree statistics, probe routing agreement, and the
confidence gate, each checked against a plain numpy count on small hand-built or prepared cases."""

import json

import numpy as np
import pytest
from test_data_prepare import QUIET, make_corpus, tiny_cfg

from memlm.data import prepare
from memlm.data.readers import iter_documents
from memlm.eval.agreement import TrainingLeaves, format_agreement, majority_nodes, routing_agreement
from memlm.eval.probes import Probe, ProbeFileError, load_probes
from memlm.retrieval import Tree, get_embedder, route
from memlm.retrieval.confidence import gated, path_scores

WINDOW = 8


@pytest.fixture(scope="module")
def windowed(tmp_path_factory):
    """A tiny corpus cut into 8-token windows (documents span leaves), with the documents' "topic"
    field recorded as their entity."""
    d = tmp_path_factory.mktemp("diag")
    src = make_corpus(d / "corpus.jsonl", n=60)
    cfg = tiny_cfg(embed_unit="window", embed_window=WINDOW)
    cfg.data.entity_field = "topic"
    out = d / "out"
    return cfg, src, out, prepare(cfg, src, out, console=QUIET)


def reference_units(out):
    """(doc of each unit, leaf of each unit, training documents) recomputed from prepare's files."""
    lengths = np.diff(np.load(out / "doc_offsets.npy"))
    unit_doc = np.repeat(np.arange(len(lengths)), np.maximum(1, -(-lengths // WINDOW)))
    heldout = set(np.load(out / "heldout_ids.npy").tolist())
    return unit_doc, np.load(out / "paths.npy")[:, -1], heldout


def test_manifest_counts_documents_and_units_per_leaf(windowed):
    cfg, src, out, manifest = windowed
    unit_doc, leaf, _ = reference_units(out)
    leaves = cfg.tree.k ** cfg.tree.depth
    assert len(set(unit_doc[leaf == leaf[0]].tolist())) < len(set(unit_doc.tolist()))  # not one leaf for all
    docs_per_leaf = [len(set(unit_doc[leaf == lf].tolist())) for lf in range(leaves)]
    assert manifest["leaf_histogram"]["documents"] == docs_per_leaf
    assert manifest["leaf_histogram"]["units"] == np.bincount(leaf, minlength=leaves).tolist()
    assert sum(docs_per_leaf) > manifest["documents"]["training"]  # some documents have windows in two leaves


def test_manifest_holds_the_tree_fit_and_routed_distances(windowed):
    cfg, _, out, manifest = windowed
    t = manifest["tree"]
    assert (t["seed"], t["embed_window"], t["embed_unit"]) == (cfg.tree.seed, WINDOW, "window")
    assert t["fit"]["n_points"] == t["units"] and t["fit"]["steps"] == cfg.tree.kmeans_steps
    tree = Tree.load(out / "tree.npz")
    from memlm.data import units as U

    x = np.concatenate([np.load(p) for p in sorted((out / U.UNITS_DIR / "encode").glob("*/embeddings.npy"))])
    x = x.astype(np.float64)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    paths = np.load(out / "paths.npy")
    for level in range(1, cfg.tree.depth + 1):
        dist = np.linalg.norm(x - tree.centroids[level - 1][paths[:, level - 1]], axis=1)
        fit = t["fit"]["levels"][str(level)]
        assert fit["nodes"] == cfg.tree.k**level
        assert fit["inertia"] == pytest.approx(np.sum(dist**2), rel=1e-5)
        assert fit["mean_distance"] == pytest.approx(dist.mean(), rel=1e-5)
        routed = t["routed"]["levels"][str(level)]
        assert routed["mean_distance"] == pytest.approx(dist.mean(), rel=1e-5)
        for q, got in routed["distance"].items():
            want = np.quantile(dist, int(q[1:]) / 100, method="inverted_cdf")
            assert want - 1e-6 <= got <= want + 2 / 400 + 1e-6, (level, q)


def test_entity_leaves_are_the_units_of_each_topic_per_leaf(windowed):
    _, src, out, manifest = windowed
    unit_doc, leaf, heldout = reference_units(out)
    topics = [d.fields["topic"] for i, d in enumerate(iter_documents(src, report=None)) if i not in heldout]
    want = {}
    for u, d in enumerate(unit_doc):
        per = want.setdefault(topics[d], {})
        per[str(leaf[u])] = per.get(str(leaf[u]), 0) + 1
    assert manifest["entities"] == {"field": "topic", "path": "entity_leaves.json", "values": 4}
    assert json.loads((out / "entity_leaves.json").read_text())["leaves"] == want


# -- agreement on a hand-built case ------------------------------------------------------------

# k = 2, depth 2: leaves 0..3; leaves 0, 1 under level-1 node 0, leaves 2, 3 under node 1.
TARGETS = [{0: 3, 1: 1}, {2: 2, 3: 1, 0: 2}, {3: 5}, {1: 4, 2: 1}, None]
ROUTED = np.array([[0, 0], [1, 2], [1, 3], [1, 2], [0, 1]])
BUCKETS = ["0", "0", "1", "1", "1"]


def numpy_majority(targets, k, depth):
    """Reference: every target unit written out, ancestors by integer division, bincount argmax."""
    units = np.repeat(list(targets), list(targets.values()))
    return [int(np.argmax(np.bincount(units // k ** (depth - lv)))) for lv in range(1, depth + 1)]


def test_agreement_on_a_hand_built_case_is_the_numpy_count():
    res = routing_agreement(ROUTED, TARGETS, BUCKETS, k=2)
    # probe 0 agrees at both levels, 1 at level 1 only (its leaf tie 0/2 goes to leaf 0), 2 at both, 3 at neither
    assert res["n"] == 4 and res["leaf"] == 0.5 and res["levels"] == {"1": 0.75, "2": 0.5}
    hits = np.array([[ROUTED[i, lv] == numpy_majority(TARGETS[i], 2, 2)[lv] for lv in range(2)] for i in range(4)])
    assert [res["levels"]["1"], res["levels"]["2"]] == hits.mean(0).tolist()
    assert res["by_bucket"]["0"]["levels"] == {"1": 1.0, "2": 0.5} and res["by_bucket"]["0"]["n"] == 2
    assert res["by_bucket"]["1"]["levels"] == {"1": 0.5, "2": 0.5} and res["by_bucket"]["1"]["n"] == 2
    assert res["concentration"]["2"] == pytest.approx(np.mean([3 / 4, 2 / 5, 1.0, 4 / 5]))
    assert res["concentration"]["1"] == pytest.approx(np.mean([1.0, 3 / 5, 1.0, 4 / 5]))
    nodes, shares = majority_nodes(TARGETS[1], 2, 2)
    assert nodes.tolist() == [1, 0] and shares.tolist() == [0.6, 0.4]
    with_gate = routing_agreement(ROUTED, TARGETS, BUCKETS, k=2, gated=np.array([1, 0, 0, 0, 1], bool))
    assert with_gate["gated"] == 0.25 and with_gate["by_bucket"]["0"]["gated"] == 0.5
    table = format_agreement(res)
    assert "75.0%" in table and table.splitlines()[-1].split()[:2] == ["all", "4"]
    assert routing_agreement(ROUTED, [None] * 5, BUCKETS, k=2) is None


def test_agreement_of_prepared_documents_and_entities(windowed):
    """Probes naming documents or a topic, routed by their own text: the agreement is the count over
    prepare's paths.npy of those documents' windows."""
    cfg, src, out, manifest = windowed
    unit_doc, leaf, heldout = reference_units(out)
    docs = [d for i, d in enumerate(iter_documents(src, report=None)) if i not in heldout]
    probes = [Probe(docs[i].text[:40], "x", bucket=str(i % 2), documents=(i, i + 1)) for i in range(0, 20, 2)]
    probes += [Probe(f"{t} words", "x", bucket="t", entity=t) for t in ("sea", "space", "food", "music")]
    leaves = TrainingLeaves(out, manifest)
    targets = leaves.of_probes(probes)
    topics = np.array([d.fields["topic"] for d in docs])
    for p, t in zip(probes, targets, strict=True):
        units = np.isin(unit_doc, p.documents) if p.documents else topics[unit_doc] == p.entity
        assert t == dict(zip(*np.unique(leaf[units], return_counts=True), strict=True))
    tree = Tree.load(out / "tree.npz")
    paths = route(tree, get_embedder(cfg).embed([p.key for p in probes]))
    res = routing_agreement(paths, targets, [p.bucket for p in probes], k=cfg.tree.k)
    want = [paths[i, -1] == numpy_majority(t, cfg.tree.k, cfg.tree.depth)[-1] for i, t in enumerate(targets)]
    assert res["n"] == len(probes) and res["leaf"] == pytest.approx(np.mean(want))
    with pytest.raises(ProbeFileError, match="probe 1 .*training document 9999 does not exist"):
        leaves.of_probes([Probe("a", "b", documents=(9999,))], "p.jsonl")
    old = {k: v for k, v in manifest.items() if k != "entities"}  # a version-1 manifest: no entity leaves
    old["tree"] = {k: v for k, v in manifest["tree"].items() if k != "embed_window"}
    assert TrainingLeaves(out, old, embed_window=WINDOW).of_probes(probes[:1]) == targets[:1]
    assert TrainingLeaves(out, old).of_entity("sea") is None


def test_probe_files_carry_documents_and_entity(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "a", "answer": "b", "documents": [3, 1]}\n{"prompt": "c", "answer": "d", '
                    '"entity": "Iron"}\n')
    a, b = load_probes(path)
    assert (a.documents, a.entity, b.documents, b.entity) == ((3, 1), None, None, "Iron")
    path.write_text('{"prompt": "a", "answer": "b", "documents": [-1]}\n')
    with pytest.raises(ProbeFileError, match="p.jsonl:1: field 'documents'"):
        load_probes(path)


# -- the confidence gate -----------------------------------------------------------------------

def test_path_scores_are_distances_to_own_node_and_nearest_sibling():
    rng = np.random.default_rng(0)
    tree = Tree(k=3, depth=2, dim=5, embedder="test",
                centroids=[rng.standard_normal((3, 5)), rng.standard_normal((9, 5))])
    x = rng.standard_normal((7, 5))
    paths = route(tree, x)
    dist, margin = path_scores(tree, x, paths)
    u = x / np.linalg.norm(x, axis=1, keepdims=True)
    for i in range(7):
        for lv in range(2):
            node = paths[i, lv]
            sib = [node // 3 * 3 + j for j in range(3) if node // 3 * 3 + j != node]
            d = np.linalg.norm(tree.centroids[lv][[node, *sib]] - u[i], axis=1)
            assert dist[i, lv] == pytest.approx(d[0], abs=1e-5)
            assert margin[i, lv] == pytest.approx(d[1:].min() - d[0], abs=1e-5) and margin[i, lv] >= -1e-6


def test_gate_keeps_a_query_near_its_centroid_and_sends_a_far_one_to_the_generic_memory():
    e = np.eye(4, dtype=np.float32)
    # level 1: two nodes at e0 and e1; level 2: the children of node 0 at e0 and (e0 + e2) / |.|, of node 1 at e1, e3
    tree = Tree(k=2, depth=2, dim=4, embedder="test",
                centroids=[e[[0, 1]], np.stack([e[0], (e[0] + e[2]) / np.sqrt(2), e[1], e[3]])])
    near = e[0] + 0.05 * e[3]  # close to node 0 and to its child 0, far from every other node
    far = e[2] + 0.9 * e[0]  # nearest node 0, but at distance 0.81; clearly nearer child 1 than child 0
    torn = np.cos(0.40) * e[0] + np.sin(0.40) * e[2]  # 23 degrees from e0: nearly halfway between the children
    x = np.stack([near, far, torn])
    paths = route(tree, x)
    assert paths.tolist() == [[0, 0], [0, 1], [0, 1]]
    dist, margin = path_scores(tree, x, paths)
    assert gated(dist, margin, "distance", 0.5, level=1).tolist() == [False, True, False]
    assert gated(dist, margin, "margin", 0.2, level=2).tolist() == [False, False, True]
    assert gated(dist, margin, "off", 0.0, level=1).tolist() == [False, False, False]
    with pytest.raises(ValueError, match="gate mode 'far'"):
        gated(dist, margin, "far", 0.5, level=1)
