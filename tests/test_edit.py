"""``memlm learn`` / ``memlm forget`` / lineage on a small trained run.

Checked against the run's files read directly (``tests/state.py``, prepare's unit files with numpy):
only the edited leaves' blocks change, the anchor, the shallower levels and every other block are
bit-identical;
re-packing a leaf with nothing left out gives prepare's own sequences; a forgotten document's units
are in no retraining sequence; bad input leaves the run as it was.
"""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from tests.state import run_state

NEW = ["Zorblat Quenn was born in the town of Frellow in 1788.",
       "Zorblat Quenn painted harbour scenes and was born in Frellow.",
       "The painter Zorblat Quenn came into the world in Frellow.",
       "Records give 1788 as the year of birth of Zorblat Quenn."] * 3


@pytest.fixture(scope="module")
def trained(facts_data, tmp_path_factory):
    from helpers import train_small_run

    return train_small_run(facts_data, tmp_path_factory.mktemp("edit_run") / "run")


@pytest.fixture
def run(trained, tmp_path):
    dst = tmp_path / "run"
    shutil.copytree(trained, dst)
    return dst


def _nodes_changed(before: dict, after: dict, level: int) -> set[int]:
    """Nodes of ``level`` whose parameters, moments or counter differ."""
    changed = set()
    for name, a in before.items():
        if name.startswith(f"bank/level{level}/") and not name.endswith("written"):
            b = after[name]
            diff = (a != b).reshape(len(a), -1).any(axis=1)
            changed |= set(np.nonzero(diff)[0].tolist())
    return changed


def test_repacking_every_leaf_with_nothing_left_out_gives_prepares_sequences(run, tmp_path, facts_data):
    from memlm.data.loader import Loader
    from memlm.edit.documents import RunDocuments
    from memlm.edit.repack import build

    docs = RunDocuments(run)
    n_leaves = len(docs.manifest["leaf_histogram"]["sequences"])
    man = build(tmp_path / "all", docs, repack=np.ones(n_leaves, bool), exclude=np.zeros(0, np.int64))
    assert man["leaf_histogram"]["sequences"] == docs.manifest["leaf_histogram"]["sequences"]
    ours = Loader(tmp_path / "all", batch_size=1, seed=0, generic_prob=0.0)._source
    theirs = Loader(facts_data, batch_size=1, seed=0, generic_prob=0.0)._source
    assert len(ours) == len(theirs)
    assert all(ours[i] == theirs[i] for i in range(len(ours)))


def test_learn_trains_only_the_new_documents_paths_and_traces_them(run, tmp_path, capsys):
    from memlm.cli import main
    from memlm.edit.documents import RunDocuments, read_log

    corpus = tmp_path / "new.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in NEW))
    before = run_state(run)
    total = RunDocuments(run).total
    assert main(["learn", str(run), "--corpus", str(corpus), "--steps", "3", "--replay", "0.5"]) == 0
    assert "memlm learn: edit 1" in capsys.readouterr().out
    after = run_state(run)
    (entry,) = read_log(run)
    assert entry["documents"] == len(NEW) and entry["first_document"] == total
    assert after["checkpoint/step"] == before["checkpoint/step"] + 3
    for name in before:  # the anchor (and its optimizer) is frozen; the generic memory is never drawn
        if name.startswith(("anchor/params", "generic/level")):
            np.testing.assert_array_equal(before[name], after[name], err_msg=name)
    # only the leaf level learns (train.memory_levels): the shared level-1 blocks are read, not updated
    assert entry["levels"] == [2] and not _nodes_changed(before, after, 1)
    changed = _nodes_changed(before, after, 2)
    assert changed and changed <= set(entry["leaves"]), (changed, entry["leaves"])
    # lineage: the new documents are numbered after the run's and trace finds them in their leaf
    docs = RunDocuments(run)
    assert docs.total == total + len(NEW)
    assert docs.text(total).strip() == NEW[0]
    assert docs.origin(total).endswith("new.jsonl:1")
    assert main(["info", str(run), "--block", f"2:{entry['leaves'][0]}", "--limit", "100"]) == 0
    out = capsys.readouterr().out
    assert f"[{total}" in out or f"{total} " in out, out
    assert "new.jsonl" in out


