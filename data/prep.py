"""`ithaca prep`: text/JSONL -> webdataset shards of token ids + manifest.json, all or nothing.

Shards are written into a temporary sibling folder that is renamed into place only once the
manifest is complete, so an interrupted prep leaves no folder that training could mistake for data.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import shutil
import sysconfig
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import webdataset as wds

from ithaca.data.shards import MANIFEST, Manifest, ShardInfo
from ithaca.data.tokenizer import Tokenizer
from ithaca.log import get_logger

log = get_logger(__name__)

TEXT_SUFFIXES = (".txt", ".md", ".py", ".rst", ".jsonl")


def default_inputs() -> list[Path]:
    """Real text present on every machine: the Python standard library's top-level modules."""
    return sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))


def expand_inputs(inputs: Iterable[Path]) -> list[Path]:
    """Files as given; folders become their text files (recursively, sorted)."""
    files: list[Path] = []
    for path in map(Path, inputs):
        if path.is_dir():
            files += sorted(p for p in path.rglob("*") if p.is_file() and _plain_suffix(p) in TEXT_SUFFIXES)
        elif path.is_file():
            files.append(path)
        else:
            raise ValueError(f"--input={str(path)!r}: no such file or folder")
    return files


def _plain_suffix(path: Path) -> str:
    return Path(path.stem).suffix if path.suffix == ".gz" else path.suffix


def read_documents(files: Iterable[Path], field: str = "text") -> Iterator[str]:
    """One document per text file, or one per line of a .jsonl file (its `field`)."""
    for path in files:
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rt", encoding="utf-8", errors="replace") as f:
            if _plain_suffix(path) == ".jsonl":
                for line_no, line in enumerate(f, 1):
                    if line.strip():
                        yield _json_field(line, field, path, line_no)
            else:
                yield f.read()


def _json_field(line: str, field: str, path: Path, line_no: int) -> str:
    try:
        value = json.loads(line)[field]
    except (json.JSONDecodeError, KeyError, TypeError):
        raise ValueError(f"{path}:{line_no}: not a JSON object with a string field {field!r}") from None
    if not isinstance(value, str):
        raise ValueError(f"{path}:{line_no}: field {field!r} is not a string")
    return value


def prep(files: list[Path], output: Path, tokenizer: Tokenizer, *, shard_tokens: int = 1 << 22,
         field: str = "text") -> Manifest:
    """Tokenize every document of `files` into shards of about `shard_tokens` tokens under `output`.

    Raises ValueError when `output` already holds files or the input has no tokens.
    """
    output = Path(output)
    if output.exists() and any(output.iterdir()):
        raise ValueError(f"--output={str(output)!r}: folder exists and is not empty; choose a new one or remove it")
    dtype = np.uint16 if tokenizer.vocab_size <= 1 << 16 else np.uint32
    staging = output.with_name(f".{output.name}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        shards = _write_shards(read_documents(files, field), staging, tokenizer, dtype, shard_tokens)
        manifest = Manifest(tokenizer=tokenizer.identity(), shards=shards)
        if manifest.tokens == 0:
            raise ValueError(f"--input: {len(files)} file(s) hold no text to tokenize; give non-empty input")
        (staging / MANIFEST).write_text(manifest.to_json())
        if output.exists():
            output.rmdir()  # empty (checked above)
        staging.rename(output)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return manifest


def _write_shards(docs: Iterable[str], folder: Path, tokenizer: Tokenizer, dtype: type,
                  shard_tokens: int) -> list[ShardInfo]:
    shards: list[ShardInfo] = []
    writer, name, n_docs, n_tokens = None, "", 0, 0

    def close() -> None:
        writer.close()
        digest = hashlib.sha256((folder / name).read_bytes()).hexdigest()
        shards.append(ShardInfo(name=name, documents=n_docs, tokens=n_tokens, sha256=digest))
        log.info(f"prep: wrote {name} documents={n_docs} tokens={n_tokens}")

    doc_index = 0
    for text in docs:
        ids = tokenizer.encode(text)
        if ids.size == 0:
            continue
        if writer is None:
            name = f"shard-{len(shards):06d}.tar"
            writer, n_docs, n_tokens = wds.TarWriter(str(folder / name)), 0, 0
        writer.write({"__key__": f"{doc_index:09d}", "tokens.npy": ids.astype(dtype)})
        doc_index, n_docs, n_tokens = doc_index + 1, n_docs + 1, n_tokens + ids.size
        if n_tokens >= shard_tokens:
            close()
            writer = None
    if writer is not None:
        close()
    return shards
