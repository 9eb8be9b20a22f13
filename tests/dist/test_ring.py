"""Ring attention over gloo equals single-process attention on the whole sequence.

Twin pattern: every rank draws the full q, k, v and cotangent from one seed, computes the plain
result, then runs ring_attention on its zigzag part and compares its part of the output and of
every gradient.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from harness import run_ranks

# fp32: the merge reorders the softmax sums (~1e-7 seen); 2e-5 leaves room and still fails on a
# wrongly masked or dropped block (errors of order 1e-1).
TOL = dict(rtol=2e-5, atol=2e-5)
CASES = [  # (heads, kv_heads, head_dim, causal, packed documents)
    (4, 4, 64, True, False), (4, 4, 64, False, False), (4, 2, 128, True, False), (4, 1, 64, True, False),
    (2, 1, 128, False, False), (4, 2, 64, True, True), (2, 2, 128, False, True),
]


def random_doc_ids(b: int, n: int, gen: torch.Generator) -> torch.Tensor:
    """[b, n] ids of packed documents of random lengths (about 7 tokens), crossing chunk edges."""
    starts = torch.rand(b, n, generator=gen) < 0.15
    starts[:, 0] = True
    return starts.long().cumsum(1) - 1


def _twin(heads: int, kv_heads: int, head_dim: int, causal: bool, packed: bool, seed: int):
    from ithaca.kernels.attention import attention_reference
    from ithaca.parallel import ring_attention, zigzag_split

    rank, world, group = dist.get_rank(), dist.get_world_size(), dist.group.WORLD
    gen = torch.Generator().manual_seed(seed)
    b, n = 2, 6 * 2 * world  # chunks of 6 tokens
    q = torch.randn(b, n, heads, head_dim, generator=gen, requires_grad=True)
    k = torch.randn(b, n, kv_heads, head_dim, generator=gen, requires_grad=True)
    v = torch.randn(b, n, kv_heads, head_dim, generator=gen, requires_grad=True)
    cotangent = torch.randn(b, n, heads, head_dim, generator=gen)
    doc_ids = random_doc_ids(b, n, gen) if packed else None
    full = attention_reference(q, k, v, is_causal=causal, doc_ids=doc_ids)
    full.backward(cotangent)

    def mine(t):
        return zigzag_split(t.detach(), rank, world)

    ql, kl, vl = (mine(t).requires_grad_() for t in (q, k, v))
    out = ring_attention(ql, kl, vl, group, causal=causal, doc_ids=None if doc_ids is None else mine(doc_ids))
    out.backward(mine(cotangent))
    where = f"heads={heads} kv={kv_heads} d={head_dim} causal={causal} packed={packed} rank={rank}/{world}"
    torch.testing.assert_close(out, mine(full), **TOL, msg=lambda m: f"out {where}: {m}")
    for name, local, ref in (("dq", ql, q), ("dk", kl, k), ("dv", vl, v)):
        torch.testing.assert_close(local.grad, mine(ref.grad), **TOL, msg=lambda m: f"{name} {where}: {m}")


def _all_cases() -> int:
    for i, case in enumerate(CASES):
        _twin(*case, seed=i)
    return len(CASES)


@pytest.mark.parametrize("world", [2, 4])
def test_ring_matches_single_process(world):
    assert run_ranks(_all_cases, world) == [len(CASES)] * world


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
