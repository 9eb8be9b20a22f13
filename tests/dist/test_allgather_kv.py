"""All-gather-K/V softmax attention (LASP-2H's softmax layers) equals single-process attention in every layout."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from harness import run_ranks
from test_ring import random_doc_ids

TOL = dict(rtol=2e-5, atol=2e-5)  # fp32; SDPA over a gathered sequence reorders the same sums


def _all_cases(ring: int) -> int:
    from ithaca.kernels.attention import attention_reference
    from ithaca.parallel import allgather_kv_attention, sequence_part

    rank, world, group = dist.get_rank(), dist.get_world_size(), dist.group.WORLD
    cases = [(4, 2, True, False), (4, 4, False, False), (4, 1, True, True)]
    for i, (heads, kv_heads, causal, packed) in enumerate(cases):
        gen = torch.Generator().manual_seed(i)
        b, n, d = 2, 4 * 2 * world, 16
        q = torch.randn(b, n, heads, d, generator=gen, requires_grad=True)
        k = torch.randn(b, n, kv_heads, d, generator=gen, requires_grad=True)
        v = torch.randn(b, n, kv_heads, d, generator=gen, requires_grad=True)
        cotangent = torch.randn(b, n, heads, d, generator=gen)
        doc_ids = random_doc_ids(b, n, gen) if packed else None
        full = attention_reference(q, k, v, is_causal=causal, doc_ids=doc_ids)
        full.backward(cotangent)

        def mine(t):
            return sequence_part(t.detach(), sp_rank=rank, sp=world, ring=ring)

        ql, kl, vl = (mine(t).requires_grad_() for t in (q, k, v))
        out = allgather_kv_attention(ql, kl, vl, group, causal=causal, ring=ring,
                                     doc_ids=None if doc_ids is None else mine(doc_ids))
        out.backward(mine(cotangent))
        where = f"case={i} ring={ring} rank={rank}/{world}"
        torch.testing.assert_close(out, mine(full), **TOL, msg=lambda m: f"out {where}: {m}")
        for name, local, ref in (("dq", ql, q), ("dk", kl, k), ("dv", vl, v)):
            torch.testing.assert_close(local.grad, mine(ref.grad), **TOL, msg=lambda m: f"{name} {where}: {m}")
    return len(cases)


@pytest.mark.parametrize("world, ring", [(2, 1), (2, 2), (4, 4), (4, 2)])
def test_allgather_kv_matches_single_process(world, ring):
    assert run_ranks(_all_cases, world, ring) == [3] * world
