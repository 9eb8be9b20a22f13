"""Ulysses attention over gloo equals single-process attention on the gathered sequence.

Twin pattern: every rank draws the full q, k, v and cotangent from one seed, computes the
single-process result, then runs ulysses_attention on its contiguous slice and compares its
slice of the output and of every input gradient.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from harness import run_ranks
from test_ring import random_doc_ids

# fp32; the all-to-all only moves data, so differences come from SDPA's blocking over a
# different head count per call: ~1e-7 seen, 1e-5 leaves room without hiding a wrong slice.
TOL = dict(rtol=1e-5, atol=1e-5)
CASES = [  # (heads, kv_heads, causal, packed documents)
    (8, 8, True, False), (8, 8, False, False), (8, 4, True, False), (8, 2, True, False), (8, 1, True, False),
    (4, 1, False, False), (8, 2, True, True), (4, 4, False, True),
]


def _check_cases() -> int:
    from ithaca.kernels.attention import attention
    from ithaca.parallel import ulysses_attention

    rank, world, group = dist.get_rank(), dist.get_world_size(), dist.group.WORLD
    checked = 0
    for heads, kv_heads, causal, packed in CASES:
        if heads % world:
            continue
        gen = torch.Generator().manual_seed(heads * 100 + kv_heads)
        b, n, d = 2, 8 * world, 16
        q = torch.randn(b, n, heads, d, generator=gen, requires_grad=True)
        k = torch.randn(b, n, kv_heads, d, generator=gen, requires_grad=True)
        v = torch.randn(b, n, kv_heads, d, generator=gen, requires_grad=True)
        cotangent = torch.randn(b, n, heads, d, generator=gen)
        doc_ids = random_doc_ids(b, n, gen) if packed else None
        full = attention(q, k, v, is_causal=causal, doc_ids=doc_ids, impl="reference")
        full.backward(cotangent)

        s = n // world
        mine = slice(rank * s, (rank + 1) * s)
        ql, kl, vl = (t.detach()[:, mine].clone().requires_grad_() for t in (q, k, v))
        out = ulysses_attention(ql, kl, vl, group, causal=causal, doc_ids=None if doc_ids is None else doc_ids[:, mine])
        out.backward(cotangent[:, mine])
        where = f"heads={heads} kv_heads={kv_heads} causal={causal} packed={packed} rank={rank}"
        torch.testing.assert_close(out, full[:, mine], **TOL, msg=lambda m: f"output {where}: {m}")
        for name, local, ref in (("dq", ql, q), ("dk", kl, k), ("dv", vl, v)):
            torch.testing.assert_close(local.grad, ref.grad[:, mine], **TOL, msg=lambda m: f"{name} {where}: {m}")
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
