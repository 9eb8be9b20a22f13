"""A loader position saved under one layout, continued under another (issue #13).

The loader's state is per data stream (data/split.py: dp x max(workers, 1) streams), so what a
rank resumes from depends only on the stream count:

- Same stream count (any dp x workers giving it): stream g continues from old stream g's state,
  wherever rank and worker it now lives on; its windows are the ones the old stream would have made.
- Another stream count: the epochs the old streams are in are re-divided, per dataset.
  1. What is left: every old stream's unread rest of each epoch from its own epoch up to the
     most advanced stream's: the shard its cursor is in from that document and token on, then
     its later shards. The document under a cursor was partly trained on; it is continued from
     that token, not restarted, so each document is still read once, its tokens in order.
  2. Those pieces (at most one per shard and epoch) go round-robin to the new streams, epoch by
     epoch, in the order the epoch's shard permutation gives their shards.
  3. A new stream reads its pieces, then the round-robin split over the new stream count takes
     over from the first epoch no old stream had started. Streams finish an epoch at different
     times, as they always do (shards differ in size): a stream begins the next epoch when its
     own pieces are done, while others may still be reading theirs.
  Each dataset of a mixture is re-divided on its own; the mixture's draws continue from the
  most advanced old stream's window count, so no new stream redraws choices an old one made.
"""

from __future__ import annotations

from ithaca.data.split import Segment, shard_order, stream_segments
from ithaca.data.stream import Cursor, segment_rows, segments_from_rows


def state_for_layout(states: list[dict], *, dp: int, dp_rank: int, workers: int, n_shards: list[int], seed: int,
                     shuffle: bool) -> dict:
    """Rank `dp_rank`'s loader state in a run of `dp` ranks x max(workers, 1) streams, from `states`:
    every dp rank's `PackedLoader.state_dict()`, in dp-rank order, of the run that saved them.
    `n_shards`: each dataset's shard count. Raises ValueError if `states` is not such a list or
    holds positions for another number of datasets."""
    n_old = states[0]["streams"] if states else 0
    if not states or n_old % len(states) or any(s["streams"] != n_old for s in states):
        raise ValueError(f"state: want every dp rank's loader state_dict(), in dp-rank order; got {len(states)} "
                         f"states for {[s['streams'] for s in states]} streams")
    old = _old_streams(states, len(n_shards))
    per_rank = max(workers, 1)
    mine = range(dp_rank * per_rank, (dp_rank + 1) * per_rank)
    if n_old == dp * per_rank:
        new = [old[g] for g in mine]
    else:
        by_dataset = [_resplit_dataset([s["datasets"][i] for s in old], n_shards[i], n_old, dp * per_rank, seed,
                                       shuffle) for i in range(len(n_shards))]
        windows = max(s["windows"] for s in old)
        new = [{"windows": windows, "datasets": [d[g] for d in by_dataset]} for g in mine]
    # micro-batches each rank has consumed: the same step count spread over this run's dp ranks
    micro_batches = sum(s["micro_batches"] for s in states) // dp
    return {"streams": dp * per_rank, "micro_batches": micro_batches, "stream_states": dict(enumerate(new))}


def _old_streams(states: list[dict], n_datasets: int) -> list[dict]:
    """Every old stream's state by global index; a stream that never handed out a batch is at the start."""
    per_rank = states[0]["streams"] // len(states)
    fresh = {"windows": 0, "datasets": [{"cursor": [0, 0, 0, 0], "skipped": 0}] * n_datasets}
    old = [fresh] * states[0]["streams"]
    for rank, state in enumerate(states):
        for local, stream in state["stream_states"].items():  # keys are str after a JSON round trip
            old[rank * per_rank + int(local)] = stream
    wrong = [len(s["datasets"]) for s in old if len(s["datasets"]) != n_datasets]
    if wrong:
        raise ValueError(f"state: the data position is for {wrong[0]} data folder(s), this run reads {n_datasets}; "
                         "resume with the same data.path or data.mixture")
    return old


def _resplit_dataset(old: list[dict], n_shards: int, n_old: int, n_new: int, seed: int, shuffle: bool) -> list[dict]:
    """One dataset's stream states, old stream count -> new (the module docstring's rule)."""
    cursors = [Cursor(*s["cursor"]) for s in old]
    old_normal_from = max(s.get("normal_from", 0) for s in old)  # one value; absent before re-splits existed
    normal_from = max(max(c.epoch for c in cursors) + 1, old_normal_from)
    left: dict[int, list[Segment]] = {epoch: [] for epoch in range(min(c.epoch for c in cursors), normal_from)}
    for stream, (state, cursor) in enumerate(zip(old, cursors)):
        leftover = segments_from_rows(state.get("leftover", []))
        for epoch in range(cursor.epoch, normal_from):
            segments = stream_segments(n_shards, n_old, stream, epoch, seed, shuffle, leftover=leftover,
                                       normal_from=old_normal_from)
            if epoch == cursor.epoch:  # read up to the cursor, which continues its document from its token
                segments = [Segment(segments[cursor.shard].shard, cursor.doc, cursor.offset),
                            *segments[cursor.shard + 1:]]
            left[epoch] += segments
    leftovers: list[dict[int, list[Segment]]] = [{} for _ in range(n_new)]
    dealt = 0
    for epoch, segments in left.items():
        position = {shard: i for i, shard in enumerate(shard_order(n_shards, epoch, seed, shuffle).tolist())}
        assert len({s.shard for s in segments}) == len(segments), f"two streams hold one shard in epoch {epoch}"
        for segment in sorted(segments, key=lambda s: position[s.shard]):
            leftovers[dealt % n_new].setdefault(epoch, []).append(segment)
            dealt += 1
    skipped = sum(s["skipped"] for s in old)  # kept whole on new stream 0: the run's count stays the same
    return [{"cursor": _first_cursor(leftover, normal_from), "skipped": skipped if stream == 0 else 0,
             "leftover": segment_rows(leftover), "normal_from": normal_from}
            for stream, leftover in enumerate(leftovers)]


def _first_cursor(leftover: dict[int, list[Segment]], normal_from: int) -> list[int]:
    if not leftover:
        return [normal_from, 0, 0, 0]
    epoch = min(leftover)
    first = leftover[epoch][0]
    return [epoch, 0, first.doc, first.offset]
