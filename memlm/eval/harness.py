"""A memlm run as an lm-evaluation-harness model, under one memory condition and routing setting.

``MemlmLM(workdir=RUN, condition="fetched")`` serves lm-eval's three request types from the run's
anchor and memory. The retrieval key, the text routed to fetch memory, follows docs/paper.md
App. B: a log-likelihood (multiple-choice) request's context (a schema task's shared continuation,
:func:`schema_keys`), a rolling log-likelihood
(perplexity) request's document, a generation request's prompt. Routing settings are the run's
``eval.*`` config, overridden like ``load_run``'s ``overrides`` (``{"eval.route_beam": "4"}``).

Text is read as the model's tokenizer reads it: a context carries the tokenizer's template (e.g.
BOS), a continuation is the plain tokens that follow the context's (the pair is encoded joined and
split where the context's plain tokens end, so the seam tokenizes as the joined text does).
Requests are batched by the memory their keys fetch (``harness_score.py``). Needs ``lm-eval``
(``pip install 'memlm[eval]'``).
"""

from __future__ import annotations

import os
from typing import Any

from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from memlm.eval.harness_score import generate_rows, score_rows
from memlm.infer.beam import provider_of
from memlm.infer.conditions import documents_for
from memlm.infer.rag import splice
from memlm.infer.run import Run, load_run

__all__ = ["MemlmLM", "schema_keys"]


