"""LASP-2: sequence parallelism for linear attention with one all-gather of memory states (arXiv:2502.07563).

Math in DESIGN.md, "LASP-2". Rank t holds chunk t of the sequence (contiguous). Each rank computes
from its own chunk, with no incoming state: its output o_local, its memory state M_t (the state
the chunk would hand on) and the carry a_t = exp(g_C) (how much of an incoming state survives the
chunk; 0 when a document starts in it). One all-gather of every (M_j, a_j) lets each rank form
the state entering its chunk,

    S_t = sum_{j<t} (prod_{j<m<t} a_m) M_j,

and add exp(g_i) (scale q_i) S_t to each token's output (0 from the chunk's first reset on). The
op folder ithaca.kernels.linear_attention supplies every piece: `linear_attention(..., impl=impl)`
the local output, `chunk_memory` (M_t, a_t) and `state_reach` the exp(g_i) factor. The states
are computed first (cheap) and gathered while the chunk's own output (the costly part) is
computed. Backward goes through the same operations; the all-gather's backward is one
reduce-scatter of the state gradients. Per layer and direction that is P * b * h * (d_k*d_v + 1)
elements, whatever the sequence length.

The same works for any layout that gives each rank whole pieces of the sequence (`piece_order`):
under ring attention's zigzag layout a rank holds two pieces, so it gathers two states and forms
the prefix for each; hybrids keep one layout for their softmax and linear layers this way.

`exchange="scan"` replaces the all-gather by a point-to-point scan of the states in sequence order
(parallel/state_scan.py): each rank sends one state per piece it holds each way, whatever P.
"""

from __future__ import annotations


import torch
import torch.distributed as dist

from ithaca.kernels.linear_attention import (LinearAttentionImpl, check_linear_attention_inputs, chunk_memory,
                                             expand_log_decay, linear_attention, state_reach)
from ithaca.parallel.gather import PendingGather, gather_states
from ithaca.parallel.sequence_layout import StateExchange, piece_order
from ithaca.parallel.state_scan import PendingScan, ScanPlan, scan_states



def _prefix_weights(carries: torch.Tensor, piece: int) -> torch.Tensor:
    """[n, b, h] carries in sequence order -> [n, b, h] weights w_j = prod_{j<m<piece} a_m for j < piece, else 0.

    Every rank, the first too, uses all gathered states (some with weight 0): the all-gather's
    backward is a collective, and a rank whose graph skipped it would leave the others waiting.
    """
    weights = torch.zeros_like(carries)
    for j in range(piece):
        weights[j] = carries[j + 1:piece].prod(dim=0)  # empty product (j = piece-1) is 1
    return weights


def lasp2_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, group: dist.ProcessGroup, *,
                    log_decay: torch.Tensor | None = None, scale: float | None = None,
                    resets: torch.Tensor | None = None, ring: int = 1,
                    impl: LinearAttentionImpl = "auto", exchange: StateExchange = "allgather") -> torch.Tensor:
    """Exact linear attention with decay over a sequence split across `group`.

    q, k [b, s, h, d_k] and v [b, s, h, d_v]: this rank's part, contiguous by default (rank t
    holds positions [t*s, (t+1)*s)); with `ring` > 1, the layout of `sequence_part(..., ring=ring)`
    (ring=P: ring attention's zigzag). `log_decay` (<= 0) is None (plain), [h] (fixed per-head
    decay) or [b, s, h] (per-token gates, this rank's part); `scale` defaults to d_k^-0.5, applied
    to q; `resets` [b, s] bool marks tokens that start a document. `impl` picks the local
    computation (ithaca.kernels.linear_attention.linear_attention). Returns o [b, s, h, d_v] in
    q's dtype. Communication: one all-gather of P * pieces * b * h * (d_k*d_v + 1) elements forward
    (pieces = 1 per rank contiguous, 2 under a zigzag layout), one reduce-scatter of as many backward.
    `exchange="scan"` instead passes the states point to point in sequence order: each rank
    sends at most pieces * b * h * d_k*d_v elements forward and as many backward, whatever P.
    Raises ValueError on shapes that do not fit.
    """
    check_linear_attention_inputs("lasp2_attention", q, k, v, log_decay, resets)
    b, s, h, d_k = q.shape
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    if world % ring or (ring > 1 and s % 2):
        raise ValueError(f"lasp2_attention: ring={ring} must divide the group size {world}, and a zigzag "
                         f"part must split in two (local length {s})")
    if exchange not in ("allgather", "scan"):
        raise ValueError(f"lasp2_attention: exchange={exchange!r}; choose 'allgather' or 'scan'")
    scale = d_k ** -0.5 if scale is None else scale
    mine, n_pieces = piece_order(sp_rank=rank, sp=world, ring=ring)
    size = s // len(mine)
    parts = [slice(i * size, (i + 1) * size) for i in range(len(mine))]
    piece_resets = [None if resets is None else resets[:, part] for part in parts]
    decay = expand_log_decay(log_decay, b, s, h, q.device)  # [b, s, h] fp32, for the pieces' states
    if exchange == "scan" and n_pieces > 1:
        return _scan_attention(q, k, v, group, log_decay, decay, scale, parts, piece_resets, ring, impl)
    pending = PendingGather() if n_pieces > 1 else None
    if pending is not None:
        # one all-gather carries every piece's d_k x d_v state and carry; it runs during the outputs below
        packs = [torch.cat([t.flatten(1) for t in chunk_memory(k[:, part], v[:, part], decay[:, part], r)], dim=1)
                 for part, r in zip(parts, piece_resets)]  # [b, h*d_k*d_v + h] each
        gathered = gather_states(torch.stack(packs), group, pending)  # [P, pieces per rank, b, h*d_k*d_v + h]
    outs = _piece_outputs(q, k, v, log_decay, scale, parts, piece_resets, impl)
    if pending is None:
        return outs[0]
    pending.wait()  # guards `gathered`
    order = [piece_order(sp_rank=r, sp=world, ring=ring)[0] for r in range(world)]
    position = {piece: (r, i) for r, pieces in enumerate(order) for i, piece in enumerate(pieces)}
    in_order = torch.stack([gathered[position[p]] for p in range(n_pieces)])  # [n, b, ...] sequence order
    n_state = h * d_k * v.shape[-1]
    memories = in_order[..., :n_state].reshape(n_pieces, b, h, d_k, v.shape[-1])
    carries = in_order[..., n_state:]
    entering = [torch.einsum("pbh,pbhkv->bhkv", _prefix_weights(carries, piece), memories) for piece in mine]
    return _add_incoming(outs, entering, q, decay, scale, parts, piece_resets)