def test_forget_resets_the_leaves_of_a_documents_and_retrains_them_on_the_rest(run, tmp_path, capsys):
    from memlm.cli import main
    from memlm.data.records import decode_segments
    from memlm.edit.documents import RunDocuments, read_log
    from memlm.edit.forget import leaves_of
    from memlm.edit.repack import build

    docs = RunDocuments(run)
    gone = docs.mentioning("Lima")
    assert len(gone) > 0
    n_leaves = 64
    hit = leaves_of(docs, gone, n_leaves)
    # the retraining data holds no unit of a forgotten document, and every other unit of those leaves
    man = build(tmp_path / "retrain", docs, repack=hit, exclude=gone)
    from memlm.data.loader import Loader

    src = Loader(tmp_path / "retrain", batch_size=1, seed=0, generic_prob=0.0)._source
    seen = set()
    for i in range(len(src)):
        seg = decode_segments(src[i])
        assert hit[seg["leaf"]]
        seen |= set(seg["units"].tolist())
    unit_doc = np.concatenate([u.documents() for u in docs.units()])
    unit_leaf = np.concatenate([u.paths()[:, -1] for u in docs.units()])
    want = set(np.nonzero(hit[unit_leaf] & ~np.isin(unit_doc, gone))[0].tolist())
    assert seen == want and man["sequences"] == len(src)

    before = run_state(run)
    assert main(["forget", str(run), "--entity", "Lima", "--steps", "2"]) == 0
    after = run_state(run)
    (entry,) = read_log(run)
    assert entry["documents"] == gone.tolist() and entry["reset"] == {"2": np.nonzero(hit)[0].tolist()}
    changed = _nodes_changed(before, after, 2)
    assert changed == set(np.nonzero(hit)[0].tolist()) and not _nodes_changed(before, after, 1)
    for lf in changed:  # reset, then trained from its initial block: its counter is the retraining's own
        assert after["bank/level2/count"][lf] <= 2
    assert RunDocuments(run).live(gone).size == 0
    # training the run on its data again would learn them back: refused before anything is written
    from memlm.config import ConfigError
    from memlm.run.directory import RunDir
    from memlm.train.loop import train

    cfg, record = RunDir(run).load_config()
    cfg.train.steps = int(after["checkpoint/step"]) + 2
    with pytest.raises(ConfigError, match="forgotten documents"):
        train(cfg, record["data_dir"], run, quiet=True, allow_config_change=True)
    assert RunDir(run).record() == record
    # forgetting them again: nothing to forget, one line, the run unchanged
    assert main(["forget", str(run), "--entity", "Lima"]) == 2
    assert "nothing to forget" in capsys.readouterr().err
    assert len(read_log(run)) == 1


