"""The tokenizer: a byte-level BPE trained locally on the corpus, or any HF ``tokenizer.json``.

Every tokenizer carries an end-of-text token (EOT, ``<|endoftext|>``) that the packer puts after
each document. A ``tokenizer.json`` from a Hugging Face model folder takes that model's own
end-of-sequence token as its EOT: ``eos_token`` of the ``tokenizer_config.json`` beside it, else
``eos_token_id`` of its ``generation_config.json`` / ``config.json``; only a folder that names
none falls back to the usual names. Saving writes a ``tokenizer_config.json`` beside the file
naming the EOT, so a prepared data directory reloads with the same one. The vocabulary the model
sees is the tokenizer's size padded up to ``model.vocab_multiple`` (``memlm.config.padded_vocab``);
ids past the tokenizer's own size never occur in data. Corpus text is encoded with special-token
parsing off, so a literal ``<|endoftext|>`` in a document is plain text, never a document boundary.

Text is read as the model's own tokenizer reads it: the tokenizer's special-token template (the
``post_processor`` of ``tokenizer.json``, e.g. Gemma's and Llama 3's ``<bos> $A``) applies to every
prompt and to every document, as ``transformers``' ``tokenizer(text)`` does. Where the folder's
``tokenizer_config.json`` sets ``add_bos_token`` / ``add_eos_token`` (or ``tokenizer.json`` has no
post-processor), the template is rebuilt from those flags and its ``bos_token`` / ``eos_token``,
which is what ``transformers`` (5.x) does on load; the rebuilt template is kept in the saved
``tokenizer.json``. memlm's own BPE has no template. :attr:`Tokenizer.template` (the ids put before
and after a text) is recorded in a data directory's manifest and checked by ``memlm train`` and
``memlm eval`` (:func:`check_template`). A chat model's template (``chat_template.jinja`` or
``chat_template`` of ``tokenizer_config.json``) is kept too: :meth:`Tokenizer.encode_chat`.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from memlm.config import padded_vocab

EOT = "<|endoftext|>"
# End-of-text tokens of common tokenizers, tried in order when a given tokenizer.json has no EOT.
_KNOWN_EOS = (EOT, "</s>", "<eos>", "<|end_of_text|>", "<|eot_id|>", "<|im_end|>")


TOKENIZER_CONFIG = "tokenizer_config.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"
# tokenizer_config.json fields a saved tokenizer keeps (the template itself is in tokenizer.json)
_KEPT_FIELDS = ("bos_token", "eos_token", "unk_token", "pad_token", "chat_template")


class TokenizerError(ValueError):
    """A tokenizer file cannot be used; the message names the path."""


class Tokenizer:
    """A ``tokenizers.Tokenizer`` with the EOT id, the padded vocabulary size and a content id."""

    def __init__(self, tok, vocab_multiple: int, eot: str = EOT, config: dict | None = None):
        tok.no_padding()
        tok.no_truncation()
        tok.encode_special_tokens = True  # document text never produces special ids
        eot_id = tok.token_to_id(eot)
        if eot_id is None:
            raise TokenizerError(f"tokenizer has no end-of-text token {eot!r}")
        self._tok = tok
        self._chat_tok = None
        self.eot = eot
        self.eot_id = int(eot_id)
        self.raw_vocab_size = int(tok.get_vocab_size(with_added_tokens=True))
        self.vocab_size = padded_vocab(self.raw_vocab_size, vocab_multiple)
        # the folder's special tokens and chat template (str tokens only), kept when saved
        self.config = {k: v for k, v in (config or {}).items() if k in _KEPT_FIELDS and v is not None}
        self.template = template_of(tok)
        blob = tok.to_str()
        if self.template != EMPTY_TEMPLATE:  # text encoded with a template is other data than without it
            blob += json.dumps(self.template, sort_keys=True)
        self.id = hashlib.sha256(blob.encode()).hexdigest()[:16]

    @classmethod
    def from_file(cls, path: str | os.PathLike, vocab_multiple: int) -> Tokenizer:
        """Load a HF ``tokenizer.json``; the EOT is the folder's end-of-sequence token (see the module
        docstring), else found among the usual names, else added."""
        from tokenizers import Tokenizer as HFTokenizer

        path = Path(path)
        if not path.is_file():
            raise TokenizerError(f"tokenizer file {str(path)!r} does not exist")
        try:
            tok = HFTokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises a plain Exception on malformed JSON
            raise TokenizerError(f"tokenizer file {str(path)!r} cannot be loaded: {e}") from e
        vocab = tok.get_vocab(with_added_tokens=True)
        config = folder_config(path.parent)
        apply_config_template(tok, config)
        eot = folder_eos(path.parent, tok)
        if eot is None:
            eot = next((t for t in _KNOWN_EOS if t in vocab), None)
        if eot is None:
            tok.add_special_tokens([EOT])
            eot = EOT
        return cls(tok, vocab_multiple, eot, config)

    def save(self, path: str | os.PathLike) -> None:
        """Write the ``tokenizer.json`` (its template included) and, beside it, a
        ``tokenizer_config.json`` naming the EOT, the folder's special tokens and its chat template
        (an existing one keeps its other fields)."""
        tmp = f"{path}.tmp"
        self._tok.save(tmp)
        os.replace(tmp, path)
        side = Path(path).parent / TOKENIZER_CONFIG
        config = _read_json(side) if side.exists() else {}
        want = {**config, **self.config, "eos_token": self.eot}
        if config != want:
            tmp = side.with_suffix(".tmp")
            tmp.write_text(json.dumps(want, indent=2) + "\n")
            os.replace(tmp, side)

    def encode(self, text: str) -> np.ndarray:
        """Token ids of a prompt, as the model's tokenizer gives them (its template included)."""
        return np.asarray(self._tok.encode(text, add_special_tokens=True).ids, dtype=np.int32)

    def encode_plain(self, text: str) -> np.ndarray:
        """Token ids of a piece of text that continues another (no template)."""
        return np.asarray(self._tok.encode(text, add_special_tokens=False).ids, dtype=np.int32)

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        """Token ids of each document, template included, as int32 arrays. No EOT is appended (the
        packer adds it), and a template that ends with the EOT leaves it to the packer too."""
        encs = self._tok.encode_batch(list(texts), add_special_tokens=True)
        cut = bool(self.template["suffix"]) and self.template["suffix"][-1] == self.eot_id
        return [np.asarray(e.ids[:-1] if cut else e.ids, dtype=np.int32) for e in encs]

    @property
    def chat_template(self) -> str | None:
        """The folder's chat template (None: not a chat model)."""
        return self.config.get("chat_template")

    def encode_chat(self, messages: Sequence[dict], add_generation_prompt: bool = True) -> np.ndarray:
        """Token ids of a conversation rendered by the chat template, as ``transformers``'
        ``apply_chat_template(messages, add_generation_prompt=True)`` gives them: the rendered text
        holds its own special tokens, so they are parsed and no template is added."""
        from memlm.data.chat import render_chat

        if self.chat_template is None:
            raise TokenizerError("this tokenizer has no chat template (no chat_template.jinja and no "
                                 "'chat_template' in tokenizer_config.json): it is not a chat model")
        text = render_chat(self.chat_template, messages, self.config, add_generation_prompt)
        if self._chat_tok is None:
            from tokenizers import Tokenizer as HFTokenizer

            self._chat_tok = HFTokenizer.from_str(self._tok.to_str())
            self._chat_tok.encode_special_tokens = False
        return np.asarray(self._chat_tok.encode(text, add_special_tokens=False).ids, dtype=np.int32)

    def decode(self, ids: Iterable[int]) -> str:
        """Text of ids; padding ids (past the tokenizer's own vocabulary) are dropped."""
        return self._tok.decode([int(i) for i in ids if 0 <= int(i) < self.raw_vocab_size],
                                skip_special_tokens=False)


