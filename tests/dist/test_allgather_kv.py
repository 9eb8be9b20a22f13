"""All-gather-K/V softmax attention (LASP-2H's softmax layers) equals single-process attention in every layout."""

from __future__ import annotations

import pytest
import torch.distributed as dist

from harness import run_ranks
from twin import check_attention_twin

TOL = dict(rtol=2e-5, atol=2e-5)  # fp32; SDPA over a gathered sequence reorders the same sums
CASES = [(4, 2, True, False), (4, 4, False, False), (4, 1, True, True)]  # (heads, kv_heads, causal, packed)


def _all_cases(ring: int, impl: str = "auto") -> int:
    from ithaca.parallel import allgather_kv_attention, sequence_part

    rank, world, group = dist.get_rank(), dist.get_world_size(), dist.group.WORLD
    for i, (heads, kv_heads, causal, packed) in enumerate(CASES):
        check_attention_twin(
            lambda q, k, v, doc_ids: allgather_kv_attention(q, k, v, group, causal=causal, doc_ids=doc_ids, ring=ring,
                                                              impl=impl),
            lambda t: sequence_part(t, sp_rank=rank, sp=world, ring=ring), b=2, n=4 * 2 * world, heads=heads,
            kv_heads=kv_heads, head_dim=16, causal=causal, packed=packed, seed=i, tol=TOL,
            where=f"case {i} ring {ring} {impl} rank {rank}/{world}")
    return len(CASES)


@pytest.mark.parametrize("world, ring", [(2, 1), (2, 2), (4, 4), (4, 2)])
def test_allgather_kv_matches_single_process(world, ring):
    assert run_ranks(_all_cases, world, ring) == [len(CASES)] * world


def test_allgather_kv_with_triton_matches_single_process():
    """Pieces of queries over the keys up to their end, documents per token: the Triton kernel's
    bottom-right causal mask and separate query/key document ids (interpreted without a GPU)."""
    assert run_ranks(_all_cases, 2, 2, "triton") == [len(CASES)] * 2
