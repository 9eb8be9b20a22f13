"""USP (Ulysses x ring) over gloo equals single-process attention; so do its degenerate shapes.

Twin pattern as in test_ring.py, with each rank's part taken by `sequence_part`, the split the
training loop uses.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from harness import run_ranks

TOL = dict(rtol=2e-5, atol=2e-5)  # fp32; as in test_ring.py
CASES = [  # (heads, kv_heads, head_dim, causal)
    (4, 4, 64, True), (4, 2, 64, False), (4, 1, 128, True), (8, 2, 64, True),
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

    for i, (heads, kv_heads, head_dim, causal) in enumerate(CASES):
        gen = torch.Generator().manual_seed(i)
        b, n = 2, 4 * 2 * world
        q = torch.randn(b, n, heads, head_dim, generator=gen, requires_grad=True)
        k = torch.randn(b, n, kv_heads, head_dim, generator=gen, requires_grad=True)
        v = torch.randn(b, n, kv_heads, head_dim, generator=gen, requires_grad=True)
        cotangent = torch.randn(b, n, heads, head_dim, generator=gen)
        full = attention_reference(q, k, v, is_causal=causal)
        full.backward(cotangent)
        ql, kl, vl = (mine(t).requires_grad_() for t in (q, k, v))
        out = usp_attention(ql, kl, vl, mesh.group("ulysses"), mesh.group("ring"), causal=causal)
        out.backward(mine(cotangent))
        where = f"heads={heads} kv={kv_heads} d={head_dim} causal={causal} ring={ring} rank={sp_rank}"
        torch.testing.assert_close(out, mine(full), **TOL, msg=lambda m: f"out {where}: {m}")
        for name, local, ref in (("dq", ql, q), ("dk", kl, k), ("dv", vl, v)):
            torch.testing.assert_close(local.grad, mine(ref.grad), **TOL, msg=lambda m: f"{name} {where}: {m}")
    return len(CASES)


@pytest.mark.parametrize("world, ring", [(2, 2), (2, 1), (4, 2)])
def test_usp_matches_single_process(world, ring):
    assert run_ranks(_all_cases, world, ring) == [len(CASES)] * world