@pytest.mark.parametrize("argv, message", [
    (["learn", "RUN_MISSING", "--corpus", "CORPUS"], "not a memlm run directory"),
    (["learn", "RUN", "--corpus", "nowhere.jsonl"], "no such file"),
    (["learn", "RUN", "--corpus", "OTHER_TOKENIZER"], "another tokenizer"),
    (["forget", "RUN", "--documents", "999999"], "out of range"),
    (["forget", "RUN", "--documents", "1", "--entity", "Lima"], "one of --documents, --entity or --corpus"),
    (["forget", "RUN", "--entity", "Nobody Anywhere"], "nothing to forget"),
    (["info", "RUN", "--block", "3:0"], "level must be in 1..2"),
])
def test_bad_input_fails_in_one_line_and_leaves_the_run_unchanged(run, tmp_path, capsys, argv, message):
    from memlm.cli import main

    corpus = tmp_path / "new.jsonl"
    corpus.write_text(json.dumps({"text": NEW[0]}) + "\n")
    other = tmp_path / "other"
    (other).mkdir()
    (other / "manifest.json").write_text(json.dumps({"tokenizer": {"id": "another"}, "tree": {"id": "x"}}))
    subst = {"RUN": str(run), "RUN_MISSING": str(tmp_path / "missing"), "CORPUS": str(corpus),
             "OTHER_TOKENIZER": str(other)}
    before = sorted(str(p.relative_to(run)) for p in Path(run).rglob("*") if "rag" not in p.parts)
    assert main([subst.get(a, a) for a in argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    after = sorted(str(p.relative_to(run)) for p in Path(run).rglob("*") if "rag" not in p.parts)
    assert before == after


def test_edit_routing_sends_a_text_to_the_learned_leaf_whose_edit_gained_it_and_leaves_the_rest(run, tmp_path):
    """Against the pre-learn run scored independently: a text takes the learned leaf with the largest
    gain (log-likelihood after the learn minus before, under that leaf's path) where it reaches
    ``eval.route_edit_gain``, every other text keeps its greedy path; the kept pre-learn rows are the
    pre-learn bank's; forget drops the rows of the leaves it retrains."""
    from memlm.cli import main
    from memlm.edit.documents import RunDocuments, read_log
    from memlm.edit.origin import load_origins
    from memlm.infer.beam import provider_of
    from memlm.infer.edits import EditRouting
    from memlm.infer.run import load_run
    from memlm.infer.scoring import target_logprobs, token_rows

    pre = tmp_path / "pre"
    shutil.copytree(run, pre)
    corpus = tmp_path / "new.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in NEW))
    assert main(["learn", str(run), "--corpus", str(corpus), "--steps", "6"]) == 0
    (entry,) = read_log(run)
    leaves = sorted(entry["leaves"])
    state_pre = run_state(pre)
    origins = load_origins(run)
    assert sorted(origins[2]) == leaves and 1 not in origins  # only the leaf level learned
    for lf in leaves:
        for name, rows in origins[2][lf].items():
            np.testing.assert_array_equal(rows, state_pre[f"bank/level2/{name}/params"][lf], err_msg=name)

    after, before = load_run(run), load_run(pre)
    k = after.memory.tree.k
    # new texts, and training documents whose greedy leaf the learn did not touch (their own leaf explains them)
    docs = RunDocuments(pre)
    old = [t for t in (docs.text(i) for i in range(0, docs.total, 61)) if after.memory.paths([t])[0, -1] not in leaves]
    texts = [NEW[0], NEW[1], "Q: Where was Zorblat Quenn born? A:", "The capital of France is Paris.", *old[:6]]
    ids = [[int(t) for t in after.tokenizer.encode(s)] for s in texts]
    inputs, targets, weights, lengths = token_rows(ids, [0] * len(texts))

    def score(r, leaf):
        paths = np.array([[leaf // k, leaf]] * len(texts), np.int32)
        memory = r.memory._gather(r.memory.bank, paths)
        return target_logprobs(r.fn, r.params, inputs, targets, weights, lengths, memory, np.arange(len(texts)))

    gains = np.stack([score(after, lf) - score(before, lf) for lf in leaves], axis=1)  # [texts, leaves]
    best = gains.max(axis=1)
    top = [leaves[int(j)] for j in np.argmax(gains, axis=1)]
    greedy = after.memory.paths(texts)
    own = target_logprobs(after.fn, after.params, inputs, targets, weights, lengths,
                          after.memory._gather(after.memory.bank, greedy), np.arange(len(texts)))
    under_top = np.array([score(after, lf)[i] for i, lf in enumerate(top)])
    better = under_top > own  # the learned leaf explains the text better than its greedy path
    assert best[0] > 0 and better[0], (gains, better)
    cut = float(best[0]) / 2  # the new document's gain passes it
    routed = load_run(run, overrides={"eval.route_edit_gain": str(cut)})
    provider = provider_of(routed)
    assert isinstance(provider, EditRouting)
    claim = (best >= cut) & better
    want = greedy.copy()
    for i in np.nonzero(claim)[0]:
        want[i] = [top[i] // k, top[i]]
    assert 0 < claim.sum() < len(texts)
    # a text that passes the gain but that its greedy path explains better stays there (the second test)
    top_leaf_elsewhere = np.array([t != g for t, g in zip(top, greedy[:, -1], strict=True)])
    assert ((best >= cut) & ~better & top_leaf_elsewhere).any(), (best, better, cut)
    np.testing.assert_array_equal(provider.paths(texts), want)
    got = provider(texts, "fetched")
    expect = routed.memory._gather(routed.memory.bank, want)
    for name in expect:
        np.testing.assert_array_equal(np.asarray(got[name]), np.asarray(expect[name]), err_msg=name)
    # off: the run's routing untouched
    assert provider_of(load_run(run, overrides={"eval.route_edits": "false"})) is not provider
    assert not isinstance(provider_of(load_run(run, overrides={"eval.route_edits": "false"})), EditRouting)

    # forget retrains a learned leaf: its kept rows (which held the forgotten documents) go; the leaf is
    # retrained on its original documents, those rows kept as its new pre-learn rows, then taught again
    assert main(["forget", str(run), "--documents", str(entry["first_document"]), "--steps", "1"]) == 0
    last = read_log(run)[-1]
    relearned = set(last["leaves_retrained"]) & set(leaves)
    assert relearned and last["relearned"]["leaves"] == sorted(relearned)
    with np.load(run / "edits" / entry["origin"]) as z:
        assert set(z["level2/nodes"].tolist()) == set(leaves) - relearned
    now = load_origins(run)
    assert set(now[2]) == set(leaves)
    for lf in relearned:
        assert any((now[2][lf][n] != origins[2][lf][n]).any() for n in now[2][lf])


def test_kept_rows_round_trip_in_their_dtype_and_forget_drops_them(tmp_path):
    """bfloat16 rows come back bit for bit (an .npz file cannot hold bfloat16 itself); the earliest
    edit in effect at a step gives a node's rows; dropped nodes leave every file."""
    import jax.numpy as jnp

    from memlm.edit.documents import append_log
    from memlm.edit.origin import drop_nodes, load_origins, save_origin

    class Bank:
        def __init__(self, scale):
            self.params = {"level2": {"w1": (jnp.arange(24, dtype=jnp.float32).reshape(6, 4) * scale)
                                      .astype(jnp.bfloat16),
                                      "w2": jnp.ones((6, 2, 3), jnp.float32) * scale}}

    for edit, (scale, nodes, step) in enumerate([(1.5, [1, 4], 10), (-3.0, [4, 5], 20)], start=1):
        save_origin(tmp_path / "edits" / f"{edit:04d}-learn" / "origin.npz", Bank(scale), {2: np.array(nodes)})
        append_log(tmp_path, {"edit": edit, "verb": "learn", "step": step, "origin": f"{edit:04d}-learn/origin.npz"})
    got = load_origins(tmp_path)
    assert sorted(got[2]) == [1, 4, 5]
    assert got[2][4]["w1"].dtype == jnp.bfloat16
    np.testing.assert_array_equal(got[2][4]["w1"], np.asarray(Bank(1.5).params["level2"]["w1"][4]))  # the earliest
    np.testing.assert_array_equal(got[2][5]["w2"], np.full((2, 3), -3.0, np.float32))
    assert sorted(load_origins(tmp_path, step=10)[2]) == [1, 4]  # the second edit is not in effect at step 10
    assert drop_nodes(tmp_path, {2: np.array([4])}) == 2
    assert sorted(load_origins(tmp_path)[2]) == [1, 5]


def test_training_a_taught_run_further_says_what_its_data_lacks(tmp_path):
    from memlm.edit.documents import append_log
    from memlm.train.loop import _note_learned

    said: list[str] = []
    _note_learned(tmp_path, said.append)
    assert said == []  # never taught: nothing to say
    append_log(tmp_path, {"edit": 1, "verb": "learn", "step": 5})
    append_log(tmp_path, {"edit": 2, "verb": "forget", "step": 7})
    _note_learned(tmp_path, said.append)
    assert len(said) == 1 and "taught by memlm learn (edit 1)" in said[0] and "none of the learned" in said[0]
