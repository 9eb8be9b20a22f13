"""Count what this rank moves through torch.distributed's all-to-all, point-to-point and state collectives.

DeepSpeed's Ulysses all-to-all, our RingComm and LASP-2's state all-gather all end in these
functions, so one patch measures every method the same way.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch.distributed as dist


class CommCounter:
    def __init__(self) -> None:
        self.bytes_sent = 0
        """bytes this rank sent: all-to-all and point-to-point as posted; an all-gather as (P-1)
        copies of its input and a reduce-scatter as (P-1)/P of its input (ring algorithms)"""
        self.elements_gathered = 0
        """elements of every all-gather's output (P times each rank's input)"""
        self.elements_reduce_scattered = 0
        """elements of every reduce-scatter's input (P times each rank's output)"""


@contextlib.contextmanager
def count_bytes_sent() -> Iterator[CommCounter]:
    counter = CommCounter()
    all_to_all, batch_p2p = dist.all_to_all_single, dist.batch_isend_irecv
    all_gather, reduce_scatter = dist.all_gather_single, dist.reduce_scatter_single

    def counting_all_to_all(output, input, *args, **kwargs):
        world = dist.get_world_size(kwargs.get("group"))
        counter.bytes_sent += input.numel() * input.element_size() * (world - 1) // world  # own share stays
        return all_to_all(output, input, *args, **kwargs)

    def counting_batch_p2p(ops):
        counter.bytes_sent += sum(op.tensor.numel() * op.tensor.element_size() for op in ops if op.op is dist.isend)
        return batch_p2p(ops)

    def counting_all_gather(output, input, *args, **kwargs):
        counter.elements_gathered += output.numel()
        world = output.numel() // input.numel()
        counter.bytes_sent += (world - 1) * input.numel() * input.element_size()
        return all_gather(output, input, *args, **kwargs)

    def counting_reduce_scatter(output, input, *args, **kwargs):
        counter.elements_reduce_scattered += input.numel()
        world = input.numel() // output.numel()
        counter.bytes_sent += (world - 1) * output.numel() * input.element_size()
        return reduce_scatter(output, input, *args, **kwargs)

    dist.all_to_all_single, dist.batch_isend_irecv = counting_all_to_all, counting_batch_p2p
    dist.all_gather_single, dist.reduce_scatter_single = counting_all_gather, counting_reduce_scatter
    try:
        yield counter
    finally:
        dist.all_to_all_single, dist.batch_isend_irecv = all_to_all, batch_p2p
        dist.all_gather_single, dist.reduce_scatter_single = all_gather, reduce_scatter
