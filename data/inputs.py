"""`ithaca prep`'s inputs: files and folders of text or JSONL (optionally .gz), read as documents.

Each document carries its place in the input, (file index, document index in that file), so an
interrupted prep can continue after the last document of its last finished shard.
"""

from __future__ import annotations

import gzip
import json
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

TEXT_SUFFIXES = (".txt", ".md", ".py", ".rst", ".jsonl")


def default_inputs() -> list[Path]:
    """Real text present on every machine: the Python standard library's top-level modules."""
    return sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))


def expand_inputs(inputs: Iterable[Path]) -> list[Path]:
    """Files as given; folders become their text files (recursively, sorted).

    Raises ValueError naming a path that does not exist."""
    files: list[Path] = []
    for path in map(Path, inputs):
        if path.is_dir():
            files += sorted(p for p in path.rglob("*") if p.is_file() and plain_suffix(p) in TEXT_SUFFIXES)
        elif path.is_file():
            files.append(path)
        else:
            raise ValueError(f"--input={str(path)!r}: no such file or folder")
    return files


def plain_suffix(path: Path) -> str:
    return Path(path.stem).suffix if path.suffix == ".gz" else path.suffix


@dataclass(frozen=True)
class InputPosition:
    """A document's place in the input: file `file` (index into the file list), document `doc` in it."""

    file: int
    doc: int


@dataclass(frozen=True)
class Document:
    position: InputPosition
    text: str
    bytes_read: int
    """Bytes of input files (as stored, compressed or not) read up to the end of this document."""


def read_documents(files: list[Path], field: str = "text", start: InputPosition = InputPosition(0, 0)) -> Iterator[Document]:
    """One document per text file, or one per non-blank line of a .jsonl file (its `field`), from `start` on.

    Raises ValueError naming the file and line of a JSONL line without a string `field`."""
    done_bytes = sum(f.stat().st_size for f in files[:start.file])
    for file_index in range(start.file, len(files)):
        path = files[file_index]
        skip = start.doc if file_index == start.file else 0
        with open(path, "rb") as raw:
            stream = gzip.open(raw) if path.suffix == ".gz" else raw
            if plain_suffix(path) == ".jsonl":
                texts = _jsonl_texts(stream, field, path)
            else:
                texts = iter([stream.read().decode("utf-8", errors="replace")])
            for doc_index, text in enumerate(texts):
                if doc_index >= skip:
                    yield Document(InputPosition(file_index, doc_index), text, done_bytes + raw.tell())
        done_bytes += path.stat().st_size


def _jsonl_texts(stream, field: str, path: Path) -> Iterator[str]:
    for line_no, line in enumerate(stream, 1):
        if line.strip():
            yield _json_field(line.decode("utf-8", errors="replace"), field, path, line_no)


def _json_field(line: str, field: str, path: Path, line_no: int) -> str:
    try:
        value = json.loads(line)[field]
    except (json.JSONDecodeError, KeyError, TypeError):
        raise ValueError(f"{path}:{line_no}: not a JSON object with a string field {field!r}") from None
    if not isinstance(value, str):
        raise ValueError(f"{path}:{line_no}: field {field!r} is not a string")
    return value
