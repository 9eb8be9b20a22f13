"""2D sequence parallelism (USP, arXiv:2405.07719): Ulysses inside groups of close ranks, a ring across them.

Layout (parallel/sequence_layout.py): the sequence is zigzag-split over the ring ranks, and each
ring rank's part is split contiguously over its Ulysses group. One all-to-all inside the Ulysses
group turns [b, s, h, d] into [b, s*U, h/U, d]: the ring rank's whole zigzag part for h/U heads.
Ring attention over those heads runs across the ring group; a second all-to-all returns the
output to [b, s, h, d]. Ulysses moves all heads over fast links; the ring carries only the kv
blocks of h/U heads, so the head count no longer caps the sequence-parallel degree.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from ithaca.kernels.attention import LseImpl, check_attention_inputs, repeat_kv_heads
from ithaca.parallel.ring import ring_attention
from ithaca.parallel.ulysses import gather_doc_ids, heads_to_seq, kv_repeat_factor, seq_to_heads


def usp_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ulysses_group: dist.ProcessGroup,
                  ring_group: dist.ProcessGroup, *, causal: bool = True,
                  doc_ids: torch.Tensor | None = None, impl: LseImpl = "auto") -> torch.Tensor:
    """Exact softmax attention with Ulysses over `ulysses_group` (U ranks) and a ring over `ring_group`.

    q [b, s, h, d], k and v [b, s, h_kv, d]: this rank's part (`sequence_part`). Returns this
    rank's [b, s, h, d] part of the output. `doc_ids` [b, s] (this rank's part) marks packed
    documents; `impl` picks the ring's block kernel (kernels/attention). Needs h divisible by U, and h_kv and U such that one divides the other (kv heads
    are repeated up to U); raises ValueError otherwise.
    """
    check_attention_inputs("usp_attention", q, k, v, doc_ids=doc_ids, same_length=True)
    ulysses = dist.get_world_size(ulysses_group)
    repeat = kv_repeat_factor(q.shape[2], k.shape[2], ulysses)
    if ulysses > 1:
        k, v = repeat_kv_heads(k, repeat), repeat_kv_heads(v, repeat)
        q, k, v = (seq_to_heads(t, ulysses_group) for t in (q, k, v))  # [b, s*U, h/U, d]
        doc_ids = None if doc_ids is None else gather_doc_ids(doc_ids, ulysses_group)
    out = ring_attention(q, k, v, ring_group, causal=causal, doc_ids=doc_ids, impl=impl)
    return heads_to_seq(out, ulysses_group) if ulysses > 1 else out
