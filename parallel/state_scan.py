"""The point-to-point state scan that replaces the all-gather of LASP-2 and of the delta-rule
layers (ZeCO's idea, arXiv:2507.01004, Sec. 3, there for diagonal decay only).

The sequence is cut into n pieces, each held by one rank (a rank may hold several: see
sequence_layout.piece_order). Piece p alone gives a memory M_p and a carry A_p: the state the piece
hands on from a zero start, and what it does to a state it receives. The carry is one of two kinds,

    scalar  a_p [b, h]            linear attention (kernels/linear_attention chunk_memory): how much
                                  of an entering state survives the piece
    matrix  A_p [b, h, d_k, d_k]  delta rules (kernels/delta_rule delta_rule_transition)

and either is 0 when a document starts inside the piece, so the fold below cuts the carried state
there. The state entering piece p is a prefix scan in sequence order,

    S_0 = 0,    S_{p+1} = A_p S_p + M_p        (a_p S_p for a scalar carry),

so the owner of piece p receives S_p from the owner of piece p-1, folds, and sends S_{p+1} to the
owner of piece p+1 (a local hand-over when it holds p+1 too). Backward runs the adjoint scan the
other way: with G_p the loss's total gradient in S_p and D_p the piece's own (through its outputs),

    G_{n-1} = D_{n-1},    G_p = D_p + A_p^T G_{p+1},    dM_p = G_{p+1},    dA_p = G_{p+1} S_p^T
    (scalar: G_p = D_p + a_p G_{p+1},  da_p = <G_{p+1}, S_p>).

Layouts: contiguous (piece t on rank t) is a chain up the ranks. Zigzag (rank r holds pieces r
and 2P-1-r) goes up the ranks over the first pieces, hands piece P-1 to P inside rank P-1, and
comes back down over the second pieces; USP's pieces follow the same rule. Either way a rank sends
at most one b*h*d_k*d_v fp32 state per piece it holds, per direction, whatever P.

Column blocks: a scalar carry is one number per (batch row, head) for every decay kind (none: 1;
fixed per head, "retention": exp(C g_h); per-token gates: exp of the piece's summed log gates; 0
after a reset), and a matrix carry acts on the d_k side (rows) only, so either way the fold acts on
each d_v column of S alone and S splits into independent d_v blocks: block i of S_{p+1} is
A_p (block i of S_p) + block i of M_p. Each block is its own message: block i+1 is on the wire
while block i is folded and sent on. Only states travel, never the carries: a matrix carry is as
large as a state (d_k x d_k), but it stays with the rank that computed it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from ithaca.parallel.sequence_layout import piece_order

SCAN_BLOCKS = 4
"""d_v blocks of the scanned state: enough that one is on the wire while another is folded, few
enough that each message (b*h*d_k*d_v/4 fp32) stays large next to a message's fixed cost."""


@dataclass(frozen=True)
class ScanPlan:
    """Who holds which piece: `mine` this rank's global piece indices in its local order, `owner[p]`
    the group rank holding piece p (len(owner) = n pieces), `blocks` the d_v blocks of a state."""

    mine: list[int]
    owner: list[int]
    blocks: int

    @classmethod
    def of_layout(cls, *, sp_rank: int, sp: int, ring: int, d_v: int) -> ScanPlan:
        """The plan of `sequence_part(..., ring=ring)`'s layout (piece_order), SCAN_BLOCKS blocks (at most d_v)."""
        order = [piece_order(sp_rank=r, sp=sp, ring=ring)[0] for r in range(sp)]
        owner = {piece: r for r, pieces in enumerate(order) for piece in pieces}
        return cls(mine=order[sp_rank], owner=[owner[p] for p in range(len(owner))], blocks=min(SCAN_BLOCKS, d_v))

    def tag(self, piece: int, block: int) -> int:
        """The message tag of block `block` of the state (or gradient) bound for piece `piece`."""
        return piece * self.blocks + block

    def in_sequence_order(self) -> list[int]:
        """Local indices of this rank's pieces, earliest in the sequence first."""
        return sorted(range(len(self.mine)), key=self.mine.__getitem__)


