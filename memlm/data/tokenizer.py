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


class TokenizerError(ValueError):
    """A tokenizer file cannot be used; the message names the path."""


class Tokenizer:
    """A ``tokenizers.Tokenizer`` with the EOT id, the padded vocabulary size and a content id."""

    def __init__(self, tok, vocab_multiple: int, eot: str = EOT):
        tok.no_padding()
        tok.no_truncation()
        tok.encode_special_tokens = True  # document text never produces special ids
        eot_id = tok.token_to_id(eot)
        if eot_id is None:
            raise TokenizerError(f"tokenizer has no end-of-text token {eot!r}")
        self._tok = tok
        self.eot = eot
        self.eot_id = int(eot_id)
        self.raw_vocab_size = int(tok.get_vocab_size(with_added_tokens=True))
        self.vocab_size = padded_vocab(self.raw_vocab_size, vocab_multiple)
        self.id = hashlib.sha256(tok.to_str().encode()).hexdigest()[:16]

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
        eot = folder_eos(path.parent, tok)
        if eot is None:
            eot = next((t for t in _KNOWN_EOS if t in vocab), None)
        if eot is None:
            tok.add_special_tokens([EOT])
            eot = EOT
        return cls(tok, vocab_multiple, eot)

    def save(self, path: str | os.PathLike) -> None:
        """Write the ``tokenizer.json`` and, beside it, a ``tokenizer_config.json`` naming the EOT
        (an existing one keeps its other fields)."""
        tmp = f"{path}.tmp"
        self._tok.save(tmp)
        os.replace(tmp, path)
        side = Path(path).parent / TOKENIZER_CONFIG
        config = _read_json(side) if side.exists() else {}
        if config.get("eos_token") != self.eot:
            tmp = side.with_suffix(".tmp")
            tmp.write_text(json.dumps({**config, "eos_token": self.eot}, indent=2) + "\n")
            os.replace(tmp, side)

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self._tok.encode(text, add_special_tokens=False).ids, dtype=np.int32)

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        """Token ids of each text (no EOT appended: the packer adds it), as int32 arrays."""
        encs = self._tok.encode_batch(list(texts), add_special_tokens=False)
        return [np.asarray(e.ids, dtype=np.int32) for e in encs]

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
