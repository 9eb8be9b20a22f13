"""Data: tokenizers, the shard writer behind `ithaca prep`, and the packed training loader."""

from ithaca.data.loader import PackedLoader, Source
from ithaca.data.prep import prep
from ithaca.data.shard_reader import ShardError
from ithaca.data.shards import Manifest, read_manifest
from ithaca.data.tokenizer import ByteTokenizer, load_tokenizer

__all__ = ["ByteTokenizer", "Manifest", "PackedLoader", "ShardError", "Source", "load_tokenizer", "prep",
           "read_manifest"]
