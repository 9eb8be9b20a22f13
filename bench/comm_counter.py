"""Count the bytes this rank sends through torch.distributed's all-to-all and point-to-point calls.

DeepSpeed's Ulysses all-to-all and our RingComm both end in these two functions, so one patch
measures every method the same way.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch.distributed as dist


class CommCounter:
    def __init__(self) -> None:
        self.bytes_sent = 0


@contextlib.contextmanager
def count_bytes_sent() -> Iterator[CommCounter]:
    counter = CommCounter()
    all_to_all, batch_p2p = dist.all_to_all_single, dist.batch_isend_irecv

    def counting_all_to_all(output, input, *args, **kwargs):
        world = dist.get_world_size(kwargs.get("group"))
        counter.bytes_sent += input.numel() * input.element_size() * (world - 1) // world  # own share stays
        return all_to_all(output, input, *args, **kwargs)

    def counting_batch_p2p(ops):
        counter.bytes_sent += sum(op.tensor.numel() * op.tensor.element_size() for op in ops if op.op is dist.isend)
        return batch_p2p(ops)

    dist.all_to_all_single, dist.batch_isend_irecv = counting_all_to_all, counting_batch_p2p
    try:
        yield counter
    finally:
        dist.all_to_all_single, dist.batch_isend_irecv = all_to_all, batch_p2p
