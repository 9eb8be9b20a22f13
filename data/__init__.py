"""Data: tokenizers, the shard writer behind `ithaca prep`, the packed training loader and its Batch."""

from ithaca.data.batch import Batch
from ithaca.data.loader import PackedLoader, Source
from ithaca.data.prep import prep
from ithaca.data.shard_reader import ShardError
from ithaca.data.shards import Manifest, read_manifest
from ithaca.data.tokenizer import ByteTokenizer, load_tokenizer

__all__ = ["Batch", "ByteTokenizer", "Manifest", "PackedLoader", "ShardError", "Source", "load_tokenizer", "prep",
           "read_manifest"]
