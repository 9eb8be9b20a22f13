"""Softmax attention with every rank holding the whole sequence's keys and values (LASP-2H, arXiv:2502.07563).

In a hybrid model the few softmax layers can simply all-gather K/V: one collective per layer,
layout-agnostic (any `sequence_part` layout), at the cost of holding N keys per rank. Queries
stay local; the mask is built from global positions (and documents), so the result is exact.
Backward reduce-scatters the K/V gradients (the gather's backward).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ithaca.parallel.gather import gather_states
from ithaca.parallel.sequence_layout import piece_order
from ithaca.parallel.shapes import check_attention_inputs


def _in_sequence_order(gathered: torch.Tensor, world: int, ring: int, piece: int) -> torch.Tensor:
    """[P, b, s, ...] every rank's part -> [b, N, ...] in sequence order."""
    pieces = {}
    for r in range(world):
        for i, p in enumerate(piece_order(sp_rank=r, sp=world, ring=ring)[0]):
            pieces[p] = gathered[r][:, i * piece:(i + 1) * piece]
    return torch.cat([pieces[p] for p in sorted(pieces)], dim=1)


def allgather_kv_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, group: dist.ProcessGroup, *,
                           causal: bool = True, doc_ids: torch.Tensor | None = None, ring: int = 1) -> torch.Tensor:
    """Exact softmax attention of this rank's queries over the whole sequence's gathered keys/values.

    q [b, s, h, d], k and v [b, s, h_kv, d]: this rank's part in the layout of
    `sequence_part(..., ring=ring)` (contiguous by default). `doc_ids` [b, s] marks packed documents.
    Communication: one all-gather of 2*b*s*h_kv*d elements per rank (backward: one reduce-scatter).
    """
    check_attention_inputs("allgather_kv_attention", q, k, v, doc_ids)
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    mine, _ = piece_order(sp_rank=rank, sp=world, ring=ring)
    piece, h_kv = q.shape[1] // len(mine), k.shape[2]
    kv = _in_sequence_order(gather_states(torch.cat([k, v], dim=2), group), world, ring, piece)  # [b, N, 2h_kv, d]
    k_all, v_all = kv[:, :, :h_kv], kv[:, :, h_kv:]
    n = kv.shape[1]
    q_pos = torch.cat([torch.arange(p * piece, (p + 1) * piece, device=q.device) for p in mine])
    allowed = torch.ones(1, q.shape[1], n, dtype=torch.bool, device=q.device)
    if causal:
        allowed = allowed & (torch.arange(n, device=q.device)[None, :] <= q_pos[:, None])[None]
    if doc_ids is not None:
        all_docs = _in_sequence_order(gather_states(doc_ids, group), world, ring, piece)  # [b, N]
        allowed = allowed & (doc_ids[:, :, None] == all_docs[:, None, :])
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k_all.transpose(1, 2), v_all.transpose(1, 2),
                                         attn_mask=allowed[:, None], enable_gqa=q.shape[2] != h_kv)
    return out.transpose(1, 2)