def _post(op, tensor: torch.Tensor, peer: int, group: dist.ProcessGroup, tag: int) -> dist.Work:
    """One isend/irecv through batch_isend_irecv (so bench/comm_counter.py sees it); `peer` is a group rank."""
    return dist.batch_isend_irecv([dist.P2POp(op, tensor, dist.get_global_rank(group, peer), group, tag)])[0]


def _apply_carry(carry: torch.Tensor, state: torch.Tensor, *, transposed: bool = False) -> torch.Tensor:
    """A S for one piece: carry [b, h] (scalar) or [b, h, d_k, d_k] (matrix), state [b, h, d_k, cols];
    `transposed` applies A^T (the adjoint scan's step; a scalar is its own transpose)."""
    if carry.dim() == state.dim() - 2:
        return carry[..., None, None] * state
    return (carry.transpose(-1, -2) if transposed else carry) @ state


def _carry_grad(carries: torch.Tensor, later: torch.Tensor, states: torch.Tensor) -> torch.Tensor:
    """dA_p = G_{p+1} S_p^T (matrix carries) or da_p = <G_{p+1}, S_p> (scalar), every d_v block at once:
    later (G_{p+1}) and states (S_p) [pieces, b, h, d_k, d_v] -> carries' shape."""
    if carries.dim() == states.dim() - 2:
        return (later * states).sum(dim=(-2, -1))  # [pieces, b, h]
    return later @ states.transpose(-1, -2)  # [pieces, b, h, d_k, d_k]: the sum over d_v spans all blocks


