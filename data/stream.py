"""One dataset as one data stream reads it: its documents + EOS end to end, cut into windows.

Window k holds the stream's tokens [k*L, k*L + L + 1) (L = seq_len): L inputs and their L
next-token labels, so labels are taken before any sequence-parallel split and no label is lost at
a window edge. The stream runs through epochs without end (data/split.py says which shards, in
which order). Its position is a `Cursor`: a few integers that a checkpoint stores and that a
resumed stream starts from, so it yields exactly the windows the uninterrupted one would have.
A stream made by a re-split (data/resplit.py) also stores what it reads of the epochs it took over.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterator, Literal

import numpy as np

from ithaca.data.remote import shard_folder
from ithaca.data.shard_reader import ShardError, read_shard
from ithaca.data.shards import Manifest
from ithaca.data.split import Segment, document_order, stream_segments
from ithaca.log import get_logger

log = get_logger(__name__, all_ranks=True)  # each stream reports its own skips


@dataclass(frozen=True)
class Cursor:
    """The next window's first token: epoch, the stream's shard (index into its segments for that
    epoch), document (index in that shard's reading order), token offset in the document + EOS."""

    epoch: int = 0
    shard: int = 0
    doc: int = 0
    offset: int = 0


class DatasetStream:
    """Windows of `seq_len + 1` tokens from stream `stream` of `n_streams` over one shard folder."""

    def __init__(self, folder: Path | str, manifest: Manifest, *, stream: int, n_streams: int, seq_len: int,
                 seed: int, shuffle: bool, on_error: Literal["raise", "skip"], state: dict | None = None):
        self.folder, self.manifest = shard_folder(folder), manifest
        self.stream, self.n_streams, self.seq_len = stream, n_streams, seq_len
        self.seed, self.shuffle, self.on_error = seed, shuffle, on_error
        self.eos = np.array([manifest.tokenizer["eos_id"]], dtype=np.int64)
        self.cursor = Cursor(*state["cursor"]) if state else Cursor()
        # checkpoints from before re-splits hold neither key: the round-robin split from epoch 0
        self.leftover = segments_from_rows(state.get("leftover", [])) if state else {}
        self.normal_from = state.get("normal_from", 0) if state else 0
        self.skipped = state["skipped"] if state else 0
        """Unreadable shards passed over so far (on_error: skip)."""
        self._cache: dict[tuple[int, int], list[np.ndarray] | None] = {}
        self._unreadable: set[tuple[int, int]] = set()

    def state(self) -> dict:
        c = self.cursor
        return {"cursor": [c.epoch, c.shard, c.doc, c.offset], "skipped": self.skipped,
                "leftover": segment_rows(self.leftover), "normal_from": self.normal_from}

    def next_window(self) -> np.ndarray:
        """The next [seq_len + 1] int64 window; the stream moves on by seq_len tokens (windows share one)."""
        need, taken, parts, after = self.seq_len + 1, 0, [], None
        for cursor, piece in self._pieces(self.cursor):
            if after is None and taken + piece.size > self.seq_len:
                after = replace(cursor, offset=cursor.offset + self.seq_len - taken)
            parts.append(piece[:need - taken])
            taken += parts[-1].size
            if taken == need:
                break
        self._count_skips_before(after)
        self.cursor = after
        return np.concatenate(parts)

    def _pieces(self, start: Cursor) -> Iterator[tuple[Cursor, np.ndarray]]:
        """(cursor, rest of that document + EOS) from `start` on, through epochs without end."""
        c = start
        while True:
            # a re-split's leftover may give a stream few (even no) readable shards of an epoch
            whole_epoch, yielded = c.epoch >= self.normal_from and c == Cursor(c.epoch), False
            segments = self._segments(c.epoch)
            while c.shard < len(segments):
                docs = self._documents(c.epoch, c.shard, segments[c.shard].shard) or []
                while c.doc < len(docs):
                    yield c, docs[c.doc][c.offset:]
                    yielded, c = True, Cursor(c.epoch, c.shard, c.doc + 1)
                c = self._entry(c.epoch, c.shard + 1)
            if whole_epoch and not yielded:
                raise ShardError(f"data stream {self.stream} of {self.n_streams} read no document in epoch "
                                 f"{c.epoch} of {self.folder}: all {len(segments)} of its shards are unreadable")
            c = self._entry(c.epoch + 1, 0)

    def _segments(self, epoch: int) -> list[Segment]:
        return stream_segments(len(self.manifest.shards), self.n_streams, self.stream, epoch, self.seed, self.shuffle,
                               leftover=self.leftover, normal_from=self.normal_from)

    def _entry(self, epoch: int, position: int) -> Cursor:
        """Where the stream's `position`-th segment of `epoch` starts (mid-shard only after a re-split)."""
        segments = self._segments(epoch)
        start = segments[position] if position < len(segments) else Segment(0)
        return Cursor(epoch, position, start.doc, start.offset)

    def _documents(self, epoch: int, position: int, shard: int) -> list[np.ndarray] | None:
        """Shard `shard`'s documents + EOS in this epoch's order; None if unreadable and skipped."""
        key = (epoch, position)
        if key not in self._cache:
            if len(self._cache) >= 2:  # a window spans at most the shard it starts in and later ones
                self._cache.pop(next(iter(self._cache)))
            self._cache[key] = self._read(key, shard)
        return self._cache[key]

    def _read(self, key: tuple[int, int], shard: int) -> list[np.ndarray] | None:
        info = self.manifest.shards[shard]
        try:
            docs = read_shard(self.folder, info)
        except ShardError as err:
            if self.on_error == "raise":
                raise
            self._unreadable.add(key)
            log.warning(f"data.on_error=skip: skipping {err}")
            return None
        order = document_order(len(docs), shard, epoch=key[0], seed=self.seed, shuffle=self.shuffle)
        return [np.concatenate([docs[i].astype(np.int64), self.eos]) for i in order]

    def _count_skips_before(self, cursor: Cursor) -> None:
        """Count each skipped shard once, when the cursor moves past it (a window may peek at it twice)."""
        passed = {k for k in self._unreadable if k < (cursor.epoch, cursor.shard)}
        self.skipped += len(passed)
        self._unreadable -= passed


def segment_rows(leftover: dict[int, list[Segment]]) -> list[list[int]]:
    """A stream's leftover as the plain rows a checkpoint keeps: [epoch, shard, doc, offset]."""
    return [[epoch, s.shard, s.doc, s.offset] for epoch in sorted(leftover) for s in leftover[epoch]]


def segments_from_rows(rows: list[list[int]]) -> dict[int, list[Segment]]:
    leftover: dict[int, list[Segment]] = {}
    for epoch, shard, doc, offset in rows:
        leftover.setdefault(epoch, []).append(Segment(shard, doc, offset))
    return leftover