def _read_json(path: Path) -> dict:
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return obj if isinstance(obj, dict) else {}


EMPTY_TEMPLATE: dict[str, list[int]] = {"prefix": [], "suffix": []}


def template_of(tok) -> dict[str, list[int]]:
    """The ids a tokenizer's special-token template puts before and after a text."""
    probe = "memlm"
    plain = tok.encode(probe, add_special_tokens=False).ids
    full = tok.encode(probe, add_special_tokens=True).ids
    for i in range(len(full) - len(plain) + 1):
        if full[i: i + len(plain)] == plain:
            return {"prefix": [int(t) for t in full[:i]], "suffix": [int(t) for t in full[i + len(plain):]]}
    raise TokenizerError(f"the tokenizer's template changes the text itself ({plain} -> {full})")


def _token_str(value) -> str | None:
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def folder_config(folder: Path) -> dict:
    """The ``tokenizer_config.json`` fields memlm reads (special tokens as strings, the add-token
    flags, the chat template from ``chat_template.jinja`` or the config)."""
    raw = _read_json(folder / TOKENIZER_CONFIG)
    config: dict = {k: _token_str(raw.get(k)) for k in ("bos_token", "eos_token", "unk_token", "pad_token")}
    for flag in ("add_bos_token", "add_eos_token"):
        if isinstance(raw.get(flag), bool):
            config[flag] = raw[flag]
    chat = raw.get("chat_template")
    if isinstance(chat, list):  # named templates: the default one
        chat = next((c.get("template") for c in chat if isinstance(c, dict) and c.get("name") == "default"), None)
    if (folder / CHAT_TEMPLATE_FILE).is_file():
        chat = (folder / CHAT_TEMPLATE_FILE).read_text(encoding="utf-8")
    config["chat_template"] = chat if isinstance(chat, str) else None
    return {k: v for k, v in config.items() if v is not None}


