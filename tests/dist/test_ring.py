"""Ring attention over gloo equals single-process attention on the whole sequence (tests/twin.py)."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from harness import run_ranks
from twin import check_attention_twin

# fp32: the merge reorders the softmax sums (~1e-7 seen); 2e-5 leaves room and still fails on a
# wrongly masked or dropped block (errors of order 1e-1).
TOL = dict(rtol=2e-5, atol=2e-5)
CASES = [  # (heads, kv_heads, head_dim, causal, packed documents)
    (4, 4, 64, True, False), (4, 4, 64, False, False), (4, 2, 128, True, False), (4, 1, 64, True, False),
    (2, 1, 128, False, False), (4, 2, 64, True, True), (2, 2, 128, False, True),
]


def _all_cases() -> int:
    from ithaca.parallel import ring_attention, zigzag_split

    rank, world, group = dist.get_rank(), dist.get_world_size(), dist.group.WORLD
    for i, (heads, kv_heads, head_dim, causal, packed) in enumerate(CASES):
        check_attention_twin(
            lambda q, k, v, doc_ids: ring_attention(q, k, v, group, causal=causal, doc_ids=doc_ids),
            lambda t: zigzag_split(t, rank, world), b=2, n=6 * 2 * world, heads=heads, kv_heads=kv_heads,
            head_dim=head_dim, causal=causal, packed=packed, seed=i, tol=TOL, where=f"case {i} rank {rank}/{world}")
    return len(CASES)


@pytest.mark.parametrize("world", [2, 4])
def test_ring_matches_single_process(world):
    assert run_ranks(_all_cases, world) == [len(CASES)] * world


def _triton_blocks() -> bool:
    """Packed documents through the Triton block kernel (interpreted without a GPU): 32 tokens per
    rank, so each step's blocks span two or three 16-token tiles and documents cross them."""
    from ithaca.parallel import ring_attention, zigzag_split

    rank, world, group = dist.get_rank(), dist.get_world_size(), dist.group.WORLD
    for causal in (True, False):
        check_attention_twin(
            lambda q, k, v, doc_ids: ring_attention(q, k, v, group, causal=causal, doc_ids=doc_ids, impl="triton"),
            lambda t: zigzag_split(t, rank, world), b=1, n=32 * world, heads=4, kv_heads=2, head_dim=16,
            causal=causal, packed=True, seed=7, tol=TOL, where=f"triton causal={causal} rank {rank}/{world}")
    return True


def test_ring_with_triton_blocks_matches_single_process():
    assert run_ranks(_triton_blocks, 2) == [True, True]


def _saved_shapes() -> list[tuple[int, ...]]:
    from ithaca.parallel import ring_attention

    saved = []

    def pack(t):
        saved.append(tuple(t.shape))
        return t

    q = torch.randn(1, 16, 2, 8, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        ring_attention(q, q, q, dist.group.WORLD)
    return saved


def test_no_rank_saves_the_whole_sequence_for_backward():
    world = 4
    for shapes in run_ranks(_saved_shapes, world):
        assert shapes, "ring attention saved nothing?"
        # local length 16 of a global 64; lse is [b, h, s]
        assert all(16 * world not in shape and max(shape) <= 16 for shape in shapes), shapes


def _bad_inputs() -> bool:
    from ithaca.parallel import ring_attention

    rank, group = dist.get_rank(), dist.group.WORLD
    q = torch.randn(1, 6, 2, 8)
    with pytest.raises(ValueError, match="even local length"):
        ring_attention(q[:, :5], q[:, :5], q[:, :5], group)
    with pytest.raises(ValueError, match="multiple of kv heads"):
        ring_attention(torch.randn(1, 6, 3, 8), q, q, group)
    other = torch.randn(1, 8 if rank else 6, 2, 8)  # rank 1 brings a longer block
    with pytest.raises(ValueError, match="ranks pass different k/v shapes"):
        ring_attention(other, other, other, group)
    return True


def test_bad_inputs_get_clear_errors():
    assert run_ranks(_bad_inputs, 2) == [True, True]
