"""The differentiable all-gather LASP-2 uses for its memory states."""

from __future__ import annotations

import torch
import torch.distributed as dist


class _GatherStates(torch.autograd.Function):
    """Stack each rank's tensor on a new leading axis of size P (LASP-2's memory states).
    forward:  all-gather      x [*] -> y [P, *]    each rank sends numel(x) elements
    backward: reduce-scatter  dy [P, *] -> dx [*]  rank r receives the sum over ranks of dy[r]
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
        ctx.group = group
        world = dist.get_world_size(group)
        y = x.new_empty(world * x.numel())  # flat: gloo rejects a stacked [P, *] output
        dist.all_gather_single(y, x.reshape(-1).contiguous(), group=group)
        return y.view(world, *x.shape)

    @staticmethod
    def backward(ctx, dy: torch.Tensor) -> tuple[torch.Tensor, None]:
        dx = dy.new_empty(dy[0].numel())
        dist.reduce_scatter_single(dx, dy.reshape(-1).contiguous(), group=ctx.group)
        return dx.view(dy.shape[1:]), None  # one entry per forward input; group has none


def gather_states(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """Differentiable all-gather: [*] on each rank -> [P, *] on every rank."""
    return _GatherStates.apply(x, group)