def apply_config_template(tok, config: dict) -> None:
    """Rebuild the template from ``add_bos_token`` / ``add_eos_token`` where ``transformers`` does: the
    config sets either flag. (``transformers`` also rebuilds a missing post-processor, with both flags
    off: the same as none, so such a tokenizer is left as it is.)"""
    from tokenizers import processors

    if "add_bos_token" not in config and "add_eos_token" not in config:
        return
    parts: list[str] = []
    specials: list[tuple[str, int]] = []
    for flag, key in (("add_bos_token", "bos_token"), ("add_eos_token", "eos_token")):
        token = config.get(key)
        tid = tok.token_to_id(token) if token is not None else None
        on = bool(config.get(flag)) and tid is not None
        parts.append(f"{token}:0" if on else "")
        if on:
            specials.append((token, int(tid)))
    bos, eos = parts
    single = " ".join(p for p in (bos, "$A:0", eos) if p)
    pair = " ".join(p for p in (single, bos.replace(":0", ":1"), "$B:1", eos.replace(":0", ":1")) if p)
    tok.post_processor = processors.TemplateProcessing(single=single, pair=pair, special_tokens=specials)


def check_template(recorded: dict | None, tok: Tokenizer, where: str) -> None:
    """A data directory's tokens were made with this tokenizer's template (``recorded``: the manifest's
    ``tokenizer.template``; absent in data prepared before templates were applied)."""
    have = recorded if recorded is not None else EMPTY_TEMPLATE
    if {k: list(have.get(k, [])) for k in ("prefix", "suffix")} != tok.template:
        raise TokenizerError(f"the data in {where} was tokenized with the special-token template {have}, but its "
                             f"tokenizer puts {tok.template} around a text: run `memlm prepare` again")


def folder_eos(folder: Path, tok) -> str | None:
    """The end-of-sequence token a Hugging Face model folder names for this tokenizer, if any."""
    eos = _read_json(folder / TOKENIZER_CONFIG).get("eos_token")
    if isinstance(eos, dict):
        eos = eos.get("content")
    if isinstance(eos, str) and tok.token_to_id(eos) is not None:
        return eos
    for name in ("generation_config.json", "config.json"):
        ids = _read_json(folder / name).get("eos_token_id")
        first = ids[0] if isinstance(ids, list) and ids else ids
        if isinstance(first, int) and not isinstance(first, bool):
            token = tok.id_to_token(first)
            if token is not None:
                return token
    return None


def train_bpe(texts: Iterable[str], vocab_size: int, vocab_multiple: int, length: int | None = None) -> Tokenizer:
    """Train a byte-level BPE (GPT-2 style: any byte sequence encodes, no unknown token) on texts.

    ``vocab_size`` counts the EOT token; training sees the texts once, as a stream.
    """
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    if vocab_size < 257 + 1:
        raise TokenizerError(f"data.tokenizer_vocab = {vocab_size}: a byte-level BPE needs at least 258 "
                             "(256 bytes, EOT and one merge)")
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOT], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer, length=length)
    return Tokenizer(tok, vocab_multiple)


def load_tokenizer(path: str | os.PathLike, vocab_multiple: int) -> Tokenizer:
    """Load a tokenizer saved by ``prepare`` (or any HF tokenizer.json)."""
    return Tokenizer.from_file(path, vocab_multiple)
