"""`ithaca prep`'s inputs: files and folders of text or JSONL (optionally .gz), read as documents.

Each document carries its place in the input, (file index, document index in that file), so an
interrupted prep can continue after the last document of its last finished shard. Text must be
UTF-8 without NUL bytes; anything else is a `BadInput` (input_errors.py), never silently replaced.
"""

from __future__ import annotations

import gzip
import json
import sysconfig
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Iterable, Iterator

from ithaca.data.input_errors import BadInput, OnError

TEXT_SUFFIXES = (".txt", ".md", ".py", ".rst", ".jsonl")


def default_inputs() -> list[Path]:
    """Real text present on every machine: the Python standard library's top-level modules."""
    return sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))


def expand_inputs(inputs: Iterable[Path]) -> list[Path]:
    """Files as given; folders become their text files (recursively, sorted), broken links included
    so that prep reports them rather than leaving them out unseen.

    Raises ValueError naming a path that does not exist."""
    files: list[Path] = []
    for path in map(Path, inputs):
        if path.is_dir():
            files += sorted(p for p in path.rglob("*") if (p.is_file() or _is_broken_link(p))
                            and plain_suffix(p) in TEXT_SUFFIXES)
        elif path.is_file():
            files.append(path)
        else:
            raise ValueError(f"--input={str(path)!r}: no such file or folder")
    return files


def _is_broken_link(path: Path) -> bool:
    return path.is_symlink() and not path.exists()


def plain_suffix(path: Path) -> str:
    return Path(path.stem).suffix if path.suffix == ".gz" else path.suffix


def stored_size(path: Path) -> int:
    """Bytes of `path` as stored; 0 for a file that cannot be read (prep reports it when reading)."""
    try:
        return path.stat().st_size
    except OSError:
        return 0


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
    bad: BadInput | None = None
    """Set, with empty `text`, for a file or line that on_error="skip" leaves out."""


def read_documents(files: list[Path], field: str = "text", start: InputPosition = InputPosition(0, 0),
                   on_error: OnError = "stop") -> Iterator[Document]:
    """One document per text file, or one per non-blank line of a .jsonl file (its `field`), from `start` on.

    A bad file or JSONL line raises ValueError naming it (on_error="stop"), or comes as a Document
    with `bad` set ("skip") at the position of the next good document: a resumed prep then meets
    again exactly the bad inputs that its journal has not counted."""
    done_bytes = sum(stored_size(f) for f in files[:start.file])
    for file_index in range(start.file, len(files)):
        path, doc_index = files[file_index], 0
        skip = start.doc if file_index == start.file else 0
        for item, file_bytes in _read_file(path, field):
            position = InputPosition(file_index, doc_index)
            if isinstance(item, str):
                doc_index += 1
            if position.doc < skip:
                continue  # in a finished shard, or counted in the journal
            if isinstance(item, str):
                yield Document(position, item, done_bytes + file_bytes)
            elif on_error == "stop":
                raise ValueError(item.stop_message())
            else:
                yield Document(position, "", done_bytes + file_bytes, bad=item)
        done_bytes += stored_size(path)


def _read_file(path: Path, field: str) -> Iterator[tuple[str | BadInput, int]]:
    """(text or what is wrong, bytes of `path` read so far) for each document of one file."""
    try:
        raw = open(path, "rb")
    except OSError as err:
        yield BadInput("unreadable", str(path), None, f"cannot read ({err.strerror})"), 0
        return
    with raw:
        try:
            stream: IO[bytes] = gzip.open(raw) if path.suffix == ".gz" else raw
            if plain_suffix(path) != ".jsonl":
                yield _text(stream.read(), path), raw.tell()
                return
            if path.suffix == ".gz":
                # Decompress once to the end (CRC included) before any line goes into a shard, so a bad
                # .gz is left out whole or stops the prep before its lines are tokenized. It costs about
                # 1% of a byte-tokenizer prep (0.11 s of 10 s for 40 MB of JSONL on one core).
                while stream.read(1 << 20):
                    pass
                raw.seek(0)
                stream = gzip.open(raw)
            for line_no, line in enumerate(stream, 1):
                if line.strip():
                    yield _jsonl_text(line, field, path, line_no), raw.tell()
        except (gzip.BadGzipFile, EOFError, zlib.error) as err:
            yield BadInput("gzip", str(path), None, f"corrupt or truncated gzip ({err})"), raw.tell()
        except OSError as err:
            yield BadInput("unreadable", str(path), None, f"cannot read ({err.strerror})"), raw.tell()


def _text(data: bytes, path: Path) -> str | BadInput:
    nul = data.find(b"\0")  # what git and grep take to mean binary; UTF-8 text has none
    if nul >= 0:
        return BadInput("binary", str(path), None, f"binary, not text (NUL byte at offset {nul})")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        return BadInput("utf8", str(path), None, f"not UTF-8 (byte 0x{data[err.start]:02x} on line {line})")


def _jsonl_text(line: bytes, field: str, path: Path, line_no: int) -> str | BadInput:
    if b"\0" in line:
        return BadInput("binary", str(path), line_no, "binary, not text (NUL byte)")
    try:
        record = json.loads(line.decode("utf-8"))
    except UnicodeDecodeError as err:
        return BadInput("utf8", str(path), line_no,
                        f"not UTF-8 (byte 0x{line[err.start]:02x} at column {err.start + 1})")
    except json.JSONDecodeError as err:
        return BadInput("json", str(path), line_no, f"not JSON ({err.msg} at column {err.colno})")
    value = record.get(field) if isinstance(record, dict) else None
    if isinstance(value, str):
        return value
    if value is None:
        return BadInput("field", str(path), line_no, f"not a JSON object with a string field {field!r}")
    return BadInput("field", str(path), line_no, f"field {field!r} is {json.dumps(value)[:40]}, not a string")
