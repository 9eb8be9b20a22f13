"""The differentiable all-gather LASP-2 uses for its memory states."""

from __future__ import annotations

import torch
import torch.distributed as dist


class PendingGather:
    """A started all-gather: `wait()` before reading the tensor it fills."""

    def __init__(self) -> None:
        self.work: dist.Work | None = None

    def wait(self) -> None:
        if self.work is not None:
            self.work.wait()
            self.work = None


class _GatherStates(torch.autograd.Function):
    """Stack each rank's tensor on a new leading axis of size P (LASP-2's memory states).
    forward:  all-gather      x [*] -> y [P, *]    each rank sends numel(x) elements
    backward: reduce-scatter  dy [P, *] -> dx [*]  rank r receives the sum over ranks of dy[r]
    With `pending`, the forward only starts the all-gather; the caller computes, then waits.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: dist.ProcessGroup, pending: PendingGather | None) -> torch.Tensor:
        ctx.group = group
        world = dist.get_world_size(group)
        y = x.new_empty(world * x.numel())  # flat: gloo rejects a stacked [P, *] output
        work = dist.all_gather_single(y, x.reshape(-1).contiguous(), group=group, async_op=pending is not None)
        if pending is not None:
            pending.work = work
        ctx.shape = x.shape
        # flat, not a view: an async gather may still write into it after forward returns
        return y

    @staticmethod
    def backward(ctx, dy: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        dx = dy.new_empty(ctx.shape.numel())
        dist.reduce_scatter_single(dx, dy.contiguous(), group=ctx.group)
        return dx.view(ctx.shape), None, None  # one entry per forward input; group and pending have none


def gather_states(x: torch.Tensor, group: dist.ProcessGroup, pending: PendingGather | None = None) -> torch.Tensor:
    """Differentiable all-gather: [*] on each rank -> [P, *] on every rank.

    Given `pending`, returns at once while the gather runs; call `pending.wait()` before reading.
    """
    return _GatherStates.apply(x, group, pending).view(dist.get_world_size(group), *x.shape)
