"""Packing per leaf cluster: property tests against plain-Python reconstructions."""

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from memlm.data.packing import Piece, group_by_leaf, materialize, plan_leaf, segment_arrays
from memlm.data.records import decode_segments, decode_sequence, encode_sequence

EOT = 0


def unit_tokens(u: int, n: int) -> np.ndarray:
    """Tokens that name their unit and position, never equal to EOT."""
    return (u + 1) * 1000 + np.arange(n, dtype=np.int32)


units_strategy = st.lists(st.tuples(st.integers(0, 90), st.booleans()), min_size=0, max_size=30)


def pack_all(leaf, lengths, ends, seq_len, n_leaves):
    """Pack every leaf; returns (leaf, global unit ids of the pieces, pieces) per sequence."""
    out = []
    for lf, members in group_by_leaf(np.asarray(leaf, np.int64), n_leaves):
        plan = plan_leaf([lengths[m] for m in members], [ends[m] for m in members], seq_len)
        for pieces in plan:
            out.append((lf, [Piece(int(members[p.unit]), p.start, p.stop, p.eot) for p in pieces]))
    return out


@settings(max_examples=150, deadline=None)
@given(units=units_strategy, seq_len=st.integers(1, 40), n_leaves=st.integers(1, 4), data=st.data())
def test_every_token_appears_exactly_once_in_order_and_no_sequence_mixes_leaves(units, seq_len, n_leaves, data):
    lengths = [n for n, _ in units]
    ends = [e for _, e in units]
    leaf = data.draw(st.lists(st.integers(0, n_leaves - 1), min_size=len(units), max_size=len(units)))
    packed = pack_all(leaf, lengths, ends, seq_len, n_leaves)

    seen = {u: [] for u in range(len(units))}  # unit -> list of (start, stop, eot)
    for lf, pieces in packed:
        assert sum(len(p) for p in pieces) <= seq_len
        assert all(leaf[p.unit] == lf for p in pieces), "a sequence mixes leaf clusters"
        toks, seg_lens = materialize(pieces, lambda u: unit_tokens(u, lengths[u]), EOT)
        assert seg_lens.tolist() == [len(p) for p in pieces]
        # the materialised tokens are exactly the pieces' tokens, in order, each followed by EOT when it ends a doc
        expect = []
        for p in pieces:
            expect += list(unit_tokens(p.unit, lengths[p.unit])[p.start:p.stop]) + ([EOT] if p.eot else [])
        assert toks.tolist() == expect
        for p in pieces:
            seen[p.unit].append((p.start, p.stop, p.eot))

    for u, (n, eot) in enumerate(units):
        ranges = sorted(seen[u])
        covered = [t for a, b, _ in ranges for t in range(a, b)]
        assert covered == list(range(n)), f"unit {u}: tokens {covered} instead of 0..{n - 1}"
        assert sum(e for _, _, e in ranges) == int(eot), "EOT must follow a document exactly once"
        if eot:
            assert ranges[-1][2], "the EOT goes after the document's last piece"
        if n + eot == 0:
            assert ranges == [], "an empty window without EOT holds no tokens"
        elif n + eot <= seq_len:
            assert len(ranges) == 1, "a unit that fits in a sequence is never split"
        else:
            assert all(b - a + e == seq_len for a, b, e in ranges[:-1]), "split units fill whole sequences"


@settings(max_examples=150, deadline=None)
@given(units=units_strategy, seq_len=st.integers(1, 40), path=st.lists(st.integers(0, 10_000), min_size=1,
                                                                        max_size=4))
def test_records_roundtrip_segment_ids_positions_and_eot(units, seq_len, path):
    lengths = [n for n, _ in units]
    for pieces in plan_leaf(lengths, [e for _, e in units], seq_len):
        toks, seg_lens = materialize(pieces, lambda u: unit_tokens(u, lengths[u]), EOT)
        rec = encode_sequence(toks, seg_lens, np.array(path), 3, seq_len, token_bytes=4,
                              units=[p.unit for p in pieces], starts=[p.start for p in pieces])
        out = decode_sequence(rec)
        # independent reference: walk the pieces one token at a time
        ref_seg, ref_pos, ref_tok = [0] * seq_len, [0] * seq_len, [0] * seq_len
        t = 0
        for s, p in enumerate(pieces, start=1):
            for i in range(len(p)):
                ref_seg[t], ref_pos[t], ref_tok[t] = s, i, toks[t]
                t += 1
        assert out["segment_ids"].tolist() == ref_seg
        assert out["positions"].tolist() == ref_pos
        assert out["tokens"].tolist() == ref_tok
        assert out["path"].tolist() == path
        assert all(v.dtype == np.int32 for v in out.values())
        # EOT sits exactly at the end of every segment that ends a document, nowhere else
        ends_at = {int(np.cumsum(seg_lens)[i]) - 1 for i, p in enumerate(pieces) if p.eot}
        assert {i for i in range(t) if out["tokens"][i] == EOT} == ends_at
        seg = decode_segments(rec)
        assert seg["units"].tolist() == [p.unit for p in pieces] and seg["leaf"] == 3


def test_best_fit_fills_sequences_without_splitting_short_documents():
    # lengths + EOT: 6, 5, 4, 3, 2 into seq_len 10: best-fit decreasing gives [6, 4], [5, 3, 2]
    plan = plan_leaf([5, 4, 3, 2, 1], [True] * 5, 10)
    assert sorted(sorted(len(p) for p in seq) for seq in plan) == [[2, 3, 5], [4, 6]]


def test_long_document_is_split_into_full_chunks_with_positions_restarting():
    plan = plan_leaf([25], [True], 10)  # 25 tokens + EOT = 26 -> 10, 10, 6
    assert [[(p.start, p.stop, p.eot) for p in seq] for seq in plan] == [[(0, 10, False)], [(10, 20, False)],
                                                                          [(20, 25, True)]]
    seg, pos = segment_arrays(np.array([6]), 10)
    assert pos.tolist() == [0, 1, 2, 3, 4, 5, 0, 0, 0, 0] and seg.tolist() == [1] * 6 + [0] * 4


def test_group_by_leaf_rejects_leaf_ids_outside_the_tree():
    import pytest

    with pytest.raises(ValueError, match="leaf ids"):
        list(group_by_leaf(np.array([0, 5]), 4))
