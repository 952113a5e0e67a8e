"""Data: corpus readers, the tokenizer, the generated facts corpus, packing per leaf cluster,
ArrayRecord shards, ``prepare`` (corpus -> packed shards) and the grain loader.

Heavy and optional pieces (grain, array_record, the retrieval stack, the facts data packages) are
imported where they are used, so ``import memlm.data`` stays light.
"""

from memlm.data.loader import Loader, make_loader
from memlm.data.packing import Piece, materialize, plan_leaf, segment_arrays
from memlm.data.prepare import DataError, prepare
from memlm.data.readers import CorpusError, Document, ReadStats, Shard, corpus_shards, iter_documents, iter_shard
from memlm.data.records import RecordError, decode_sequence, encode_sequence, read_manifest
from memlm.data.tokenizer import EOT, Tokenizer, TokenizerError, load_tokenizer, train_bpe

__all__ = [
    "EOT",
    "CorpusError",
    "DataError",
    "Document",
    "Loader",
    "Piece",
    "ReadStats",
    "RecordError",
    "Shard",
    "Tokenizer",
    "TokenizerError",
    "corpus_shards",
    "decode_sequence",
    "encode_sequence",
    "iter_documents",
    "iter_shard",
    "load_tokenizer",
    "make_loader",
    "materialize",
    "plan_leaf",
    "prepare",
    "read_manifest",
    "segment_arrays",
    "train_bpe",
]
