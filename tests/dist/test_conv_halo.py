"""The sequence-parallel short causal convolution over gloo equals torch's single-process conv1d.

Twin pattern (tests/twin.py): every rank draws the whole input from one seed, convolves each document
of the whole sequence with torch's depthwise conv1d (left zero padding K-1), then runs
sequence_parallel_causal_conv1d on its part, and compares its part of the output and of the x
gradient, and the weight and bias gradients (each rank's shares summed), under a random cotangent.
"""

from __future__ import annotations

from functools import partial

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from harness import run_ranks
from twin import Input, check_twin

C = 5
# fp32 sums of K products: the parallel form adds the same terms in another order
TOL = dict(rtol=1e-5, atol=1e-5)


def _reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, resets: torch.Tensor | None) -> torch.Tensor:
    """torch's causal depthwise conv1d run on each document alone: [b, n, c]."""
    b, n, c = x.shape
    kernel = weight.shape[1]
    starts = torch.zeros(b, n, dtype=torch.bool) if resets is None else resets.clone()
    starts[:, 0] = True
    rows = []
    for row in range(b):
        edges = starts[row].nonzero().flatten().tolist() + [n]
        docs = [x[row, lo:hi].T.unsqueeze(0) for lo, hi in zip(edges, edges[1:])]  # [1, c, doc length]
        rows.append(torch.cat([F.conv1d(F.pad(d, (kernel - 1, 0)), weight.unsqueeze(1), bias, groups=c)[0].T
                               for d in docs]))
    return torch.stack(rows)


def _twin(kernel: int, piece: int, resets_at: str, seed: int, ring: int) -> None:
    from ithaca.parallel import sequence_parallel_causal_conv1d, sequence_part

    rank, world, group = dist.get_rank(), dist.get_world_size(), dist.group.WORLD
    pieces = world if ring == 1 else 2 * world
    b, n = 2, piece * pieces

    def with_implicit_first(resets: torch.Tensor) -> torch.Tensor:
        resets[1, 0] = False  # row 0 marks token 0, row 1 leaves it implicit
        return resets

    # the weight and bias are whole on every rank: each rank's gradient is its part's share
    inputs = {"x": Input((b, n, C)), "weight": Input((C, kernel), is_split=False),
              "bias": Input((C,), is_split=False)}
    if resets_at == "random":
        inputs["resets"] = Input((b, n), has_grad=False, draw="uniform",
                                 then=lambda u: with_implicit_first(u < 0.15))
    if resets_at == "piece starts":
        inputs["resets"] = Input.constant(with_implicit_first((torch.arange(n) % piece == 0).expand(b, n).clone()),
                                          is_split=True)
    check_twin(lambda x, weight, bias, resets=None: _reference(x, weight, bias, resets),
               {"halo": lambda x, weight, **rest: sequence_parallel_causal_conv1d(x, weight, group, ring=ring, **rest)},
               inputs, part=partial(sequence_part, sp_rank=rank, sp=world, ring=ring), seed=seed, tol=TOL,
               where=f"kernel={kernel} piece={piece} resets={resets_at} ring={ring} rank={rank}/{world}", group=group)


CASES = [(kernel, piece, resets_at) for kernel in (4, 2) for piece, resets_at in
         ((7, "none"), (3, "random"), (9, "random"), (6, "piece starts"))] + [(1, 4, "random")]  # K=1: empty halos


def _all_cases(ring: int) -> int:
    for i, case in enumerate(CASES):
        _twin(*case, seed=i, ring=ring)
    return len(CASES)


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("layout", ["contiguous", "zigzag"])
def test_conv_matches_torch_conv1d(world, layout):
    """Zigzag (ring=P): rank P-1 holds both middle pieces and copies that halo itself."""
    assert run_ranks(_all_cases, world, 1 if layout == "contiguous" else world) == [len(CASES)] * world


def test_conv_in_the_usp_layout():
    assert run_ranks(_all_cases, 4, 2) == [len(CASES)] * 4  # 2 Ulysses ranks x a ring of 2


def _halo_matters() -> bool:
    """Without the exchange every piece but the first would start from zeros: its first K-1 outputs differ."""
    from ithaca.parallel import sequence_parallel_causal_conv1d

    gen = torch.Generator().manual_seed(7)
    x = torch.randn(1, 8, C, generator=gen) + dist.get_rank()  # every rank's own tokens
    weight = torch.randn(C, 4, generator=gen)
    out = sequence_parallel_causal_conv1d(x, weight, dist.group.WORLD)
    zero_halo = F.conv1d(F.pad(x.mT, (3, 0)), weight.unsqueeze(1), groups=C).mT
    differs = ~torch.isclose(out, zero_halo).all(dim=2)[0]  # [s]: which outputs the halo changed
    return differs.tolist() == [dist.get_rank() > 0] * 3 + [False] * 5


def test_the_halo_changes_the_first_k_minus_1_outputs():
    assert run_ranks(_halo_matters, 2) == [True, True]


def _bad_inputs() -> bool:
    from ithaca.parallel import sequence_parallel_causal_conv1d

    group = dist.group.WORLD
    with pytest.raises(ValueError, match="pieces of at least K-1=3"):
        sequence_parallel_causal_conv1d(torch.randn(1, 2, C), torch.randn(C, 4), group)
    with pytest.raises(ValueError, match=r"must be \[c=5, K\]"):
        sequence_parallel_causal_conv1d(torch.randn(1, 8, C), torch.randn(4, 4), group)
    with pytest.raises(ValueError, match=r"resets .* must be \[b, s\]"):
        sequence_parallel_causal_conv1d(torch.randn(1, 8, C), torch.randn(C, 4), group,
                                        resets=torch.zeros(1, 7, dtype=torch.bool))
    return True


def test_bad_inputs_get_clear_errors():
    assert run_ranks(_bad_inputs, 2) == [True, True]


@pytest.mark.parametrize("kernel", [1, 2, 4])
@pytest.mark.parametrize("with_resets", [False, True])
def test_the_one_device_convolution_matches_torch_per_document(kernel, with_resets):
    from ithaca.kernels.causal_conv1d import causal_conv1d

    gen = torch.Generator().manual_seed(kernel)
    x = torch.randn(2, 23, C, generator=gen, requires_grad=True)
    weight = torch.randn(C, kernel, generator=gen, requires_grad=True)
    bias = torch.randn(C, generator=gen, requires_grad=True)
    resets = (torch.rand(2, 23, generator=gen) < 0.2) if with_resets else None
    cotangent = torch.randn(2, 23, C, generator=gen)
    ours = causal_conv1d(x, weight, resets=resets, bias=bias)
    theirs = _reference(x, weight, bias, resets)
    torch.testing.assert_close(ours, theirs, **TOL)
    for mine, reference in zip(torch.autograd.grad(ours, (x, weight, bias), cotangent),
                               torch.autograd.grad(theirs, (x, weight, bias), cotangent)):
        torch.testing.assert_close(mine, reference, **TOL)


def test_the_one_device_convolution_refuses_a_prefix_of_the_wrong_length():
    from ithaca.kernels.causal_conv1d import causal_conv1d

    with pytest.raises(ValueError, match="K-1 tokens"):
        causal_conv1d(torch.zeros(1, 8, 3), torch.zeros(3, 4), prefix=torch.zeros(1, 2, 3))
