"""Tokenizers for `ithaca prep`: the embedded byte-level default, or a local Hugging Face tokenizer.json."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

EOS_CANDIDATES = ("<|endoftext|>", "</s>", "<eos>", "<|end_of_text|>")


class Tokenizer(Protocol):
    vocab_size: int
    eos_id: int

    def encode(self, text: str) -> np.ndarray: ...

    def identity(self) -> dict: ...


@dataclass(frozen=True)
class ByteTokenizer:
    """UTF-8 bytes are the ids 0..255; 256 ends a document. Needs nothing on disk."""

    vocab_size: int = 257
    eos_id: int = 256

    def encode(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int64)

    def identity(self) -> dict:
        return {"kind": "byte", "vocab_size": self.vocab_size, "eos_id": self.eos_id}


class HFTokenizer:
    """A `tokenizers` tokenizer.json read from a local file (nothing is fetched from a hub)."""

    def __init__(self, path: Path):
        from tokenizers import Tokenizer as _Tokenizer

        self.path = Path(path)
        self._tok = _Tokenizer.from_file(str(self.path))
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        ids = [self._tok.token_to_id(t) for t in EOS_CANDIDATES]
        found = [i for i in ids if i is not None]
        if not found:
            raise ValueError(f"--tokenizer={str(path)!r}: no end-of-document token; add one of "
                             f"{', '.join(EOS_CANDIDATES)} to the tokenizer")
        self.eos_id = found[0]
        self._sha256 = hashlib.sha256(self.path.read_bytes()).hexdigest()

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self._tok.encode(text, add_special_tokens=False).ids, dtype=np.int64)

    def identity(self) -> dict:
        return {"kind": "tokenizer.json", "vocab_size": self.vocab_size, "eos_id": self.eos_id,
                "sha256": self._sha256}


def load_tokenizer(spec: str) -> Tokenizer:
    """"byte" or a path to a tokenizer.json; raises ValueError naming the fix otherwise."""
    if spec == "byte":
        return ByteTokenizer()
    path = Path(spec)
    if not path.is_file():
        raise ValueError(f"--tokenizer={spec!r}: give 'byte' or the path of an existing tokenizer.json")
    try:
        return HFTokenizer(path)
    except ValueError:
        raise
    except Exception as err:  # tokenizers raises its own Exception type for a bad file
        raise ValueError(f"--tokenizer={spec!r}: not a readable tokenizer.json ({err})") from None
