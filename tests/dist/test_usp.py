"""USP (Ulysses x ring) over gloo equals single-process attention; so do its degenerate shapes.

Twin pattern as in test_ring.py, with each rank's part taken by `sequence_part`, the split the
training loop uses.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from harness import run_ranks
from test_ring import random_doc_ids

TOL = dict(rtol=2e-5, atol=2e-5)  # fp32; as in test_ring.py
CASES = [  # (heads, kv_heads, head_dim, causal, packed documents)
    (4, 4, 64, True, False), (4, 2, 64, False, False), (4, 1, 128, True, False), (8, 2, 64, True, False),
    (4, 2, 64, True, True), (4, 1, 128, True, True),
]


def _all_cases(ring: int) -> int:
    from ithaca.kernels.attention import attention_reference
    from ithaca.parallel import build_mesh, sequence_part, usp_attention

    world = dist.get_world_size()
    mesh = build_mesh(dp=1, pp=1, tp=1, sp=world, ring=ring, device_type="cpu")
    sp_rank = mesh.rank("sp")
    assert mesh.ranks("sp") == list(range(world)) and len(mesh.ranks("ulysses")) == world // ring

    def mine(t):
        return sequence_part(t.detach(), sp_rank=sp_rank, sp=world, ring=ring)

    for i, (heads, kv_heads, head_dim, causal, packed) in enumerate(CASES):
        gen = torch.Generator().manual_seed(i)
        b, n = 2, 4 * 2 * world
        q = torch.randn(b, n, heads, head_dim, generator=gen, requires_grad=True)
        k = torch.randn(b, n, kv_heads, head_dim, generator=gen, requires_grad=True)
        v = torch.randn(b, n, kv_heads, head_dim, generator=gen, requires_grad=True)
        cotangent = torch.randn(b, n, heads, head_dim, generator=gen)
        doc_ids = random_doc_ids(b, n, gen) if packed else None
        full = attention_reference(q, k, v, is_causal=causal, doc_ids=doc_ids)
        full.backward(cotangent)
        ql, kl, vl = (mine(t).requires_grad_() for t in (q, k, v))
        out = usp_attention(ql, kl, vl, mesh.group("ulysses"), mesh.group("ring"), causal=causal,
                            doc_ids=None if doc_ids is None else mine(doc_ids))
        out.backward(mine(cotangent))
        where = f"heads={heads} kv={kv_heads} d={head_dim} causal={causal} packed={packed} ring={ring} rank={sp_rank}"
        torch.testing.assert_close(out, mine(full), **TOL, msg=lambda m: f"out {where}: {m}")
        for name, local, ref in (("dq", ql, q), ("dk", kl, k), ("dv", vl, v)):
            torch.testing.assert_close(local.grad, mine(ref.grad), **TOL, msg=lambda m: f"{name} {where}: {m}")
    return len(CASES)


@pytest.mark.parametrize("world, ring", [(2, 2), (2, 1), (4, 2)])
def test_usp_matches_single_process(world, ring):
    assert run_ranks(_all_cases, world, ring) == [len(CASES)] * world
