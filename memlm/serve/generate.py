"""``memlm generate``: route a prompt, fetch its memory, decode greedily, print.

The decoding engine is ``memlm.infer.generate``; this module is the command-line verb.
"""

from __future__ import annotations

from memlm.infer.beam import provider_of
from memlm.infer.generate import generate_text
from memlm.infer.run import load_run

__all__ = ["generate_cli"]


def generate_cli(workdir: str, prompt: str, condition: str | None = "fetched", max_new_tokens: int = 32,
                 overrides: dict[str, str] | None = None, chat: bool = False) -> str:
    """The ``memlm generate`` verb: route the prompt, fetch its memory, decode greedily, print.

    ``chat``: the prompt is one user message rendered by the tokenizer's chat template (the memory
    is still routed by the prompt's own text).

    ``condition=None``: fetched memory when the run has a bank, else the anchor alone (a converted
    or anchor-only run). ``overrides``: ``bank.*`` keys (e.g. deep levels off device) and ``eval.*``
    routing keys (``eval.route_descent``, ``route_posterior``, ...: routed as ``memlm eval`` routes)."""
    run = load_run(workdir, overrides=overrides)
    if condition is None:
        condition = "fetched" if "fetched" in run.conditions else "none"
    from memlm.config import ConditionError
    from memlm.infer.conditions import RAG_CONDITIONS

    if condition in RAG_CONDITIONS:
        raise ConditionError(f"condition {condition!r} is the RAG baseline of `memlm eval`; generate with none, "
                             "generic, fetched or blocked")
    if condition not in run.conditions:
        raise ConditionError(f"condition {condition!r} is not available for {workdir} "
                             f"(available: {', '.join(c for c in run.conditions if c not in RAG_CONDITIONS)})")
    provider = provider_of(run)
    memory = provider([prompt], condition)
    if chat and run.tokenizer.chat_template is None:
        from memlm.data.tokenizer import TokenizerError

        raise TokenizerError(f"--chat: the tokenizer of {workdir} has no chat template (no chat_template.jinja "
                             "and no 'chat_template' in its tokenizer_config.json)")
    text = generate_text(run.fn, run.params, run.tokenizer, [prompt], memory, max_new_tokens, chat=chat)[0]
    where = ""
    if condition in ("fetched", "blocked"):
        fell_back = condition == "fetched" and bool(provider.gated([prompt])[0])
        path = provider.paths([prompt], condition)[0].tolist()
        where = f" [fallback: {run.cfg.eval.route_fallback}]" if fell_back else f" [path {path}]"
    print(f"{prompt}{text}")
    print(f"memlm generate: {condition} memory{where}, step {run.step} of {workdir}")
    return text
