"""Packing per leaf cluster: documents (or windows) of one cluster into ``seq_len``-token sequences.

The paper groups documents by leaf cluster and packs each group into 2,048-token sequences
separated by EOT, with attention masked to each document (docs/paper.md §4.4). Here:

- Every sequence holds pieces of units from ONE leaf only, so it has exactly one memory path.
- A unit is a document, or a window of one when ``tree.embed_unit == "window"``; an EOT token
  follows the last token of every document (a window that does not end its document gets none).
- A unit that fits in a sequence is never split. Placement is best-fit decreasing, which keeps
  padding low without cutting documents.
- A unit longer than a sequence is cut into full ``seq_len`` chunks, each a sequence of its own,
  and a remainder that is packed like any other unit. Each chunk is its own segment: attention
  does not cross chunks, and **positions restart at 0 in every segment** (a continuation chunk
  starts again at 0), so positions always stay below ``seq_len``.
- Segment ids are 1, 2, ... for the pieces of a sequence in order, 0 for padding.
"""

from __future__ import annotations

import bisect
import dataclasses
from collections.abc import Callable, Iterator, Sequence

import numpy as np


@dataclasses.dataclass(frozen=True)
class Piece:
    """Tokens ``[start, stop)`` of unit ``unit``, followed by an EOT when ``eot`` (it ends the document)."""

    unit: int
    start: int
    stop: int
    eot: bool

    def __len__(self) -> int:
        return self.stop - self.start + int(self.eot)


def plan_leaf(lengths: Sequence[int], ends_document: Sequence[bool], seq_len: int) -> list[list[Piece]]:
    """Plan the sequences of one leaf: for each sequence, its pieces in order.

    ``lengths[i]`` is unit i's token count (without EOT); ``ends_document[i]`` says whether an EOT
    follows it. Deterministic: ties are broken by unit index.
    """
    if seq_len < 1:
        raise ValueError(f"seq_len must be positive, got {seq_len}")
    sequences: list[list[Piece]] = []
    pool: list[Piece] = []
    for u, (n, eot) in enumerate(zip(lengths, ends_document, strict=True)):
        n = int(n)
        start = 0
        while n - start + int(eot) > seq_len:  # a full chunk, its own sequence
            sequences.append([Piece(u, start, start + seq_len, False)])
            start += seq_len
        if n - start + int(eot) > 0:
            pool.append(Piece(u, start, n, bool(eot)))
    # Best-fit decreasing: the longest piece first, into the open sequence with the least room that fits it.
    pool.sort(key=lambda p: (-len(p), p.unit))
    rooms: list[tuple[int, int]] = []  # (room left, sequence index), sorted
    for piece in pool:
        size = len(piece)
        i = bisect.bisect_left(rooms, (size, -1))
        if i < len(rooms):
            room, s = rooms.pop(i)
            sequences[s].append(piece)
            bisect.insort(rooms, (room - size, s))
        else:
            sequences.append([piece])
            bisect.insort(rooms, (seq_len - size, len(sequences) - 1))
    return sequences


def group_by_leaf(leaf: np.ndarray, n_leaves: int) -> Iterator[tuple[int, np.ndarray]]:
    """(leaf, its unit indices in corpus order) for every leaf 0 .. n_leaves-1 (empty ones too)."""
    leaf = np.asarray(leaf, dtype=np.int64)
    if len(leaf) and (leaf.min() < 0 or leaf.max() >= n_leaves):
        raise ValueError(f"leaf ids must lie in [0, {n_leaves}), got [{leaf.min()}, {leaf.max()}]")
    order = np.argsort(leaf, kind="stable")
    bounds = np.searchsorted(leaf[order], np.arange(n_leaves + 1))
    for lf in range(n_leaves):
        yield lf, order[bounds[lf]:bounds[lf + 1]]


def materialize(pieces: Sequence[Piece], unit_tokens: Callable[[int], np.ndarray], eot_id: int
                ) -> tuple[np.ndarray, np.ndarray]:
    """Token ids (without padding) and segment lengths of one planned sequence.

    ``unit_tokens(u)`` returns unit u's token ids (without EOT).
    """
    parts, seg_lens = [], []
    for p in pieces:
        toks = np.asarray(unit_tokens(p.unit)[p.start:p.stop], dtype=np.int32)
        parts.append(toks)
        if p.eot:
            parts.append(np.array([eot_id], dtype=np.int32))
        seg_lens.append(len(p))
    return np.concatenate(parts) if parts else np.zeros(0, np.int32), np.asarray(seg_lens, dtype=np.int32)


def segment_arrays(seg_lens: np.ndarray, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Segment ids (1.. per segment, 0 for padding) and positions (0.. per segment, 0 for padding)."""
    seg_lens = np.asarray(seg_lens, dtype=np.int64)
    n = int(seg_lens.sum())
    if n > seq_len:
        raise ValueError(f"segments hold {n} tokens, more than seq_len = {seq_len}")
    segment_ids = np.zeros(seq_len, np.int32)
    positions = np.zeros(seq_len, np.int32)
    segment_ids[:n] = np.repeat(np.arange(1, len(seg_lens) + 1, dtype=np.int32), seg_lens)
    starts = np.repeat(np.cumsum(seg_lens) - seg_lens, seg_lens)
    positions[:n] = np.arange(n) - starts
    return segment_ids, positions
