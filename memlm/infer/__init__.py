"""Inference: open a trained run, give each text its memory under a condition, route, score, generate.

``run`` opens a run (anchor, tokenizer, tree, banks) and is its memory provider; ``conditions``
names the memory conditions (none, generic, fetched, blocked) and their batching; ``beam``
routes ``fetched`` by the anchor's likelihood (beam, likelihood descent, posterior fallback,
anchor gate); ``scoring`` is the log-likelihood kernel; ``generate`` the KV-cache greedy decoder.
``memlm.eval`` and ``memlm.serve`` build on this package and never import each other.
"""
