"""The training loader: packed windows from prep's shards, split over data-parallel ranks and
dataloader workers, resumable to the exact token.

Each dp rank reads `max(workers, 1)` streams (data/split.py: which shards each stream reads),
one per dataloader worker, and a stream is a weighted mixture of the run's datasets
(data/mixture.py), each packed into windows (data/stream.py). A micro-batch is `micro_batch`
windows of one stream; torch's DataLoader takes micro-batch j from worker j % workers, so the
step's micro-batches come from the rank's streams in turn. The global batches therefore depend
on dp x workers (the stream count), not on tensor or sequence parallelism: layouts with the same
stream count train on the same batches.

The loader's state is what the main process has consumed: the micro-batch count and, per
stream, the position after its last consumed micro-batch. Prefetched micro-batches are not in
it, so a resumed run gets exactly the micro-batches the uninterrupted one would have. A run with
another dp x workers resumes from every rank's state: data/resplit.py states the rule.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Literal

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from ithaca.data.batch import Batch
from ithaca.data.mixture import mixture_choices
from ithaca.data.resplit import state_for_layout
from ithaca.data.shard_reader import ShardError
from ithaca.data.shards import Manifest, read_manifest
from ithaca.data.stream import DatasetStream
from ithaca.data.worker_lifetime import close_at_exit, forget, ignore_stop_signals

OnError = Literal["raise", "skip"]


@dataclass(frozen=True)
class Source:
    """A shard folder written by `ithaca prep` (local, or remote: data/remote.py) and its share of the
    windows in a mixture."""

    path: Path | str
    weight: float = 1.0


@dataclass(frozen=True)
class StreamSpec:
    """What every stream of a run shares."""

    sources: tuple[Source, ...]
    manifests: tuple[Manifest, ...]
    seq_len: int
    micro_batch: int
    n_streams: int
    seed: int
    shuffle: bool
    on_error: OnError


def check_stream_count(path: Path, manifest: Manifest, dp: int, workers: int) -> None:
    """Raise ValueError unless every one of the dp x max(workers, 1) streams gets a shard."""
    n_streams = dp * max(workers, 1)
    if len(manifest.shards) < n_streams:
        raise ValueError(f"{path} has {len(manifest.shards)} shards, fewer than the {n_streams} data streams "
                         f"(dp={dp} x data.workers={workers}) that each need one; prep it with a smaller "
                         "--shard-tokens, or use fewer data.workers")


class MixedStream:
    """One data stream: micro-batches of windows, each window from a dataset drawn by weight."""

    def __init__(self, spec: StreamSpec, stream: int, state: dict | None):
        self.spec, self.stream = spec, stream
        self.windows = state["windows"] if state else 0
        self.datasets = [
            DatasetStream(src.path, manifest, stream=stream, n_streams=spec.n_streams, seq_len=spec.seq_len,
                          seed=spec.seed, shuffle=spec.shuffle, on_error=spec.on_error,
                          state=state["datasets"][i] if state else None)
            for i, (src, manifest) in enumerate(zip(spec.sources, spec.manifests))]

    def next_micro_batch(self) -> np.ndarray:
        """[micro_batch, seq_len + 1] int64."""
        weights = [s.weight for s in self.spec.sources]
        choices = mixture_choices(weights, self.spec.seed, self.stream, self.windows, self.spec.micro_batch)
        rows = [self.datasets[i].next_window() for i in choices]
        self.windows += len(rows)
        return np.stack(rows)

    def state(self) -> dict:
        return {"windows": self.windows, "datasets": [d.state() for d in self.datasets]}


class _RankStreams(IterableDataset):
    """A dp rank's streams; in DataLoader worker w, the stream that worker serves."""

    def __init__(self, spec: StreamSpec, dp_rank: int, streams_per_rank: int, consumed: int, states: dict):
        self.spec, self.dp_rank, self.streams_per_rank = spec, dp_rank, streams_per_rank
        self.consumed, self.states = consumed, states

    def __iter__(self) -> Iterator[tuple[torch.Tensor | None, int, dict | None, str | None]]:
        worker = get_worker_info()
        # The DataLoader's next micro-batch j comes from worker j % workers, and is the rank's
        # micro-batch consumed + j, which belongs to local stream (consumed + j) % streams.
        local = (self.consumed + (worker.id if worker else 0)) % self.streams_per_rank
        stream = MixedStream(self.spec, self.dp_rank * self.streams_per_rank + local, self.states.get(local))
        try:
            while True:
                yield torch.from_numpy(stream.next_micro_batch()), local, stream.state(), None
        except ShardError as err:  # passed as text: a worker's exception would reach the user wrapped in a traceback
            yield None, local, None, str(err)


