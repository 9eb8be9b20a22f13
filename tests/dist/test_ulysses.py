"""Ulysses attention over gloo equals single-process attention on the gathered sequence.

Twin pattern (tests/twin.py), each rank holding a contiguous slice.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from harness import run_ranks
from twin import check_attention_twin

# fp32; the all-to-all only moves data, so differences come from SDPA's blocking over a
# different head count per call: ~1e-7 seen, 1e-5 leaves room without hiding a wrong slice.
TOL = dict(rtol=1e-5, atol=1e-5)
CASES = [  # (heads, kv_heads, causal, packed documents)
    (8, 8, True, False), (8, 8, False, False), (8, 4, True, False), (8, 2, True, False), (8, 1, True, False),
    (4, 1, False, False), (8, 2, True, True), (4, 4, False, True),
]


def _check_cases() -> int:
    from ithaca.parallel import ulysses_attention

    rank, world, group = dist.get_rank(), dist.get_world_size(), dist.group.WORLD
    checked = 0
    for i, (heads, kv_heads, causal, packed) in enumerate(CASES):
        if heads % world:
            continue
        s = 8  # local length

        def mine(t):
            return t[:, rank * s:(rank + 1) * s]

        check_attention_twin(
            lambda q, k, v, doc_ids: ulysses_attention(q, k, v, group, causal=causal, doc_ids=doc_ids), mine,
            b=2, n=s * world, heads=heads, kv_heads=kv_heads, head_dim=16, causal=causal, packed=packed,
            seed=heads * 100 + kv_heads + i, tol=TOL, where=f"case {i} rank {rank}/{world}")
        checked += 1
    return checked


@pytest.mark.parametrize("world", [2, 4])
def test_ulysses_matches_single_process(world):
    assert run_ranks(_check_cases, world) == [sum(h % world == 0 for h, *_ in CASES)] * world


def _indivisible_kv_heads() -> str:
    from ithaca.parallel import ulysses_attention

    q, kv = torch.randn(1, 4, 6, 8), torch.randn(1, 4, 3, 8)
    with pytest.raises(ValueError, match="kv heads 3") as err:
        ulysses_attention(q, kv, kv, dist.group.WORLD)
    return str(err.value)


def test_ulysses_refuses_kv_heads_that_cannot_be_split_or_repeated():
    assert all("split or repeated" in message for message in run_ranks(_indivisible_kv_heads, 2))