@register_model("memlm")
class MemlmLM(TemplateLM):
    """lm-eval's ``LM`` over a memlm run: ``condition`` is none, generic, fetched, blocked, rag or rag+fetched."""

    def __init__(self, workdir: str | os.PathLike | None = None, condition: str = "fetched",
                 data_dir: str | os.PathLike | None = None, overrides: dict[str, str] | None = None,
                 batch_size: int | str | None = None, run: Run | None = None, **_: Any):
        super().__init__()
        if run is None:
            if workdir is None:
                raise ValueError("MemlmLM needs a run directory (workdir=...) or a loaded run (run=...)")
            run = load_run(workdir, data_dir, overrides)
        if condition not in run.conditions:
            raise ValueError(f"condition {condition!r} is not available for {str(run.workdir)!r} "
                             f"(available: {', '.join(run.conditions)})")
        self.run, self.condition = run, condition
        self.provider = provider_of(run)
        self.batch_size = int(batch_size) if batch_size not in (None, "auto") else int(run.cfg.eval.batch_size)
        self.max_length = int(run.cfg.model.max_seq_len)
        self._prefix = [int(t) for t in run.tokenizer.template["prefix"]]

    @property
    def eot_token_id(self) -> int:
        return int(self.run.tokenizer.eot_id)

    @property
    def prefix_token_id(self) -> int:
        """The token an empty context stands for: the template's BOS, else the EOT that ends a document."""
        return self._prefix[-1] if self._prefix else self.eot_token_id

    @property
    def tokenizer_name(self) -> str:
        return f"memlm-{self.run.tokenizer.id}"

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
        """Token ids of ``string``: with the tokenizer's template unless ``add_special_tokens`` is False."""
        tok = self.run.tokenizer
        ids = tok.encode_plain(string) if add_special_tokens is False else tok.encode(string)
        return [int(t) for t in ids]

    def tok_decode(self, tokens: list[int]) -> str:
        return self.run.tokenizer.decode(tokens)

    def _encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """(context with the template's prefix, the continuation's plain tokens after the context's)."""
        n_spaces = len(context) - len(context.rstrip())
        if n_spaces:
            context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
        tok = self.run.tokenizer
        ctx = [int(t) for t in tok.encode_plain(context)]
        whole = [int(t) for t in tok.encode_plain(context + continuation)]
        if whole[: len(ctx)] == ctx:
            cont = whole[len(ctx):]
        else:  # the seam merges tokens across the boundary: keep the context whole, the continuation apart
            cont = [int(t) for t in tok.encode_plain(continuation)]
        return self._prefix + ctx, cont

    def _with_documents(self, rows: list[tuple]) -> list[tuple]:
        """Rows ``(key, ids, ...)`` with a rag condition's documents put in their ids (as they are otherwise)."""
        docs = documents_for(self.provider, [r[0] for r in rows], self.condition)
        if docs is None:
            return rows
        return [(r[0], splice(r[1], d, self._prefix)[0], *r[2:]) for r, d in zip(rows, docs, strict=True)]

    def loglikelihood(self, requests: list, disable_tqdm: bool = False) -> list:
        """lm-eval's log-likelihood requests; a schema task's are keyed by the part its choices share."""
        self._keys = schema_keys(requests)
        try:
            return super().loglikelihood(requests, disable_tqdm=disable_tqdm)
        finally:
            self._keys = {}

    def _loglikelihood_tokens(self, requests: list, disable_tqdm: bool = False, **kwargs: Any) -> list:
        """Score ``((context, continuation), context ids, continuation ids)``, keyed by the context (by the
        shared continuation for a schema task's requests, :func:`schema_keys`)."""
        rows = []
        keys = getattr(self, "_keys", {})
        for (context, continuation), ctx, cont in requests:
            key = keys.get((context, continuation), context if context.strip() else continuation)
            rows.append((key, ctx, cont))
        rows = self._with_documents(rows)
        return score_rows(self.run.fn, self.run.params, self.provider, self.condition, rows, self.batch_size,
                          self.max_length)

    def loglikelihood_rolling(self, requests: list, disable_tqdm: bool = False) -> list[float]:
        """A document's total log-likelihood in disjoint windows, every window keyed by the whole document."""
        rows, owner = [], []
        for n, req in enumerate(requests):
            (text,) = req.args
            windows = get_rolling_token_windows(token_list=self.tok_encode(text, add_special_tokens=False),
                                                prefix_token=self.prefix_token_id, max_seq_len=self.max_length,
                                                context_len=1)
            for ctx, cont in map(make_disjoint_window, windows):
                rows.append((text, ctx, cont))
                owner.append(n)
        rows = self._with_documents(rows)
        scored = score_rows(self.run.fn, self.run.params, self.provider, self.condition, rows, self.batch_size,
                            self.max_length)
        total = [0.0] * len(requests)
        for n, (logp, _) in zip(owner, scored, strict=True):
            total[n] += logp
        for req, value in zip(requests, total, strict=True):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, value)
        return total

    def generate_until(self, requests: list, disable_tqdm: bool = False) -> list[str]:
        """Greedy continuations of the prompts, each under its prompt's memory, cut at the first stop string."""
        rows, stops = [], []
        for req in requests:
            context, kwargs = req.args
            kwargs = dict(kwargs or {})
            if kwargs.get("do_sample") or float(kwargs.get("temperature", 0.0) or 0.0) > 0:
                raise ValueError("memlm generates greedily: set do_sample: false and temperature: 0")
            until = kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            stops.append(until + [self.run.tokenizer.eot])
            new = max(1, min(int(kwargs.get("max_gen_toks", 256)), self.max_length - 1))
            ids = self.tok_encode(context)[-(self.max_length - new):]
            rows.append((context, ids, new))
        rows = [(k, ids[-(self.max_length - new):], new) for k, ids, new in self._with_documents(rows)]
        out = generate_rows(self.run.fn, self.run.params, self.provider, self.condition, rows, self.batch_size,
                            self.eot_token_id)
        texts = []
        for req, tokens, until in zip(requests, out, stops, strict=True):
            text = self.tok_decode(tokens)
            for s in until:
                if s and s in text:
                    text = text[: text.index(s)]
            self.cache_hook.add_partial("generate_until", req.args, text)
            texts.append(text)
        return texts


def schema_keys(requests: list) -> dict[tuple[str, str], str]:
    """The retrieval key of each schema request: ``{(context, continuation): continuation}``.

    A schema task (Winograd, WinoGrande) asks one question as several contexts (the sentence up to
    the blank, each choice filled in) with one shared continuation; docs/paper.md App. B routes
    such a question by the part all its choices share. A request group (one task's document) is
    a schema when its contexts differ and its continuations are all the same.
    """
    groups: dict[tuple, list[tuple[str, str]]] = {}
    for req in requests:
        if req.doc_id is None:  # not from a task's document: nothing to group by
            continue
        groups.setdefault((req.task_name, req.doc_id), []).append(tuple(req.args))
    keys = {}
    for pairs in groups.values():
        contexts, continuations = {c for c, _ in pairs}, {x for _, x in pairs}
        if len(pairs) > 1 and len(contexts) > 1 and len(continuations) == 1:
            keys.update({pair: pair[1] for pair in pairs})
    return keys