class PackedLoader:
    """Yields, per optimizer step, this dp rank's micro-batches: as training Batches (`next_batches`,
    data/batch.py) or as the packed windows they are built from, [micro_batch, seq_len + 1] int64
    tensors (`next_step`).

    `document_mask`: the Batches mark documents (ids, starts, restarted positions) at the
    tokenizer's EOS (`eos_id`); False: one sequence per row. `state`: every dp rank's
    `state_dict()`, in dp-rank order, from the run to continue, whatever its dp and workers
    (data/resplit.py: the same stream count continues exactly, another one re-divides the epoch).
    Raises ValueError if a dataset has fewer shards than streams (dp x workers), if the datasets'
    tokenizers end documents with different ids, or if `state` is not such a list or is for another
    number of datasets; ShardError (a ValueError) from `next_step` for an unreadable shard under
    on_error="raise".
    `close()` stops its worker processes (at exit, an open loader is closed:
    data/worker_lifetime.py says why that matters).
    """

    def __init__(self, sources: list[Source], *, seq_len: int, micro_batch: int, grad_accum: int, dp: int,
                 dp_rank: int, workers: int = 0, seed: int = 0, shuffle: bool = True, on_error: OnError = "raise",
                 document_mask: bool = True, state: list[dict] | None = None):
        manifests = tuple(read_manifest(s.path) for s in sources)
        eos_ids = {m.tokenizer["eos_id"] for m in manifests}
        if len(eos_ids) > 1:  # data/stream.py ends each dataset's documents with its own tokenizer's EOS
            raise ValueError(f"sources {[str(s.path) for s in sources]} end documents with different EOS ids "
                             f"{sorted(eos_ids)}; prep every dataset with one tokenizer")
        self.eos_id: int = eos_ids.pop()
        """The tokenizer's end-of-document id, which the packer puts after every document."""
        self.document_mask = document_mask
        self.streams_per_rank = max(workers, 1)
        n_streams = dp * self.streams_per_rank
        for source, manifest in zip(sources, manifests):
            check_stream_count(source.path, manifest, dp, workers)
        own = None if state is None else state_for_layout(
            state, dp=dp, dp_rank=dp_rank, workers=workers, n_shards=[len(m.shards) for m in manifests], seed=seed,
            shuffle=shuffle)
        self.spec = StreamSpec(tuple(sources), manifests, seq_len, micro_batch, n_streams, seed, shuffle, on_error)
        self.grad_accum = grad_accum
        self.micro_batches = own["micro_batches"] if own else 0
        self.stream_states: dict[int, dict] = dict(own["stream_states"]) if own else {}
        dataset = _RankStreams(self.spec, dp_rank, self.streams_per_rank, self.micro_batches, self.stream_states)
        self._batches: Iterator = iter(DataLoader(dataset, batch_size=None, num_workers=workers,
                                                  worker_init_fn=ignore_stop_signals) if workers else dataset)
        if workers:
            close_at_exit(self)

    def next_batches(self) -> list[Batch]:
        """This rank's `grad_accum` micro-batches for the next optimizer step, whole (every sp rank
        takes its piece with `Batch.part`), documents marked when `document_mask` is on."""
        eos_id = self.eos_id if self.document_mask else None
        return [Batch.from_window(window, eos_id) for window in self.next_step()]

    def next_step(self) -> list[torch.Tensor]:
        """This rank's `grad_accum` micro-batches for the next optimizer step, as packed windows."""
        micro_batches = []
        for _ in range(self.grad_accum):
            batch, local, stream_state, error = next(self._batches)
            if error is not None:
                raise ShardError(error)
            self.stream_states[local] = stream_state
            self.micro_batches += 1
            micro_batches.append(batch)
        return micro_batches

    def close(self) -> None:
        """Stops the worker processes (a closed loader yields nothing more)."""
        self._batches = iter(())  # torch's iterator, once unreferenced, tells its workers to finish
        forget(self)

    def state_dict(self) -> dict:
        """The position after the micro-batches handed out so far; with the other dp ranks', the `state=`
        of a loader that continues."""
        return {"streams": self.spec.n_streams, "micro_batches": self.micro_batches,
                "stream_states": dict(self.stream_states)}

    @property
    def skipped_shards(self) -> int:
        """Unreadable shards this rank's streams have passed over (on_error="skip")."""
        return sum(d["skipped"] for s in self.stream_states.values() for d in s["datasets"])

    @property
    def epoch(self) -> int:
        """The first dataset's epoch in the most advanced of this rank's streams."""
        return max((s["datasets"][0]["cursor"][0] for s in self.stream_states.values()), default=0)
