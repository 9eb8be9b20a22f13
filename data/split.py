"""Which shards each data stream reads in each epoch, and in which order their documents come.

A run reads its data as S = dp x workers streams: data-parallel rank r's dataloader worker w is
stream r * workers + w (data-parallel ranks already span the nodes, so nodes are split too).
Tensor- and sequence-parallel ranks of one replica share a dp rank, so they read the same stream
and get the same samples. Each epoch the shards are permuted by (seed, epoch) and dealt out
round-robin: stream s reads shards order[s], order[s + S], ... so within an epoch every shard,
hence every document, is read by exactly one stream. Documents inside a shard are permuted by
(seed, epoch, shard).

A run resumed with another stream count first reads what the old streams left of their epochs
(data/resplit.py): each new stream then holds, for those epochs, a list of `Segment`s, and the
round-robin split above applies from epoch `normal_from` on.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

_SHARDS, _DOCUMENTS = 0, 1  # keep the two permutations' random streams apart


@dataclass(frozen=True)
class Segment:
    """A shard read from document `doc` (index in the epoch's reading order), token `offset`, to its end."""

    shard: int
    doc: int = 0
    offset: int = 0


def shard_order(n_shards: int, epoch: int, seed: int, shuffle: bool) -> np.ndarray:
    """All shard indices in the order `epoch` deals them out."""
    return np.random.default_rng([seed, epoch, _SHARDS]).permutation(n_shards) if shuffle else np.arange(n_shards)


def stream_shards(n_shards: int, n_streams: int, stream: int, epoch: int, seed: int, shuffle: bool) -> list[int]:
    """Indices of the shards `stream` reads in `epoch`, in reading order."""
    return shard_order(n_shards, epoch, seed, shuffle)[stream::n_streams].tolist()


def stream_segments(n_shards: int, n_streams: int, stream: int, epoch: int, seed: int, shuffle: bool, *,
                    leftover: dict[int, list[Segment]], normal_from: int) -> list[Segment]:
    """What `stream` reads in `epoch`: before `normal_from` its `leftover` of a re-split (data/resplit.py),
    from then on whole shards by the round-robin split."""
    if epoch < normal_from:
        return leftover.get(epoch, [])
    return [Segment(s) for s in stream_shards(n_shards, n_streams, stream, epoch, seed, shuffle)]


def document_order(n_documents: int, shard: int, epoch: int, seed: int, shuffle: bool) -> np.ndarray:
    """The order in which shard `shard`'s documents are read in `epoch`."""
    if not shuffle:
        return np.arange(n_documents)
    return np.random.default_rng([seed, epoch, shard, _DOCUMENTS]).permutation(n_documents)
