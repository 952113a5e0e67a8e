"""Beam routing for ``fetched``: of several candidate paths, keep the one the anchor finds most likely.

Greedy descent commits to one path from the retrieval text's embedding alone, and a query worded
unlike its documents often takes a wrong turn. Two ways to generate the candidates:

- ``eval.route_beam`` = W > 1: ``fetched``
takes the W best paths of a beam over the tree (``retrieval.route_beam``, the greedy path
first), scores the retrieval text itself under each path's fetched memory (the summed
log-probability of its tokens after the first, one forward per candidate), and keeps the most
likely path per text; ``eval.route_beam_generic`` adds the generic memory as one more candidate,
so a text no block explains gets the generic memory. Ties keep the earlier candidate (the
greedy path first). Only the retrieval text is scored, never a probe's answer; a held-out
document's perplexity, though, is then measured under the memory chosen by that document's own
likelihood, an optimistic figure.
- ``eval.route_descent = "likelihood"``: the descent itself is by likelihood. At level l the
  candidates are the k children of the level-(l-1) node chosen so far, each completed below by
  greedy centroid descent (so every candidate is a whole path to fetch); the likeliest child is
  kept (the embedding's own choice first, so it wins ties, e.g. at a level without memory). A
  text costs about depth x W x k forwards, whatever the tree's size, and the embedding only decides
  inside the chosen subtree below the level being scored. ``route_descent_width`` = W keeps the
  W likeliest partial paths per level instead of one (W x k candidates a level); the likeliest
  final path wins. ``route_beam_generic`` then compares it with the generic memory.

``eval.route_posterior`` = q > 0 (either way of generating candidates) turns the scores into a
posterior over the candidates and the fallback (a softmax of the summed log-likelihoods, a
uniform prior), and keeps the likeliest path only when its posterior reaches q; otherwise the
text gets the fallback (``eval.route_fallback``). One candidate standing out keeps its block; several explaining the
text about equally (a text the anchor already knows, or none that any block explains) fall back.
q = 1/2 asks for a path more likely than all the alternatives together.

``eval.route_anchor_confidence`` = c > 0, the anchor gate (with any way of routing, greedy included),
asks the anchor first: it answers the text greedily with no memory (up to ``eval.max_new_tokens`` tokens), and the
probability it gives its own answer (the product of its tokens' probabilities; the answer is the
continuation cut before the first line break or sentence end, :func:`answer_tokens`; an empty answer
counts 0) is its confidence. A text whose confidence reaches c gets the fallback whatever the routing chose:
what the anchor already knows is not put at risk by a block that may be someone else's, and fetched
memory serves the texts the anchor is unsure of. Costs one greedy answer and one scoring forward per
text; a text the gate sends to the fallback is not routed further (no candidate is scored for it, and
its reported path is the greedy one). c = 1/2 asks for an answer more likely than all others together.

``eval.route_fallback = "none"`` makes the fallback (the extra candidate, the posterior's, the anchor
gate's and the confidence gate's) all-zero blocks instead of the generic memory: memory of this form adds
``act(u W1) W2`` (or a low-rank product) to the anchor, so a zero block adds nothing and the text
is answered by the anchor alone, as under the ``none`` condition.

:class:`BeamRouting` wraps a run's :class:`~memlm.infer.run.RunMemory` as a memory provider;
every other condition passes through to it unchanged. Choices are cached per text.
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import numpy as np

from memlm.infer.conditions import memory_condition, pad_to
from memlm.infer.generate import generate
from memlm.infer.scoring import target_logprobs, token_rows
from memlm.memspec import FetchedMemory

__all__ = ["BeamRouting", "uses_beam"]


def uses_beam(cfg) -> bool:
    """Whether ``cfg.eval`` asks ``fetched`` to choose among candidates."""
    e = cfg.eval
    return (int(e.route_beam) > 1 or bool(e.route_beam_generic) or e.route_descent == "likelihood"
            or e.route_posterior > 0 or e.route_anchor_confidence > 0
            or (e.route_fallback == "none" and e.route_gate != "off"))


ANSWER_ENDS = "\n.?!;"  # a line break or a sentence's end closes an answer


def answer_tokens(tokenizer: Any, tokens: list[int]) -> list[int]:
    """The answer in a greedy continuation: ``tokens`` cut before the first token whose decoded text
    holds a line break or sentence-ending punctuation (:data:`ANSWER_ENDS`). A continuation goes on
    past its answer (" 1771. Q: What place does"), and those tokens say nothing of the answer."""
    for i in range(len(tokens)):
        if any(c in ANSWER_ENDS for c in tokenizer.decode(tokens[: i + 1])):
            return tokens[:i]
    return list(tokens)


class BeamRouting:
    """A memory provider: ``fetched`` by likelihood among beam candidates; other conditions as ``memory``."""

    def __init__(self, fn: Any, params: Any, tokenizer: Any, memory: Any, cfg):
        self.fn, self.params, self.tokenizer, self.memory = fn, params, tokenizer, memory
        self.width = int(cfg.eval.route_beam)
        self.descent = str(cfg.eval.route_descent)
        self.descent_width = int(cfg.eval.route_descent_width)
        self.posterior = float(cfg.eval.route_posterior)
        self.with_generic = bool(cfg.eval.route_beam_generic) or self.posterior > 0
        self.fallback = str(cfg.eval.route_fallback)
        self._fallback_memory: FetchedMemory | None = None  # built once (a gather, or zeros of its shapes)
        self.batch = int(cfg.eval.batch_size)
        self.max_len = int(cfg.model.max_seq_len)
        self.gate = cfg.eval.route_gate
        self.confidence = float(cfg.eval.route_anchor_confidence)
        self.max_new_tokens = int(cfg.eval.max_new_tokens)
        # text -> (path, fell back?, candidate scores, the anchor's confidence in its own answer)
        self._choice: dict[str, tuple[np.ndarray, bool, np.ndarray, float]] = {}

    @property
    def available(self) -> tuple[str, ...]:
        return self.memory.available

    def _fetch(self, paths: np.ndarray) -> FetchedMemory:
        m = self.memory
        return m.tiers.gather(paths) if m.tiers is not None else m._gather(m.bank, jnp.asarray(paths))

    def _fallback(self) -> FetchedMemory:
        """The one-row memory a text falls back to: the generic memory, or (``eval.route_fallback =
        "none"``) all-zero blocks, through which the memory adds nothing: the anchor alone."""
        if self._fallback_memory is None:
            if self.fallback == "none":
                one = self._fetch(np.zeros((1, self.memory.tree.depth), np.int32))
                self._fallback_memory = {n: jnp.zeros_like(a) for n, a in one.items()}
            else:
                self._fallback_memory = self.memory._gather(self.memory.generic, jnp.zeros((1, 1), jnp.int32))
        return self._fallback_memory

    def _rows(self, ids: list[list[int]], first: list[int]) -> tuple[np.ndarray, ...]:
        return token_rows(ids, first)

    def _anchor_confidence(self, rows: list[str]) -> np.ndarray:
        """float64 ``[len(rows)]``: the anchor's probability of its own greedy answer to each text, with
        no memory (module docstring); 0 where the answer is empty."""
        prompts = [[int(t) for t in self.tokenizer.encode(s)][: self.max_len] for s in rows]
        answers = [answer_tokens(self.tokenizer, g) for g in
                   generate(self.fn, self.params, prompts, None, self.max_new_tokens, self.tokenizer.eot_id)]
        ids = [(p + a)[: self.max_len + 1] for p, a in zip(prompts, answers, strict=True)]
        inputs, targets, weights, lengths = self._rows(ids, [len(p) - 1 for p in prompts])
        logp = target_logprobs(self.fn, self.params, inputs, targets, weights, lengths, None,
                               np.zeros(len(rows), np.int32))
        return np.where([len(a) > 0 for a in answers], np.exp(logp), 0.0)

    def _score(self, texts: list[str], confidence: dict[str, float]) -> None:
        """Route the texts the anchor gate left (``confidence``: each one's, 0 with the gate off)."""
        rows = pad_to(texts, self.batch)
        ids = [[int(t) for t in self.tokenizer.encode(s)][: self.max_len + 1] for s in rows]
        b = len(rows)
        inputs, targets, weights, lengths = self._rows(ids, [0] * b)

        def score(memory: FetchedMemory, index: np.ndarray) -> np.ndarray:
            return target_logprobs(self.fn, self.params, inputs, targets, weights, lengths, memory, index)

        emb = self.memory._embed(rows)
        if self.descent == "likelihood":
            cand, scores = self._descend(emb, lambda paths: score(self._fetch(paths), np.arange(b)))
        else:
            from memlm.retrieval import route_beam

            cand = route_beam(self.memory.tree, emb, self.width)  # [b, W, depth]
            scores = ([score(self._fetch(cand[:, w]), np.arange(b)) for w in range(self.width)]
                      if self.width > 1 or self.with_generic else [np.zeros(b)])  # one candidate: no choice
        if self.with_generic:
            scores.append(score(self._fallback(), np.zeros(b, np.int32)))
        scores = np.stack(scores, axis=1)  # [b, W (+1)]
        best = np.argmax(scores, axis=1)  # the first maximum: the greedy path wins ties
        width = cand.shape[1]
        z = scores - scores.max(axis=1, keepdims=True)
        posterior = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)  # over the candidates and the fallback
        for r, text in enumerate(texts):
            generic = self.with_generic and (best[r] == width or posterior[r, best[r]] < self.posterior)
            path = cand[r, 0] if generic else cand[r, best[r]]
            self._choice[text] = (path, bool(generic), scores[r], confidence[text])

    def _descend(self, emb: np.ndarray, score) -> tuple[np.ndarray, list[np.ndarray]]:
        """Likelihood descent (module docstring) keeping ``route_descent_width`` = W partial paths per
        level: every last-level candidate ``[b, W*k, depth]``, likeliest first, and their scores."""
        from memlm.retrieval.routing import descend_levels

        tree, k = self.memory.tree, self.memory.tree.k
        b, rows = len(emb), np.arange(len(emb))[:, None]
        kept = np.zeros((b, 1, 0), np.int32)  # [b, w, level]: the partial paths kept so far
        for level in range(1, tree.depth + 1):
            cands, scores = [], []
            for w in range(kept.shape[1]):
                parent = kept[:, w, -1] if level > 1 else np.zeros(b, np.int32)
                own = descend_levels(tree.centroids[level - 1:level], k, emb, first_parent=parent)[:, 0]
                for j in range(k):  # the embedding's own child first, so it wins ties
                    child = parent * k + (own - parent * k + j) % k
                    below = (descend_levels(tree.centroids[level:], k, emb, first_parent=child)
                             if level < tree.depth else np.zeros((b, 0), np.int32))
                    cands.append(np.concatenate([kept[:, w], child[:, None], below], axis=1).astype(np.int32))
                    scores.append(score(cands[-1]))
            order = np.argsort(-np.stack(scores, axis=1), axis=1, kind="stable")
            paths, ranked = np.stack(cands, axis=1)[rows, order], np.stack(scores, axis=1)[rows, order]
            kept = paths[:, : self.descent_width, :level]
        return paths, list(ranked.T)

    def _choose(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """Route the texts not routed yet: the anchor gate first, so the texts it sends to the
        fallback are never scored under candidates (their path is the greedy one)."""
        missing = [s for s in dict.fromkeys(texts) if s not in self._choice]
        confidence = dict.fromkeys(missing, 0.0)
        if self.confidence > 0:
            for a in range(0, len(missing), self.batch):
                part = missing[a:a + self.batch]
                probs = self._anchor_confidence(pad_to(part, self.batch))[: len(part)]
                confidence.update(zip(part, probs.tolist(), strict=True))
            sure = [s for s in missing if confidence[s] >= self.confidence]
            if sure:
                for s, path in zip(sure, self.memory.paths(sure), strict=True):
                    self._choice[s] = (path, True, np.zeros(0), confidence[s])
                missing = [s for s in missing if s not in self._choice]
        for a in range(0, len(missing), self.batch):
            self._score(missing[a:a + self.batch], confidence)
        chosen = [self._choice[s] for s in texts]
        return np.stack([c[0] for c in chosen]), np.array([c[1] for c in chosen], bool)

    def anchor_confidence(self, texts: list[str]) -> np.ndarray:
        """float64 ``[n]``: the anchor's confidence in its own answer to each text (0 while
        ``eval.route_anchor_confidence`` is off, when it is not computed)."""
        self._choose(texts)
        return np.array([self._choice[s][3] for s in texts], np.float64)

    def documents(self, texts: list[str]) -> list[list[int]]:
        """The rag conditions' documents (the run memory's)."""
        return self.memory.documents(texts)

    def paths(self, texts: list[str], condition: str = "fetched") -> np.ndarray:
        """The chosen path under ``fetched`` (the greedy path where the generic memory was chosen)."""
        condition = memory_condition(condition)
        if condition != "fetched":
            return self.memory.paths(texts, condition)
        return self._choose(texts)[0]

    def gated(self, texts: list[str], paths: np.ndarray | None = None) -> np.ndarray:
        """bool ``[n]``: the texts that get the generic memory (chosen by likelihood, or by ``eval.route_gate``)."""
        chosen, generic = self._choose(texts)
        if self.gate != "off":
            generic = generic | self.memory.gated(texts, chosen if paths is None else paths)
        return generic

    def __call__(self, texts: list[str], condition: str) -> FetchedMemory | None:
        if memory_condition(condition) != "fetched":
            return self.memory(texts, condition)
        paths = self.paths(texts)
        memory = self._fetch(paths)
        use_generic = self.gated(texts, paths)
        if use_generic.any():
            memory = self.memory._mix(memory, self._fallback(), jnp.asarray(use_generic))
        return memory


def provider_of(run):
    """The memory provider a loaded run (``memlm.infer.run.Run``) is scored and served with: the run's
    memory, or beam routing over it (``eval.route_beam*``, ``route_descent``, ``route_posterior``, ...), and
    edit routing over either where ``memlm learn`` taught the run (:mod:`memlm.infer.edits`)."""
    from memlm.infer.edits import edit_routing

    if "fetched" not in run.conditions:
        return run.memory
    if not uses_beam(run.cfg):
        return edit_routing(run.memory, run)
    return edit_routing(BeamRouting(run.fn, run.params, run.tokenizer, run.memory, run.cfg), run)
