"""`ithaca prep`: text/JSONL -> webdataset shards of token ids + manifest.json.

Documents are read in input order by this process and tokenized by a pool of worker processes
(a bounded number of batches in flight, so memory stays flat whatever the input size); shards
are written in order. Work happens in a hidden sibling folder `.<output>.partial` that becomes
`<output>` only once the manifest is written, so training never sees half a dataset; an
interrupted prep keeps its finished shards there and the same command continues after them.
A file or JSONL line that is not readable text stops the prep, or with on_error="skip" is left
out, logged and counted in manifest.json's "skipped" (input_errors.py).

`holdout` sets documents aside for evaluation, in `<output>/holdout/` (its own shards and
manifest, recorded in the main manifest's "holdout"): N >= 1 takes the first N documents in input
order, a fraction 0 < f < 1 takes an evenly spread f of them (document i when floor((i+1)f) >
floor(i f)). Documents are counted in input order, so the same inputs give the same holdout, and a
held-out document is in no training shard. A prep with a holdout does not continue an
interrupted one: it starts over.
"""

from __future__ import annotations

import hashlib
import json
import math
import multiprocessing
import shutil
from collections import deque
from dataclasses import replace
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from ithaca.data.input_errors import MAX_LISTED, BadInput, OnError, SkipLog
from ithaca.data.inputs import Document, InputPosition, read_documents, stored_size
from ithaca.data.shard_writer import JOURNAL, Journal, ShardWriter
from ithaca.data.shards import MANIFEST, Manifest
from ithaca.data.tokenizer import Tokenizer
from ithaca.log import get_logger

log = get_logger(__name__)

HOLDOUT = "holdout"
"""The holdout's folder inside the output folder."""

BATCH_BYTES = 1 << 20
"""Text per task sent to a tokenizer worker: large enough to hide the pickling, small enough to stream."""


def prep(files: list[Path], output: Path, tokenizer: Tokenizer, *, shard_tokens: int = 1 << 22,
         field: str = "text", workers: int = 1, progress: bool = False, on_error: OnError = "stop",
         holdout: float | None = None) -> Manifest:
    """Tokenize every document of `files` into shards of about `shard_tokens` tokens under `output`.

    `workers` > 1 tokenizes in that many processes; `progress` shows a bar on a terminal.
    `on_error="skip"` leaves out bad files and JSONL lines and records them in manifest.json.
    `holdout`: documents for evaluation (module docstring), None for none.
    Raises ValueError when `output` already holds files, the input has no tokens, `holdout` is not a
    count >= 1 or a fraction in (0, 1) or leaves either side empty, or (on_error="stop") at the
    first bad file or line, naming it; finished shards then stay in the hidden staging folder.
    """
    output = Path(output)
    if output.exists() and any(output.iterdir()):
        raise ValueError(f"--output={str(output)!r}: folder exists and is not empty; choose a new one or remove it")
    if holdout is not None and not (holdout >= 1 and holdout == int(holdout) or 0 < holdout < 1):
        raise ValueError(f"--holdout={holdout}: give a number of documents (1 or more) or a fraction between 0 and 1")
    staging = output.with_name(f".{output.name}.partial")
    if holdout is not None and staging.exists():
        log.info(f"prep: a prep with --holdout starts over; removing the unfinished {staging}")
        shutil.rmtree(staging)
    fingerprint = _fingerprint(files, tokenizer, shard_tokens, field, on_error, holdout)
    journal = Journal.resume_or_start(staging, fingerprint)
    dtype = np.uint16 if tokenizer.vocab_size <= 1 << 16 else np.uint32
    writer = ShardWriter(staging, journal, shard_tokens=shard_tokens, dtype=dtype)
    held = None
    if holdout is not None:
        (staging / HOLDOUT).mkdir()
        held = ShardWriter(staging / HOLDOUT, Journal(fingerprint), shard_tokens=shard_tokens, dtype=dtype)
    docs = read_documents(files, field, journal.next_position, on_error)
    try:
        with _progress_bar(files, journal.next_position, progress) as bar:
            index = 0  # documents read so far, in input order: what the holdout is chosen by
            for doc, ids in _tokenized(docs, tokenizer, workers):
                if doc.bad is not None:
                    _skip(journal.skipped, doc.bad)
                elif held is not None and _is_held_out(index, holdout):
                    held.add(ids, doc.position)
                    index += 1
                else:
                    writer.add(ids, doc.position)
                    index += 1
                bar.update(doc.bytes_read - bar.n)
        manifest = Manifest(tokenizer=tokenizer.identity(), shards=writer.finish())
        if held is not None:
            manifest = _finish_holdout(held, manifest, staging / HOLDOUT, holdout)
    except KeyboardInterrupt:
        log.info(f"prep: interrupted; {len(journal.shards)} finished shards kept in {staging}; "
                 "run the same command to continue")
        raise
    if manifest.tokens == 0:
        shutil.rmtree(staging)
        skipped = f" ({journal.skipped.summary()})" if on_error == "skip" else ""
        raise ValueError(f"--input: {len(files)} file(s) hold no text to tokenize{skipped}; give non-empty input")
    # "skipped" sits beside the shard list (shards.py's format): read_manifest ignores it, read_skip_log reads it
    record = {**json.loads(manifest.to_json()), "skipped": journal.skipped.to_json()}
    (staging / MANIFEST).write_text(json.dumps(record, indent=1))
    (staging / JOURNAL).unlink(missing_ok=True)  # written only when a shard closed before the last
    if output.exists():
        output.rmdir()  # empty (checked above)
    staging.rename(output)
    return manifest


