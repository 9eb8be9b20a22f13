"""Sequence parallelism for delta-rule layers (DeltaNet, Gated DeltaNet): the pieces' transition
pairs all-gathered, or only the states scanned point to point (issue #15).

Each rank holds whole pieces of the sequence (`piece_order`: one piece contiguous, two under ring
attention's zigzag layout). The delta rule is affine in the state it receives, and each column of
the state evolves alone (a key mixes a column's rows, never two columns). So one `delta_rule` call on a piece with value
columns [V | 0] from the state [0 | I] (d_v + d_k columns) gives everything the piece needs:

    outputs   [O_0 | R]   O_0 the piece's output from a zero state, R [C, d_k] how its outputs
                          read the entering state: o = O_0 + R S_in
    final     [B | A]     the transition S_out = A S_in + B (A exactly zero once a document
                          starts in the piece)

The state entering piece p is the prefix in sequence order

    S_0 = 0,   S_{p+1} = A_p S_p + B_p,

and the piece's output is O_0 + R S_p: the chunk factors are computed once, before any
communication, and what waits for the exchange is one [C, d_k] x [d_k, d_v] product. The
local pass costs one chunked delta rule on d_v + d_k value columns. Two exchanges form S_p:

  allgather  one all-gather of every piece's (A_p, B_p); each rank composes the pieces before its
             own. Backward is autograd through the composition; the all-gather's backward (one
             reduce-scatter) returns the gradients of (A, B) to the ranks that computed them.
             Per layer and direction: P * pieces * b * h * d_k * (d_k + d_v) fp32 elements, growing with P.
  scan       parallel/state_scan.py with a matrix carry: the owner of piece p receives S_p from the
             owner of p-1, folds A_p S_p + B_p and sends it to the owner of p+1, in d_v column
             blocks (A acts on the d_k side, so columns are independent); backward scans
             G_p = dS_p + A_p^T G_{p+1} the other way. A and B never leave their rank: per layer
             and direction a rank sends one b * h * d_k * d_v fp32 state per piece whose
             neighbour in the sequence is on another rank (at most 2 per piece, 1 at P = 2
             contiguous), whatever P. The price is latency: the chain visits the pieces one
             after another (2P hops zigzag), each hop a d_k x d_k by d_k x d_v product,
             before the last piece's correction R S_p can be added.

Neither depends on the sequence length.
"""

from __future__ import annotations


import torch
import torch.distributed as dist

from ithaca.kernels.delta_rule import DeltaRuleImpl, delta_rule
from ithaca.kernels.linear_attention import check_linear_attention_inputs
from ithaca.parallel.gather import gather_states
from ithaca.parallel.sequence_layout import StateExchange, piece_order
from ithaca.parallel.state_scan import PendingScan, ScanPlan, scan_states


def _entering_state(a: torch.Tensor, b: torch.Tensor, piece: int) -> torch.Tensor:
    """a [n, b, h, d_k, d_k], b [n, b, h, d_k, d_v] in sequence order -> the state entering `piece`.

    Starts from 0 * b[0], not a fresh zero tensor: the first piece's state is then still in the
    all-gather's graph, whose backward is a collective every rank must join.
    """
    state = 0 * b[0]
    for p in range(piece):
        state = a[p] @ state + b[p]  # S_{p+1} = A_p S_p + B_p
    return state