def _block_edges(d_v: int, blocks: int) -> list[slice]:
    edges = [d_v * i // blocks for i in range(blocks + 1)]
    return [slice(edges[i], edges[i + 1]) for i in range(blocks)]


class PendingScan:
    """The receives of the states entering this rank's pieces, posted before the pieces' own outputs
    are computed so the transfers land meanwhile. Owns `incoming` [pieces, b, h, d_k, d_v] fp32
    (zeros for piece 0); `_ScanStates` waits on a block's receive before reading that block."""

    def __init__(self, memories: torch.Tensor, group: dist.ProcessGroup, plan: ScanPlan) -> None:
        rank = dist.get_rank(group)
        self.plan, self.cuts = plan, _block_edges(memories.shape[-1], plan.blocks)
        self.incoming = memories.new_zeros(memories.shape, dtype=torch.float32)
        self.receives: dict[tuple[int, int], tuple[torch.Tensor, dist.Work]] = {}
        for j in plan.in_sequence_order():  # the senders' order: backends without tags (NCCL) match by it
            piece = plan.mine[j]
            if piece > 0 and plan.owner[piece - 1] != rank:
                for i, cols in enumerate(self.cuts):  # contiguous buffers: a column slice of S is strided
                    buf = self.incoming.new_empty(self.incoming[j, ..., cols].shape)
                    self.receives[j, i] = buf, _post(dist.irecv, buf, plan.owner[piece - 1], group, plan.tag(piece, i))

    def is_waiting(self) -> bool:
        """Whether any piece of this rank waits on another rank's state."""
        return bool(self.receives)

    def arrived(self, j: int, i: int) -> torch.Tensor:
        """Block i of the state entering local piece j, from another rank, once it is here."""
        buf, work = self.receives.pop((j, i))
        work.wait()  # guards buf, block i of S_p
        return buf


class _ScanStates(torch.autograd.Function):
    """The states entering this rank's pieces, S_p, from every earlier piece's (M, A), A scalar or matrix.
    forward:  per piece in sequence order, per d_v block: receive S_p from the owner of p-1 (or take
              it from this rank's previous piece), send A_p S_p + M_p to the owner of p+1
    backward: per piece in reverse, per d_v block: receive G_{p+1} from the owner of p+1, send
              G_p = dS_p + A_p^T G_{p+1} to the owner of p-1
    A rank sends b*h*d_k*d_v fp32 elements per piece whose neighbour is on another rank, each way.
    """

    @staticmethod
    def forward(ctx, memories: torch.Tensor, carries: torch.Tensor, pending: PendingScan,
                group: dist.ProcessGroup) -> torch.Tensor:
        rank, plan, incoming = dist.get_rank(group), pending.plan, pending.incoming
        local = {piece: j for j, piece in enumerate(plan.mine)}
        outgoing = torch.empty_like(incoming)  # S_{p+1} of each local piece, for a local hand-over
        sends = []
        for j in plan.in_sequence_order():
            piece = plan.mine[j]
            for i, cols in enumerate(pending.cuts):
                if (j, i) in pending.receives:  # later blocks are still arriving while this one is folded
                    incoming[j, ..., cols] = pending.arrived(j, i)
                elif piece > 0:  # this rank holds piece p-1 too, already folded (sequence order)
                    incoming[j, ..., cols] = outgoing[local[piece - 1], ..., cols]
                outgoing[j, ..., cols] = _apply_carry(carries[j], incoming[j, ..., cols]) + memories[j, ..., cols]
                if piece + 1 < len(plan.owner) and plan.owner[piece + 1] != rank:
                    block = outgoing[j, ..., cols].contiguous()
                    peer = plan.owner[piece + 1]
                    sends.append((block, _post(dist.isend, block, peer, group, plan.tag(piece + 1, i))))
        for _, work in sends:
            work.wait()  # the sent blocks must stay alive until sent
        ctx.save_for_backward(carries, incoming)
        ctx.group, ctx.plan, ctx.cuts = group, plan, pending.cuts
        return incoming.clone()

    @staticmethod
    def backward(ctx, d_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None, None]:
        carries, states = ctx.saved_tensors
        group, plan = ctx.group, ctx.plan
        rank, n = dist.get_rank(group), len(plan.owner)
        local = {piece: j for j, piece in enumerate(plan.mine)}
        later = torch.zeros_like(states)  # G_{p+1} of each local piece; 0 after the last piece
        totals = torch.empty_like(states)  # G_p
        receives = {}
        for j in reversed(plan.in_sequence_order()):  # the senders' order, as in PendingScan
            piece = plan.mine[j]
            if piece + 1 < n and plan.owner[piece + 1] != rank:
                for i, cols in enumerate(ctx.cuts):
                    buf = states.new_empty(states[j, ..., cols].shape)
                    receives[j, i] = buf, _post(dist.irecv, buf, plan.owner[piece + 1], group, plan.tag(piece, i))
        sends = []
        for j in reversed(plan.in_sequence_order()):
            piece = plan.mine[j]
            for i, cols in enumerate(ctx.cuts):
                if (j, i) in receives:
                    buf, work = receives[j, i]
                    work.wait()  # guards buf, block i of G_{p+1}
                    later[j, ..., cols] = buf
                elif piece + 1 < n:  # this rank holds piece p+1 too, already done (reverse order)
                    later[j, ..., cols] = totals[local[piece + 1], ..., cols]
                totals[j, ..., cols] = d_states[j, ..., cols] + _apply_carry(carries[j], later[j, ..., cols],
                                                                             transposed=True)
                if piece > 0 and plan.owner[piece - 1] != rank:
                    block = totals[j, ..., cols].contiguous()
                    peer = plan.owner[piece - 1]
                    sends.append((block, _post(dist.isend, block, peer, group, plan.tag(piece - 1, i))))
        for _, work in sends:
            work.wait()  # the sent blocks must stay alive until sent
        # dM_p = G_{p+1}; pending and group take no gradient
        return later, _carry_grad(carries, later, states), None, None


def scan_states(memories: torch.Tensor, carries: torch.Tensor, pending: PendingScan,
                group: dist.ProcessGroup) -> torch.Tensor:
    """Differentiable prefix scan over the pieces of the sequence, in sequence order: memories
    [pieces, b, h, d_k, d_v] and carries, [pieces, b, h] (scalar) or [pieces, b, h, d_k, d_k]
    (matrix), fp32, of this rank's pieces -> the states entering them, [pieces, b, h, d_k, d_v] fp32
    (S_{p+1} = A_p S_p + M_p, module docstring).

    `pending` (PendingScan(memories, group, plan)) holds the receives, posted earlier so the
    transfers overlap the caller's compute. Communication: point-to-point with the ranks holding
    the neighbouring pieces only, b*h*d_k*d_v fp32 elements per piece whose neighbour is on another
    rank, each way; the carries never leave the rank.
    """
    return _ScanStates.apply(memories, carries, pending, group)
