"""Which shards each data stream reads in each epoch, and in which order their documents come.

A run reads its data as S = dp x workers streams: data-parallel rank r's dataloader worker w is
stream r * workers + w (data-parallel ranks already span the nodes, so nodes are split too).
Tensor- and sequence-parallel ranks of one replica share a dp rank, so they read the same stream
and get the same samples. Each epoch the shards are permuted by (seed, epoch) and dealt out
round-robin: stream s reads shards order[s], order[s + S], ... so within an epoch every shard,
hence every document, is read by exactly one stream. Documents inside a shard are permuted by
(seed, epoch, shard).
"""

from __future__ import annotations

import numpy as np

_SHARDS, _DOCUMENTS = 0, 1  # keep the two permutations' random streams apart


def stream_shards(n_shards: int, n_streams: int, stream: int, epoch: int, seed: int, shuffle: bool) -> list[int]:
    """Indices of the shards `stream` reads in `epoch`, in reading order."""
    order = np.random.default_rng([seed, epoch, _SHARDS]).permutation(n_shards) if shuffle else np.arange(n_shards)
    return order[stream::n_streams].tolist()


def document_order(n_documents: int, shard: int, epoch: int, seed: int, shuffle: bool) -> np.ndarray:
    """The order in which shard `shard`'s documents are read in `epoch`."""
    if not shuffle:
        return np.arange(n_documents)
    return np.random.default_rng([seed, epoch, shard, _DOCUMENTS]).permutation(n_documents)
