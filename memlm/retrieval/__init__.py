"""Retrieval: sentence embedders, the balanced hierarchical k-means tree, and routing down it.

Retrieval knows nothing of the language model: it turns texts into paths ``[n, depth]`` of tree
node indices (docs/paper.md §3.1), which the data pipeline stores with each packed sequence and the
evaluation code computes for each context.
"""

from memlm.retrieval.embedder import Embedder, EmbedderError, get_embedder
from memlm.retrieval.fit import fit_tree
from memlm.retrieval.hashing import HashingEmbedder
from memlm.retrieval.minilm import MiniLMEmbedder
from memlm.retrieval.routing import route, route_avoiding, route_beam
from memlm.retrieval.tree import Tree, TreeError

__all__ = [
    "Embedder",
    "EmbedderError",
    "HashingEmbedder",
    "MiniLMEmbedder",
    "Tree",
    "TreeError",
    "fit_tree",
    "get_embedder",
    "route",
    "route_avoiding",
    "route_beam",
]
