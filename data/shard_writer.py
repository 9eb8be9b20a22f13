"""Writes prep's shards one at a time, each visible only once complete, with a journal to resume from.

A shard is written as `shard-NNNNNN.tar.tmp`, hashed, renamed to `shard-NNNNNN.tar`, and only then
recorded in `prep-journal.json` (replaced atomically) with the input position after its last
document and the bad inputs skipped before that position. A re-run of the same prep (same
fingerprint) keeps the journal's shards, deletes anything else, and continues from that position.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import webdataset as wds

from ithaca.data.input_errors import SkipLog
from ithaca.data.inputs import InputPosition
from ithaca.data.shards import ShardInfo
from ithaca.log import get_logger

log = get_logger(__name__)

JOURNAL = "prep-journal.json"


@dataclass
class Journal:
    fingerprint: str
    shards: list[ShardInfo] = field(default_factory=list)
    next_position: InputPosition = InputPosition(0, 0)
    """Where the input continues after the last finished shard."""
    skipped: SkipLog = field(default_factory=SkipLog)
    """Bad inputs left out so far. Prep adds them in input order, interleaved with documents, so
    when a shard closes and the journal is saved they are exactly those before `next_position`."""

    @classmethod
    def resume_or_start(cls, folder: Path, fingerprint: str) -> Journal:
        """The journal of an earlier run of this same prep in `folder`, or a new one (clearing the folder)."""
        folder.mkdir(parents=True, exist_ok=True)
        journal = cls._read(folder / JOURNAL)
        if journal is None or journal.fingerprint != fingerprint:
            if any(folder.iterdir()):
                log.info(f"prep: {folder} holds an unfinished prep of other inputs or options; starting over")
            journal = cls(fingerprint)
        elif journal.shards:
            log.info(f"prep: continuing after {len(journal.shards)} finished shards in {folder}")
        keep = {JOURNAL, *(s.name for s in journal.shards)}
        for path in folder.iterdir():
            if path.name not in keep:
                shutil.rmtree(path) if path.is_dir() else path.unlink()  # a folder: a holdout started before
        return journal

    @classmethod
    def _read(cls, path: Path) -> Journal | None:
        try:
            raw = json.loads(path.read_text())
            return cls(raw["fingerprint"], [ShardInfo(**s) for s in raw["shards"]],
                       InputPosition(*raw["next_position"]), SkipLog.from_json(raw["skipped"]))
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def save(self, folder: Path) -> None:
        tmp = folder / f"{JOURNAL}.tmp"
        tmp.write_text(json.dumps({"fingerprint": self.fingerprint, "shards": [asdict(s) for s in self.shards],
                                   "next_position": [self.next_position.file, self.next_position.doc],
                                   "skipped": self.skipped.to_json()}))
        os.replace(tmp, folder / JOURNAL)

    @property
    def documents(self) -> int:
        return sum(s.documents for s in self.shards)


class ShardWriter:
    """Appends documents' token ids to the current shard; closes a shard once it holds `shard_tokens`."""

    def __init__(self, folder: Path, journal: Journal, *, shard_tokens: int, dtype: type):
        self.folder, self.journal, self.shard_tokens, self.dtype = folder, journal, shard_tokens, dtype
        self._tar: wds.TarWriter | None = None
        self._documents = self._tokens = 0

    def add(self, ids: np.ndarray, position: InputPosition) -> None:
        """Write one document (skipped if empty); `position` is its place in the input."""
        if ids.size:
            if self._tar is None:
                self._tar = wds.TarWriter(str(self._tmp_path), mtime=0)  # same input, same bytes and sha256
            key = f"{self.journal.documents + self._documents:09d}"  # global document index
            self._tar.write({"__key__": key, "tokens.npy": ids.astype(self.dtype)})
            self._documents, self._tokens = self._documents + 1, self._tokens + ids.size
        if self._tokens >= self.shard_tokens:
            self._close(InputPosition(position.file, position.doc + 1))

    def finish(self) -> list[ShardInfo]:
        """Close the last shard; returns every shard of this prep."""
        if self._tar is not None:
            self._close(None)
        return self.journal.shards

    @property
    def _name(self) -> str:
        return f"shard-{len(self.journal.shards):06d}.tar"

    @property
    def _tmp_path(self) -> Path:
        return self.folder / f"{self._name}.tmp"

    def _close(self, next_position: InputPosition | None) -> None:
        self._tar.close()
        name, tmp = self._name, self._tmp_path
        digest = hashlib.sha256(tmp.read_bytes()).hexdigest()
        tmp.rename(self.folder / name)
        self.journal.shards.append(ShardInfo(name=name, documents=self._documents, tokens=self._tokens, sha256=digest))
        if next_position is not None:  # the last shard needs no resume point: the manifest follows at once
            self.journal.next_position = next_position
            self.journal.save(self.folder)
        log.info(f"prep: wrote {name} documents={self._documents} tokens={self._tokens}")
        self._tar, self._documents, self._tokens = None, 0, 0
