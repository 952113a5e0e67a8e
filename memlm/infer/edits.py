"""Edit routing: a text fetches a learned block where ``memlm learn`` taught that block about it.

``memlm learn`` puts new documents into the leaf blocks their embeddings reach; a question about
them is often worded so that neither the embedding nor the likelihood descent reaches the same leaf
(on bios, a question shares only a name with its documents, and the anchor knows nothing of the new
names). The edit itself says where its knowledge is: a block trained on a new person's documents gives
that person's name a far higher likelihood than the same block did before. So, for each text and
each learned leaf ``L`` (a leaf some learn in effect gave new documents, whose pre-learn rows it kept:
:mod:`memlm.edit.origin`), the *gain* is

    log p(text | path to L, blocks as they are) - log p(text | path to L, learned blocks as they were)

(the retrieval text's tokens after the first, as the likelihood routings score it). The text takes the
path of the leaf with the largest gain when that gain reaches ``eval.route_edit_gain`` nats and the leaf
explains the text better than the memory the run's routing chose for it; otherwise it keeps what the
run's routing chose (greedy, beam, descent, fallback: unchanged). The second test keeps a long text of
the old kind, whose likelihood drifts by many nats under a retrained block, with the block that already
explained it best. Further training moves a learned block's likelihood of texts it was not taught a
little either way; on bios the questions about the 180 kept people gained at most 9.5 nats (99% under
6.7) while every question about a new person gained at least 9.0 (median 30.7): docs/editing.md. A text
no edit claims is routed exactly as before the edit.

Cost: two forwards per candidate leaf per text, one more for a text that passes the gain (all cached per
text); at most ``eval.route_edit_candidates`` learned leaves are scored for a text, the ones whose
centroids are nearest its embedding. A run with no learn in effect, or ``eval.route_edits = False``, is
not wrapped at all.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from memlm.infer.conditions import memory_condition, pad_to
from memlm.infer.scoring import target_logprobs, token_rows
from memlm.memspec import FetchedMemory

__all__ = ["EditRouting", "edit_routing"]


@struct.dataclass
class _Rows:
    """The few bank rows edit routing scores with: ``params[level key][name]`` of some nodes (what
    :func:`memlm.bank.device.gather` reads)."""

    params: dict[str, dict[str, jax.Array]]
    layout: Any = struct.field(pytree_node=False)


class EditRouting:
    """A memory provider: ``fetched`` takes a learned leaf's path where the edit gained the text
    ``eval.route_edit_gain`` nats (module docstring); everything else passes through to ``base``."""

    def __init__(self, base: Any, run: Any, origins: dict[int, dict[int, dict[str, np.ndarray]]]):
        self.base, self.fn, self.params, self.tokenizer = base, run.fn, run.params, run.tokenizer
        memory = run.memory
        self.memory, self.tree = memory, memory.tree
        cfg = run.cfg
        self.gain = float(cfg.eval.route_edit_gain)
        self.max_candidates = int(cfg.eval.route_edit_candidates)
        self.batch, self.max_len = int(cfg.eval.batch_size), int(cfg.model.max_seq_len)
        if memory.bank is None:
            raise ValueError("edit routing reads the bank on device (bank.device_levels keeps levels off device)")
        k, depth = self.tree.k, self.tree.depth
        self.leaves = np.array(sorted(origins.get(depth, {})), np.int64)
        # every node on the candidates' paths, per level: learned rows as they were, the others as they are
        layout = memory.bank.layout
        paths = np.stack([self.leaves // k ** (depth - lv) for lv in range(1, depth + 1)], axis=1)
        params: dict[str, dict[str, jax.Array]] = {}
        local = np.zeros_like(paths)
        for lv in layout.levels:
            nodes, local[:, lv.level - 1] = np.unique(paths[:, lv.level - 1], return_inverse=True)
            current = memory.bank.params[lv.key]
            params[lv.key] = {}
            for a in layout.arrays:
                rows = np.array(jax.device_get(current[a.name][jnp.asarray(nodes, jnp.int32)]))
                for i, node in enumerate(nodes.tolist()):
                    old = origins.get(lv.level, {}).get(node)
                    if old is not None:
                        rows[i] = old[a.name]
                params[lv.key][a.name] = jnp.asarray(rows)
        self._before = _Rows(params=params, layout=layout)
        self.paths_of = paths.astype(np.int32)  # [leaves, depth]: each candidate's path in the bank
        self._local = local.astype(np.int32)  # the same paths in _before's rows
        self._gather = memory._gather  # the run memory's jitted gather: it reads only params and layout
        self._claim: dict[str, int] = {}  # text -> index into self.leaves, or -1: not claimed

    @property
    def available(self) -> tuple[str, ...]:
        return self.base.available

    def _candidates(self, texts: list[str]) -> np.ndarray:
        """int ``[n, C]``: the learned leaves scored for each text (all, or the nearest by centroid)."""
        n, c = len(texts), len(self.leaves)
        if c <= self.max_candidates:
            return np.broadcast_to(np.arange(c), (n, c))
        emb = self.memory.embed(texts)
        cents = np.asarray(self.tree.centroids[-1])[self.leaves]
        d = ((emb[:, None, :] - cents[None]) ** 2).sum(-1)
        return np.argsort(d, axis=1, kind="stable")[:, : self.max_candidates]

    def _route(self, texts: list[str]) -> None:
        rows = pad_to(texts, self.batch)
        ids = [[int(t) for t in self.tokenizer.encode(s)][: self.max_len + 1] for s in rows]
        inputs, targets, weights, lengths = token_rows(ids, [0] * len(rows))
        cand = self._candidates(rows)
        at = np.arange(len(rows))

        def score(memory: FetchedMemory) -> np.ndarray:
            return target_logprobs(self.fn, self.params, inputs, targets, weights, lengths, memory, at)

        after = np.zeros(cand.shape)
        gains = np.zeros(cand.shape)
        for j in range(cand.shape[1]):
            after[:, j] = score(self._gather(self.memory.bank, jnp.asarray(self.paths_of[cand[:, j]])))
            gains[:, j] = after[:, j] - score(self._gather(self._before, jnp.asarray(self._local[cand[:, j]])))
        best = np.argmax(gains, axis=1)
        claimed = gains[at, best] >= self.gain
        if claimed.any():  # and the learned leaf must explain the text better than the routing's own choice
            claimed &= after[at, best] > score(self.base(rows, "fetched"))
        for r, text in enumerate(texts):
            self._claim[text] = int(cand[r, best[r]]) if claimed[r] else -1

    def claimed(self, texts: list[str]) -> np.ndarray:
        """int ``[n]``: per text, the index of the learned leaf it takes (into ``leaves``), -1 for none."""
        missing = [s for s in dict.fromkeys(texts) if s not in self._claim]
        for a in range(0, len(missing), self.batch):
            self._route(missing[a:a + self.batch])
        return np.array([self._claim[s] for s in texts], np.int64)

    def paths(self, texts: list[str], condition: str = "fetched") -> np.ndarray:
        """The routing's paths, with a learned leaf's where an edit claims the text (``fetched`` only)."""
        paths = np.array(self.base.paths(texts, condition), copy=True)
        if memory_condition(condition) == "fetched":
            c = self.claimed(texts)
            paths[c >= 0] = self.paths_of[c[c >= 0]]
        return paths

    def gated(self, texts: list[str], paths: np.ndarray | None = None) -> np.ndarray:
        """The base routing's fallback texts, less those an edit claims."""
        return np.asarray(self.base.gated(texts, paths)) & (self.claimed(texts) < 0)

    def anchor_confidence(self, texts: list[str]) -> np.ndarray:
        return self.base.anchor_confidence(texts)

    def documents(self, texts: list[str]) -> list[list[int]]:
        return self.base.documents(texts)

    def embed(self, texts: list[str]) -> np.ndarray:
        return self.memory.embed(texts)

    def __call__(self, texts: list[str], condition: str) -> FetchedMemory | None:
        memory = self.base(texts, condition)
        if memory_condition(condition) != "fetched":
            return memory
        c = self.claimed(texts)
        if not (c >= 0).any():
            return memory
        learned = self._gather(self.memory.bank, jnp.asarray(self.paths_of[np.maximum(c, 0)]))
        return self.memory._mix(memory, learned, jnp.asarray(c >= 0))  # row i: the learned leaf's where claimed


def edit_routing(base: Any, run: Any) -> Any:
    """``base`` wrapped in :class:`EditRouting` when the run has a learn in effect at its checkpoint
    with kept pre-learn rows and ``eval.route_edits`` is on; else ``base`` itself."""
    if not bool(run.cfg.eval.route_edits) or "fetched" not in run.conditions or run.memory.bank is None:
        return base
    from memlm.edit.origin import load_origins

    origins = load_origins(run.workdir, run.step)
    if not origins.get(run.memory.tree.depth):
        return base
    return EditRouting(base, run, origins)
