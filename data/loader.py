"""Packed training sequences from prep's shards, with a position that a checkpoint can hold.

The shards' documents, each followed by EOS, form one token stream that repeats by epoch.
Window k of the stream is tokens [k*L, k*L + L + 1) (L = seq_len): L inputs and their L
next-token labels, so labels are taken before any sequence-parallel split and no label is lost at
a window edge. Optimizer step t uses windows [t*G, (t+1)*G) (G = global batch), dealt to
micro-batches and data-parallel ranks in a fixed order, so every layout trains on the same
global batches. First cut: every rank reads the stream and keeps its own windows.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import webdataset as wds

from ithaca.data.shards import Manifest, read_manifest


def _keep_all(urls):  # this first cut splits windows, not shards, across ranks
    return urls


def iter_documents(folder: Path, manifest: Manifest, first_shard: int = 0) -> Iterator[np.ndarray]:
    """Documents' token ids in shard order, starting at shard `first_shard`."""
    urls = [str(folder / s.name) for s in manifest.shards[first_shard:]]
    dataset = wds.WebDataset(urls, shardshuffle=False, nodesplitter=_keep_all, workersplitter=_keep_all,
                             empty_check=False).decode()
    for sample in dataset:
        yield sample["tokens.npy"]


@dataclass
class LoaderState:
    windows_done: int = 0
    """Windows of the global stream consumed by finished steps."""


class PackedLoader:
    """Yields, per optimizer step, this data-parallel rank's micro-batches as [micro_batch, L+1] int64."""

    def __init__(self, path: str | Path, *, seq_len: int, global_batch: int, micro_batch: int,
                 dp: int, dp_rank: int, eos_id: int, state: LoaderState | None = None):
        self.folder = Path(path)
        self.manifest = read_manifest(self.folder)
        self.seq_len, self.global_batch, self.micro_batch = seq_len, global_batch, micro_batch
        self.dp, self.dp_rank, self.eos_id = dp, dp_rank, eos_id
        self.state = state or LoaderState()
        self._windows = self._stream_windows(self.state.windows_done)

    @property
    def epoch_tokens(self) -> int:
        return self.manifest.tokens + self.manifest.documents  # one EOS per document

    def next_step(self) -> list[torch.Tensor]:
        """This rank's micro-batches for the next step; advances the state by one global batch."""
        rows_per_micro = self.dp * self.micro_batch
        micro_batches = []
        for _ in range(self.global_batch // rows_per_micro):
            group = [next(self._windows) for _ in range(rows_per_micro)]
            mine = group[self.dp_rank * self.micro_batch:(self.dp_rank + 1) * self.micro_batch]
            micro_batches.append(torch.from_numpy(np.stack(mine)))
        self.state.windows_done += self.global_batch
        return micro_batches

    def _stream_windows(self, first_window: int) -> Iterator[np.ndarray]:
        length = self.seq_len + 1
        skip = first_window * self.seq_len % self.epoch_tokens
        buffer = np.empty(0, dtype=np.int64)
        for tokens in self._stream_tokens(skip):  # the stream is endless: so is this
            buffer = np.concatenate([buffer, tokens])
            while buffer.size >= length:
                yield buffer[:length].copy()
                buffer = buffer[self.seq_len:]  # windows overlap by one token: the last label

    def _stream_tokens(self, skip: int) -> Iterator[np.ndarray]:
        """The endless stream of document tokens + EOS, starting `skip` tokens into an epoch."""
        eos = np.array([self.eos_id], dtype=np.int64)
        first_shard = 0
        for shard in self.manifest.shards:  # skip whole shards by their manifest counts
            size = shard.tokens + shard.documents
            if skip < size:
                break
            skip, first_shard = skip - size, first_shard + 1
        while True:
            for doc in iter_documents(self.folder, self.manifest, first_shard):
                tokens = np.concatenate([doc.astype(np.int64), eos])
                if skip >= tokens.size:
                    skip -= tokens.size
                    continue
                yield tokens[skip:]
                skip = 0
            first_shard = 0
