"""Chat templates: a conversation rendered to text as a chat model's tokenizer folder says.

A Hugging Face chat model ships a Jinja template (``chat_template.jinja``, or ``chat_template`` in
``tokenizer_config.json``). It is rendered here as ``transformers`` renders it in
``apply_chat_template``: a sandboxed environment with ``trim_blocks`` and ``lstrip_blocks``, loop
controls, a ``tojson`` filter that keeps non-ASCII text, ``raise_exception`` and ``strftime_now``,
and the folder's special tokens (``bos_token``, ``eos_token``, ...) as variables. Templates come
from checkpoints, so they run in Jinja's immutable sandbox.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping, Sequence
from datetime import datetime


class ChatTemplateError(ValueError):
    """A chat template cannot be rendered (a template error, or it rejected the messages)."""


@functools.cache
def _compile(template: str):
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(template)


def render_chat(template: str, messages: Sequence[Mapping], special_tokens: Mapping[str, str],
                add_generation_prompt: bool = True) -> str:
    """The text of ``messages`` (``[{"role": ..., "content": ...}, ...]``) under a chat template."""
    import jinja2

    tokens = {k: v for k, v in special_tokens.items() if k.endswith("_token") and isinstance(v, str)}
    try:
        return _compile(template).render(messages=[dict(m) for m in messages],
                                         add_generation_prompt=add_generation_prompt, **tokens)
    except jinja2.exceptions.TemplateError as e:
        raise ChatTemplateError(f"the chat template cannot render these messages: {e}") from None
