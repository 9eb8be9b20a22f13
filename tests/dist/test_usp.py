"""USP (Ulysses x ring) over gloo equals single-process attention; so do its degenerate shapes.

Each rank's part is taken by `sequence_part`, the split the training loop uses (tests/twin.py).
"""

from __future__ import annotations

import pytest
import torch.distributed as dist

from harness import run_ranks
from twin import check_attention_twin

TOL = dict(rtol=2e-5, atol=2e-5)  # fp32; as in test_ring.py
CASES = [  # (heads, kv_heads, head_dim, causal, packed documents)
    (4, 4, 64, True, False), (4, 2, 64, False, False), (4, 1, 128, True, False), (8, 2, 64, True, False),
    (4, 2, 64, True, True), (4, 1, 128, True, True),
]


def _all_cases(ring: int) -> int:
    from ithaca.parallel import SequenceLayout, build_mesh, usp_attention

    world = dist.get_world_size()
    layout = SequenceLayout(sp=world, sp_method="usp", ulysses_degree=world // ring)
    mesh = build_mesh(dp=1, pp=1, tp=1, device_type="cpu", sequence=layout)
    sp_rank = mesh.rank("sp")
    assert mesh.ranks("sp") == list(range(world)) and len(mesh.ranks("ulysses")) == world // ring
    for i, (heads, kv_heads, head_dim, causal, packed) in enumerate(CASES):
        check_attention_twin(
            lambda q, k, v, doc_ids: usp_attention(q, k, v, mesh.group("ulysses"), mesh.group("ring"),
                                                   causal=causal, doc_ids=doc_ids),
            lambda t: layout.part(t, sp_rank), b=2, n=4 * 2 * world, heads=heads,
            kv_heads=kv_heads, head_dim=head_dim, causal=causal, packed=packed, seed=i, tol=TOL,
            where=f"case {i} ring {ring} rank {sp_rank}/{world}")
    return len(CASES)


@pytest.mark.parametrize("world, ring", [(2, 2), (2, 1), (4, 2)])
def test_usp_matches_single_process(world, ring):
    assert run_ranks(_all_cases, world, ring) == [len(CASES)] * world
