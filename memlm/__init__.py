"""memlm: pretraining small language models with hierarchical parametric memory banks.

An anchor transformer keeps common knowledge; a bank of memory blocks, organised by a
hierarchical clustering of the training documents, keeps the long tail. Each sequence fetches
the blocks on its cluster path and adds them to the anchor's FFN layers (arXiv 2510.02375).
"""

__version__ = "0.1.0"