def _is_held_out(index: int, holdout: float) -> bool:
    """Whether document `index` (input order) is held out: the first N, or an even spread of a fraction."""
    if holdout >= 1:
        return index < holdout
    return math.floor((index + 1) * holdout) > math.floor(index * holdout)


def _finish_holdout(held: ShardWriter, manifest: Manifest, folder: Path, holdout: float) -> Manifest:
    """Close the holdout's shards, write its manifest, and return the training manifest recording it."""
    held_manifest = Manifest(tokenizer=manifest.tokenizer, shards=held.finish())
    if held_manifest.tokens == 0 or manifest.tokens == 0:
        side = "holdout" if held_manifest.tokens == 0 else "training set"
        raise ValueError(f"--holdout={holdout}: leaves the {side} without tokens; hold out fewer documents "
                         "(or more, for an empty holdout)")
    (folder / MANIFEST).write_text(held_manifest.to_json())
    (folder / JOURNAL).unlink(missing_ok=True)
    return replace(manifest, holdout={"path": HOLDOUT, "documents": held_manifest.documents})


def _fingerprint(files: list[Path], tokenizer: Tokenizer, shard_tokens: int, field: str, on_error: OnError,
                 holdout: float | None) -> str:
    """What makes two preps the same: the inputs (path, size, mtime), tokenizer and options."""
    inputs = [(str(f.resolve()), *_size_and_mtime(f)) for f in files]
    spec = {"inputs": inputs, "tokenizer": tokenizer.identity(), "shard_tokens": shard_tokens, "field": field,
            "on_error": on_error, **({} if holdout is None else {"holdout": holdout})}
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()


def _size_and_mtime(path: Path) -> tuple[int | None, int | None]:
    try:
        stat = path.stat()
    except OSError:  # missing or a broken link: reading it reports that
        return None, None
    return stat.st_size, stat.st_mtime_ns


def _skip(skipped: SkipLog, bad: BadInput) -> None:
    if skipped.add(bad):
        log.warning(f"prep: skipped {bad}")
    elif skipped.files + skipped.lines == MAX_LISTED + 1:
        log.warning(f"prep: skipped more than {MAX_LISTED} inputs; counting the rest without naming them")


def _progress_bar(files: list[Path], start: InputPosition, enabled: bool):
    from tqdm import tqdm

    done = sum(stored_size(f) for f in files[:start.file])
    return tqdm(total=sum(stored_size(f) for f in files), initial=done, unit="B", unit_scale=True,
                desc="prep", disable=None if enabled else True)  # None: only on a terminal


def _tokenized(docs: Iterator[Document], tokenizer: Tokenizer, workers: int) -> Iterator[tuple[Document, np.ndarray]]:
    """(document without its text, token ids) in input order."""
    batches = _batches(docs)
    if workers <= 1:
        for batch in batches:
            yield from _encode_batch(batch, tokenizer)
        return
    context = multiprocessing.get_context("fork")  # workers start in milliseconds; spawn re-imports torch in each
    with context.Pool(workers, initializer=_init_worker, initargs=(tokenizer,)) as pool:
        pending = deque()
        for batch in batches:
            pending.append(pool.apply_async(_encode_batch, (batch,)))
            if len(pending) >= 2 * workers:
                yield from pending.popleft().get()
        while pending:
            yield from pending.popleft().get()


def _batches(docs: Iterable[Document]) -> Iterator[list[Document]]:
    batch, size = [], 0
    for doc in docs:
        batch.append(doc)
        size += len(doc.text)
        if size >= BATCH_BYTES:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


_worker_tokenizer: Tokenizer | None = None


def _init_worker(tokenizer: Tokenizer) -> None:
    global _worker_tokenizer
    _worker_tokenizer = tokenizer


def _encode_batch(batch: list[Document], tokenizer: Tokenizer | None = None) -> list[tuple[Document, np.ndarray]]:
    tokenizer = tokenizer or _worker_tokenizer
    return [(replace(d, text=""), tokenizer.encode(d.text)) for d in batch]
