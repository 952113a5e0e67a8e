"""The tokenizer: a byte-level BPE trained locally on the corpus, or any HF ``tokenizer.json``.

Every tokenizer carries an end-of-text token (EOT, ``<|endoftext|>``) that the packer puts after
each document. The vocabulary the model sees is the tokenizer's size padded up to
``model.vocab_multiple`` (``memlm.config.padded_vocab``); ids past the tokenizer's own size never
occur in data. Corpus text is encoded with special-token parsing off, so a literal
``<|endoftext|>`` in a document is plain text, never a document boundary.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from memlm.config import padded_vocab

EOT = "<|endoftext|>"
# End-of-text tokens of common tokenizers, tried in order when a given tokenizer.json has no EOT.
_KNOWN_EOS = (EOT, "</s>", "<eos>", "<|end_of_text|>", "<|eot_id|>", "<|im_end|>")


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
        """Load a HF ``tokenizer.json``; an EOT token is found among the usual names or added."""
        from tokenizers import Tokenizer as HFTokenizer

        path = Path(path)
        if not path.is_file():
            raise TokenizerError(f"tokenizer file {str(path)!r} does not exist")
        try:
            tok = HFTokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises a plain Exception on malformed JSON
            raise TokenizerError(f"tokenizer file {str(path)!r} cannot be loaded: {e}") from e
        vocab = tok.get_vocab(with_added_tokens=True)
        eot = next((t for t in _KNOWN_EOS if t in vocab), None)
        if eot is None:
            tok.add_special_tokens([EOT])
            eot = EOT
        return cls(tok, vocab_multiple, eot)

    def save(self, path: str | os.PathLike) -> None:
        tmp = f"{path}.tmp"
        self._tok.save(tmp)
        os.replace(tmp, path)

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
