"""Serving: greedy decoding with the KV cache and fetched memory."""

from memlm.serve.generate import generate, generate_text

__all__ = ["generate", "generate_text"]
