"""The short causal depthwise convolution of a sequence split over sequence-parallel ranks.

Gated DeltaNet convolves q/k/v inputs along the sequence with a kernel of K taps (K = 4 typically):
out[t] = bias + sum_{d<K} w[:, K-1-d] * x[t-d], with x = 0 before the sequence and before the
document holding t. Each rank holds whole pieces of the sequence (`piece_order`: one piece
contiguous, two under a zigzag ring, two under USP), so a piece's first K-1 outputs need the last
K-1 tokens of the previous piece in sequence order: its halo. The halo comes point to point from
the rank holding that piece (or is copied, when this rank holds it, as at a zigzag ring's middle);
backward sends the halo's gradient back to its owner, which adds it to its tokens' gradient.
Each piece is then convolved with its halo as the prefix by the one-device op
(ithaca.kernels.causal_conv1d), so the two cannot disagree.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from ithaca.kernels.causal_conv1d import causal_conv1d
from ithaca.parallel.sequence_layout import piece_order


@dataclass(frozen=True)
class _Hop:
    """Piece `piece - 1`'s tail goes from (src rank, its local piece) to (dst rank, its local piece)."""

    piece: int
    src: int
    src_local: int
    dst: int
    dst_local: int


def _hops(world: int, ring: int) -> list[_Hop]:
    """Every halo transfer of the layout, by the receiving piece's global index: every rank walks
    the same list, so all post their sends and receives in one order."""
    owner = {}  # global piece -> (group rank, local index)
    for r in range(world):
        for i, piece in enumerate(piece_order(sp_rank=r, sp=world, ring=ring)[0]):
            owner[piece] = (r, i)
    return [_Hop(g, *owner[g - 1], *owner[g]) for g in range(1, len(owner))]


def _pass_halos(tails: torch.Tensor, group: dist.ProcessGroup, ring: int, *, backward: bool) -> torch.Tensor:
    """Forward: halos[:, i] = the tail of the piece before local piece i (zero for the first piece).
    Backward (`backward=True`): the same hops reversed, the halo gradients going home to their tails.

    tails: [b, pieces, K-1, ...] this rank's local pieces' tails (or halo gradients). Returns the same shape.
    """
    rank = dist.get_rank(group)
    out = torch.zeros_like(tails)
    ops, receives = [], []  # receives: (local piece, buffer); a strided view of `out` would not be written through
    for hop in _hops(dist.get_world_size(group), ring):
        src, src_local, dst, dst_local = hop.src, hop.src_local, hop.dst, hop.dst_local
        if backward:
            src, src_local, dst, dst_local = dst, dst_local, src, src_local
        if src == rank and dst == rank:
            out[:, dst_local] = tails[:, src_local]
        elif src == rank:
            ops.append(dist.P2POp(dist.isend, tails[:, src_local].contiguous(), dist.get_global_rank(group, dst),
                                  group, hop.piece))
        elif dst == rank:
            receives.append((dst_local, tails.new_empty(tails[:, dst_local].shape)))
            ops.append(dist.P2POp(dist.irecv, receives[-1][1], dist.get_global_rank(group, src), group, hop.piece))
    if ops:
        # one batch: NCCL runs it as a group, so no send waits on a receive posted later
        for work in dist.batch_isend_irecv(ops):
            work.wait()
    for i, buffer in receives:
        out[:, i] = buffer
    return out


class _Halos(torch.autograd.Function):
    """Forward: point-to-point send of each piece's last K-1 tokens to the rank holding the next
    piece; backward: the halo gradients sent back the other way, to be added to those tokens'."""

    @staticmethod
    def forward(ctx, tails: torch.Tensor, group: dist.ProcessGroup, ring: int) -> torch.Tensor:
        ctx.group, ctx.ring = group, ring
        return _pass_halos(tails, group, ring, backward=False)

    @staticmethod
    def backward(ctx, d_halos: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        return _pass_halos(d_halos.contiguous(), ctx.group, ctx.ring, backward=True), None, None


def sequence_parallel_causal_conv1d(x: torch.Tensor, weight: torch.Tensor, group: dist.ProcessGroup, *,
                                    resets: torch.Tensor | None = None, ring: int = 1,
                                    bias: torch.Tensor | None = None) -> torch.Tensor:
    """This rank's part of the causal depthwise convolution of the whole sequence.

    x: [b, s, c], this rank's part in its layout's piece order (`sequence_part`); weight: [c, K]
    (torch's depthwise `conv1d(groups=c)` weight squeezed, last tap on the current token);
    resets: [b, s] bool, True at each document's first token (a window never reads an earlier
    document); bias: [c]. Returns [b, s, c], equal to the single-process convolution's part,
    with gradients for x, weight and bias. Communication: each piece sends b*(K-1)*c elements to
    the rank holding the next piece forward (plus b*(K-1) fp32 reset flags when `resets` is given), and
    as many gradients come back backward. Raises ValueError on shapes that do not fit, or pieces
    shorter than K-1 tokens.
    """
    b, s, c = x.shape
    if weight.dim() != 2 or weight.shape[0] != c:
        raise ValueError(f"sequence_parallel_causal_conv1d: weight {tuple(weight.shape)} must be [c={c}, K]")
    if resets is not None and resets.shape != (b, s):
        raise ValueError(f"sequence_parallel_causal_conv1d: resets {tuple(resets.shape)} must be [b, s] = {(b, s)}")
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    if world % ring:
        raise ValueError(f"sequence_parallel_causal_conv1d: ring={ring} must divide the group size {world}")
    mine, _ = piece_order(sp_rank=rank, sp=world, ring=ring)
    pieces, kernel = len(mine), weight.shape[1]
    halo = kernel - 1
    if s % pieces or s // pieces < halo:
        raise ValueError(f"sequence_parallel_causal_conv1d: local length {s} must split into {pieces} pieces of at "
                         f"least K-1={halo} tokens each; use a longer sequence or fewer ranks")
    length = s // pieces
    x_pieces = x.reshape(b, pieces, length, c)  # [b, pieces, L, c]
    halos = _Halos.apply(x_pieces[:, :, length - halo:], group, ring)  # [b, pieces, K-1, c]
    r_pieces = r_halo = None
    if resets is not None:
        r_pieces = resets.reshape(b, pieces, length)
        # the halo's reset flags decide whether a document starts inside the window's halo part
        r_halo = _pass_halos(r_pieces[:, :, length - halo:].float().contiguous(), group, ring, backward=False)
    out = causal_conv1d(x_pieces, weight, resets=r_pieces, bias=bias, prefix=halos, prefix_resets=r_halo)
    return out.reshape(b, s, c)
