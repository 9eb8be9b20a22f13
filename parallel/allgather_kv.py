"""Softmax attention with every rank holding the whole sequence's keys and values (LASP-2H, arXiv:2502.07563).

In a hybrid model the few softmax layers can simply all-gather K/V: one collective per layer,
layout-agnostic (any `sequence_part` layout), at the cost of holding N keys per rank. Queries
stay local. Each of this rank's pieces of the sequence attends to the keys up to its own end
(causal, aligned to the bottom right: the piece's global positions) with the documents given
per token to the kernel, so the result is exact and no dense [s, N] mask is built.
Backward reduce-scatters the K/V gradients (the gather's backward).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from ithaca.kernels.attention import AttentionImpl, attention, check_attention_inputs
from ithaca.parallel.gather import gather_states
from ithaca.parallel.sequence_layout import piece_order


def _in_sequence_order(gathered: torch.Tensor, world: int, ring: int, piece: int) -> torch.Tensor:
    """[P, b, s, ...] every rank's part -> [b, N, ...] in sequence order."""
    pieces = {}
    for r in range(world):
        for i, p in enumerate(piece_order(sp_rank=r, sp=world, ring=ring)[0]):
            pieces[p] = gathered[r][:, i * piece:(i + 1) * piece]
    return torch.cat([pieces[p] for p in sorted(pieces)], dim=1)


def allgather_kv_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, group: dist.ProcessGroup, *,
                           causal: bool = True, doc_ids: torch.Tensor | None = None, ring: int = 1,
                           impl: AttentionImpl = "auto") -> torch.Tensor:
    """Exact softmax attention of this rank's queries over the whole sequence's gathered keys/values.

    q [b, s, h, d], k and v [b, s, h_kv, d]: this rank's part in the layout of
    `sequence_part(..., ring=ring)` (contiguous by default). `doc_ids` [b, s] marks packed
    documents; `impl` picks the attention kernel (kernels/attention).
    Communication: one all-gather of 2*b*s*h_kv*d elements per rank (backward: one reduce-scatter),
    and one of b*s document ids.
    """
    check_attention_inputs("allgather_kv_attention", q, k, v, doc_ids=doc_ids, same_length=True)
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    mine, _ = piece_order(sp_rank=rank, sp=world, ring=ring)
    piece, h_kv = q.shape[1] // len(mine), k.shape[2]
    kv = _in_sequence_order(gather_states(torch.cat([k, v], dim=2), group), world, ring, piece)  # [b, N, 2h_kv, d]
    all_docs = None if doc_ids is None else _in_sequence_order(gather_states(doc_ids, group), world, ring, piece)
    outs = []
    for i, p in enumerate(mine):
        rows = slice(i * piece, (i + 1) * piece)
        end = (p + 1) * piece if causal else kv.shape[1]  # causal: later keys are all in this piece's future
        outs.append(attention(q[:, rows], kv[:, :end, :h_kv], kv[:, :end, h_kv:], is_causal=causal,
                              doc_ids=None if doc_ids is None else doc_ids[:, rows],
                              kv_doc_ids=None if doc_ids is None else all_docs[:, :end], impl=impl))
    return torch.cat(outs, dim=1)