def _local_pass(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, beta: torch.Tensor,
                log_decay: torch.Tensor | None, scale: float | None, resets: torch.Tensor | None,
                impl: DeltaRuleImpl) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One piece alone (module docstring) -> (O_0 [b, C, h, d_v] and R [b, C, h, d_k] in q's dtype,
    A [b, h, d_k, d_k] and B [b, h, d_k, d_v] fp32), from one delta_rule call on d_v + d_k columns."""
    b, c, h, d_k = k.shape
    d_v = v.shape[-1]
    identity = torch.eye(d_k, device=k.device).expand(b, h, d_k, d_k)
    start = torch.cat([identity.new_zeros(b, h, d_k, d_v), identity], dim=-1)  # [0 | I]
    out, final = delta_rule(q, k, torch.cat([v, v.new_zeros(b, c, h, d_k)], dim=-1), beta, log_decay=log_decay,
                            scale=scale, resets=resets, initial_state=start, output_final_state=True, impl=impl)
    zero_start, reads = out.split([d_v, d_k], dim=-1)
    offset, transition = final.split([d_v, d_k], dim=-1)
    return zero_start, reads, transition, offset


def delta_rule_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, beta: torch.Tensor,
                         group: dist.ProcessGroup, *, log_decay: torch.Tensor | None = None,
                         scale: float | None = None, resets: torch.Tensor | None = None, ring: int = 1,
                         impl: DeltaRuleImpl = "auto",
                         exchange: StateExchange = "allgather") -> torch.Tensor:
    """The gated delta rule (ithaca.kernels.delta_rule.delta_rule) over a sequence split across `group`.

    q, k [b, s, h, d_k] and v [b, s, h, d_v]: this rank's part, contiguous by default (rank t
    holds positions [t*s, (t+1)*s)); with `ring` > 1, the layout of `sequence_part(..., ring=ring)`
    (ring=P: ring attention's zigzag). beta [b, s, h]; `log_decay` (<= 0) is None, [h] or
    [b, s, h] (this rank's part); `scale` defaults to d_k^-0.5; `resets` [b, s] bool marks tokens
    that start a document. Keys L2-normalised and beta in (0, 1) keep the recurrence stable (not
    checked). `impl` picks the local computation. Returns o [b, s, h, d_v] in q's dtype; gradients
    reach q, k, v, beta and log_decay.
    Communication (pieces = 1 per rank contiguous, 2 under a zigzag layout), per call:
    `exchange="allgather"`: one all-gather of P * pieces * b * h * d_k * (d_k + d_v) fp32 elements
    forward, one reduce-scatter of as many backward.
    `exchange="scan"`: point to point with the ranks holding the neighbouring pieces only; a rank
    sends b * h * d_k * d_v fp32 elements per piece whose successor is on another rank forward, and
    as many per piece whose predecessor is backward (at most 2 * pieces states in all), whatever P.
    Raises ValueError on shapes that do not fit, a ring not dividing P, or an exchange other than
    "allgather" and "scan".
    """
    check_linear_attention_inputs("delta_rule_attention", q, k, v, log_decay, resets)
    if tuple(beta.shape) != tuple(q.shape[:3]) or not beta.dtype.is_floating_point:
        raise ValueError(f"delta_rule_attention: beta must be [b, s, h]={tuple(q.shape[:3])} floating; "
                         f"got {tuple(beta.shape)} {beta.dtype}")
    if exchange not in ("allgather", "scan"):
        raise ValueError(f"delta_rule_attention: exchange={exchange!r}; choose 'allgather' or 'scan'")
    s, d_k = q.shape[1], q.shape[3]
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    if world % ring or (ring > 1 and s % 2):
        raise ValueError(f"delta_rule_attention: ring={ring} must divide the group size {world}, and a zigzag "
                         f"part must split in two (local length {s})")
    mine, n_pieces = piece_order(sp_rank=rank, sp=world, ring=ring)
    size = s // len(mine)
    parts = [slice(i * size, (i + 1) * size) for i in range(len(mine))]

    def piece(t: torch.Tensor | None, part: slice) -> torch.Tensor | None:
        """This piece of a per-token tensor; None and a per-head [h] decay pass whole."""
        return t if t is None or t.dim() == 1 else t[:, part]

    passes = [_local_pass(q[:, part], k[:, part], v[:, part], beta[:, part], piece(log_decay, part), scale,
                          piece(resets, part), impl) for part in parts]
    if exchange == "scan":
        plan = ScanPlan.of_layout(sp_rank=rank, sp=world, ring=ring, d_v=v.shape[-1])
        offsets = torch.stack([p[3] for p in passes])  # B_p [pieces, b, h, d_k, d_v]: the memories
        transitions = torch.stack([p[2] for p in passes])  # A_p [pieces, b, h, d_k, d_k]: matrix carries
        # every rank's scan stays in the graph, piece 0's zero state too: its backward passes the gradient on
        entering = list(scan_states(offsets, transitions, PendingScan(offsets, group, plan), group))
    else:
        packs = torch.stack([torch.cat([p[2], p[3]], dim=-1) for p in passes])  # [pieces, b, h, d_k, d_k + d_v]
        gathered = gather_states(packs, group)  # [P, pieces per rank, b, h, d_k, d_k + d_v]
        order = [piece_order(sp_rank=r, sp=world, ring=ring)[0] for r in range(world)]
        position = {p: (r, i) for r, pieces in enumerate(order) for i, p in enumerate(pieces)}
        in_order = torch.stack([gathered[position[p]] for p in range(n_pieces)])  # [n, b, h, d_k, d_k + d_v]
        a, b = in_order.split([d_k, v.shape[-1]], dim=-1)
        entering = [_entering_state(a, b, p) for p in mine]
    outs = [zero_start.float() + torch.einsum("bshk,bhkv->bshv", reads.float(), state)
            for (zero_start, reads, _, _), state in zip(passes, entering)]
    return torch.cat(outs, dim=1).to(q.dtype)
