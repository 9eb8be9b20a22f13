"""Point-to-point exchange around a ring of ranks: send to the next rank, receive from the previous."""

from __future__ import annotations

import torch
import torch.distributed as dist


class RingComm:
    """Posts sends and receives together (`batch_isend_irecv`) so the caller can compute while they fly.

    Usage: `incoming = comm.exchange(tensors)`; compute; `comm.wait()`; only then read `incoming`.
    """

    def __init__(self, group: dist.ProcessGroup):
        self.group = group
        self.rank, self.world = dist.get_rank(group), dist.get_world_size(group)
        self.next = dist.get_global_rank(group, (self.rank + 1) % self.world)
        self.prev = dist.get_global_rank(group, (self.rank - 1) % self.world)
        self._pending: list[dist.Work] = []
        self._sending: list[torch.Tensor] = []  # kept alive until the sends complete

    def exchange(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        """Start sending `tensors` to the next rank; return buffers that receive the previous rank's."""
        assert not self._pending, "wait() for the last exchange first"
        incoming = [torch.empty_like(t) for t in tensors]
        self._sending = [t.contiguous() for t in tensors]
        ops = [dist.P2POp(dist.isend, t, self.next, self.group) for t in self._sending]
        ops += [dist.P2POp(dist.irecv, buf, self.prev, self.group) for buf in incoming]
        self._pending = dist.batch_isend_irecv(ops)
        return incoming

    def wait(self) -> None:
        for work in self._pending:
            work.wait()
        self._pending, self._sending = [], []