def _scan_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, group: dist.ProcessGroup,
                    log_decay: torch.Tensor | None, decay: torch.Tensor, scale: float, parts: list[slice],
                    piece_resets: list[torch.Tensor | None], ring: int, impl: LinearAttentionImpl) -> torch.Tensor:
    """lasp2_attention with exchange="scan": the states entering this rank's pieces come from the
    point-to-point scan (parallel/state_scan.py) in sequence order, whatever the layout."""
    plan = ScanPlan.of_layout(sp_rank=dist.get_rank(group), sp=dist.get_world_size(group), ring=ring, d_v=v.shape[-1])
    states = [chunk_memory(k[:, part], v[:, part], decay[:, part], r) for part, r in zip(parts, piece_resets)]
    memories = torch.stack([m for m, _ in states])  # [pieces, b, h, d_k, d_v]: cheap, so first
    carries = torch.stack([a for _, a in states])  # [pieces, b, h]
    pending = PendingScan(memories, group, plan)  # receives posted: they land during the outputs below
    waits = pending.is_waiting()
    if not waits:  # e.g. rank 0, contiguous: folding now puts its successor's state on the wire early
        entering = scan_states(memories, carries, pending, group)
    outs = _piece_outputs(q, k, v, log_decay, scale, parts, piece_resets, impl)
    if waits:
        entering = scan_states(memories, carries, pending, group)  # waits on predecessors, block by block
    # every rank's scan stays in the graph, piece 0's zero state too: its backward receives the next piece's gradient
    return _add_incoming(outs, list(entering), q, decay, scale, parts, piece_resets)


def _piece_outputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_decay: torch.Tensor | None, scale: float,
                   parts: list[slice], piece_resets: list[torch.Tensor | None],
                   impl: LinearAttentionImpl) -> list[torch.Tensor]:
    """Each of this rank's pieces alone, with no incoming state: [b, C, h, d_v] each (the costly part)."""
    local_decay = [log_decay if log_decay is None or log_decay.dim() == 1 else log_decay[:, part] for part in parts]
    return [linear_attention(q[:, part], k[:, part], v[:, part], piece_decay, scale=scale, resets=r, impl=impl)[0]
            for part, piece_decay, r in zip(parts, local_decay, piece_resets)]


def _add_incoming(outs: list[torch.Tensor], entering: list[torch.Tensor], q: torch.Tensor, decay: torch.Tensor,
                  scale: float, parts: list[slice], piece_resets: list[torch.Tensor | None]) -> torch.Tensor:
    """The pieces' outputs plus what the state entering each ([b, h, d_k, d_v] fp32) adds:
    exp(g_i) (scale q_i) S, 0 from the piece's first reset on. Returns [b, s, h, d_v] in q's dtype."""
    full = []
    for out, state, part, r in zip(outs, entering, parts, piece_resets):
        reach, _, _ = state_reach(decay[:, part], r)  # [b, C, h]
        full.append(out.float() + torch.einsum("bshk,bhkv->bshv", scale * q[:, part].float() * reach[..., None], state))
    return torch.cat(full, dim=1).to(q.dtype)
