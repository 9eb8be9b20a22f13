"""Data: tokenizers, the shard writer behind `ithaca prep`, and the packed training loader."""

from ithaca.data.loader import LoaderState, PackedLoader
from ithaca.data.prep import prep
from ithaca.data.shards import Manifest, read_manifest
from ithaca.data.tokenizer import ByteTokenizer, load_tokenizer

__all__ = ["ByteTokenizer", "LoaderState", "Manifest", "PackedLoader", "load_tokenizer", "prep", "read_manifest"]
