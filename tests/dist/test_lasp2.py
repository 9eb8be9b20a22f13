"""LASP-2 over gloo equals the single-process recurrence, forward and backward, for every decay kind.

Twin pattern (tests/twin.py): every rank draws the full inputs from one seed, runs the token-by-token
recurrence on the whole sequence, then lasp2_attention on its part (contiguous, zigzag or USP), and
compares its part of the output and of every gradient (q, k, v and the gates). Both state exchanges
are checked: the all-gather and the point-to-point scan (exchange="scan").
"""

from __future__ import annotations

import os
from functools import partial

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from harness import run_ranks
from twin import Input, check_twin

H, DK, DV = 2, 8, 6
# fp32; unnormalised linear attention sums O(s) terms of size ~1, and the chunked/prefix forms
# reorder those sums: 1e-4 covers that and still fails on a missing or double-counted state.
TOL = dict(rtol=1e-4, atol=1e-4)


def _twin(kind: str, chunk: int, with_resets: bool, seed: int, ring: int = 1, impl: str = "auto",
          exchange: str = "allgather") -> None:
    from ithaca.kernels.linear_attention import linear_attention
    from ithaca.parallel import lasp2_attention, sequence_part

    rank, world, group = dist.get_rank(), dist.get_world_size(), dist.group.WORLD
    b, n = 2, chunk * world
    inputs = {"q": Input((b, n, H, DK)), "k": Input((b, n, H, DK)), "v": Input((b, n, H, DV))}
    if kind == "fixed":  # a per-head constant every rank holds whole
        inputs["log_decay"] = Input.constant(torch.log(1 - 2.0 ** (-3 - torch.arange(H, dtype=torch.float32))))
    elif kind == "gated":
        inputs["log_decay"] = Input((b, n, H), then=lambda z: F.logsigmoid(z + 2))
    if with_resets:
        inputs["resets"] = Input((b, n), has_grad=False, draw="uniform", then=lambda u: u < 0.08)
    check_twin(lambda q, k, v, **rest: linear_attention(q, k, v, scale=DK ** -0.5, impl="reference", **rest)[0],
               {f"exchange={exchange}": lambda q, k, v, **rest: lasp2_attention(q, k, v, group, ring=ring, impl=impl,
                                                                                 exchange=exchange, **rest)},
               inputs, part=partial(sequence_part, sp_rank=rank, sp=world, ring=ring), seed=seed, tol=TOL,
               where=f"kind={kind} chunk={chunk} resets={with_resets} ring={ring} impl={impl} rank={rank}/{world}")


CASES = [(kind, chunk, resets) for kind in ("plain", "fixed", "gated") for chunk, resets in ((13, False), (70, True))]


def _all_cases(ring_of_world: bool) -> int:
    world = dist.get_world_size()
    for i, (kind, chunk, resets) in enumerate(CASES):
        # zigzag (ring) layouts need an even local length: double the odd chunk
        _twin(kind, chunk * 2 if ring_of_world else chunk, resets, seed=i, ring=world if ring_of_world else 1)
    return len(CASES)


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("layout", ["contiguous", "zigzag"])
def test_lasp2_matches_the_recurrence(world, layout):
    assert run_ranks(_all_cases, world, layout == "zigzag") == [len(CASES)] * world


SCAN_CASES = CASES + [("gated", 13, True)]  # short parts: some hold a reset (carry 0), some carry the state on


def _scan_cases(ring: int) -> int:
    for i, (kind, chunk, resets) in enumerate(SCAN_CASES):
        _twin(kind, chunk if ring == 1 else chunk * 2, resets, seed=i, ring=ring, exchange="scan")
    return len(SCAN_CASES)


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("layout", ["contiguous", "zigzag"])
def test_lasp2_scan_matches_the_recurrence(world, layout):
    """The point-to-point scan; d_v=6 in 4 blocks of 1, 2, 1, 2 columns. Zigzag: up the ranks over
    the first pieces, through rank P-1, and back down over the second pieces."""
    assert run_ranks(_scan_cases, world, 1 if layout == "contiguous" else world) == [len(SCAN_CASES)] * world


def test_lasp2_scan_in_the_usp_layout():
    assert run_ranks(_scan_cases, 4, 2) == [len(SCAN_CASES)] * 4  # 2 Ulysses ranks x a ring of 2


def _usp_layout() -> int:
    for i, (kind, chunk, resets) in enumerate(CASES):
        _twin(kind, chunk * 2, resets, seed=i, ring=2)  # world 4: 2 Ulysses ranks x a ring of 2
    return len(CASES)


def test_lasp2_in_the_usp_layout():
    assert run_ranks(_usp_layout, 4) == [len(CASES)] * 4


def _triton_cases() -> int:
    for i, kind in enumerate(("fixed", "gated")):
        _twin(kind, 40, True, seed=10 + i, ring=2, impl="triton")  # zigzag pieces of 20: 16 + a ragged 4 per piece
    _twin("gated", 40, True, seed=12, ring=2, impl="triton", exchange="scan")
    return 3


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                    reason="the gloo ranks hold CPU tensors: Triton takes them only under TRITON_INTERPRET=1")
def test_lasp2_with_the_triton_kernels():
    """The local part through the Triton kernels (interpreted; conftest sets it off CUDA, the ranks inherit it)."""
    assert run_ranks(_triton_cases, 2) == [3, 3]


def _elements_moved(n_per_rank: int) -> tuple[int, int]:
    from ithaca.bench.comm_counter import count_bytes_sent
    from ithaca.parallel import lasp2_attention

    q = torch.randn(1, n_per_rank, H, DK, requires_grad=True)
    v = torch.randn(1, n_per_rank, H, DV, requires_grad=True)
    with count_bytes_sent() as counter:
        lasp2_attention(q, q, v, dist.group.WORLD).sum().backward()
    return counter.elements_gathered, counter.elements_reduce_scattered


def test_state_traffic_is_p_h_dk_dv_and_independent_of_length():
    world = 2
    expected = world * 1 * H * (DK * DV + 1)  # P * b * h * (d_k d_v + the carry)
    for moved in run_ranks(_elements_moved, world, 16) + run_ranks(_elements_moved, world, 32):
        assert moved == (expected, expected)


def _scan_bytes_sent(n_per_rank: int) -> int:
    from ithaca.bench.comm_counter import count_bytes_sent
    from ithaca.parallel import lasp2_attention

    q = torch.randn(2, n_per_rank, H, DK, requires_grad=True)
    v = torch.randn(2, n_per_rank, H, DV, requires_grad=True)
    with count_bytes_sent() as counter:
        lasp2_attention(q, q, v, dist.group.WORLD, exchange="scan").sum().backward()
    return counter.bytes_sent


def test_scan_traffic_is_one_state_per_neighbour_whatever_p():
    """Each rank sends one fp32 state forward (but the last) and one gradient back (but the first):
    the ends send one state at every P, inner ranks two at P=4 and P=8 alike (the all-gather's
    grows with P)."""
    state = 2 * H * DK * DV * 4  # b=2 rows, fp32
    busiest = []
    for world in (2, 4, 8):
        sent = run_ranks(_scan_bytes_sent, world, 16)
        assert sent == [state * ((r < world - 1) + (r > 0)) for r in range(world)], (world, sent)
        busiest.append(max(sent))
    assert busiest == [state, 2 * state, 2 * state]


def _bad_inputs() -> bool:
    from ithaca.parallel import lasp2_attention

    q = torch.randn(1, 4, 2, 8)
    group = dist.group.WORLD
    with pytest.raises(ValueError, match=r"log_decay must be \[h\]"):
        lasp2_attention(q, q, q, group, log_decay=torch.zeros(3))
    with pytest.raises(ValueError, match="want q = k"):
        lasp2_attention(q, torch.randn(1, 4, 3, 8), q, group)
    with pytest.raises(ValueError, match=r"resets must be \[b, s\]"):
        lasp2_attention(q, q, q, group, resets=torch.zeros(1, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="exchange='ring'"):
        lasp2_attention(q, q, q, group, exchange="ring")
    return True


def test_bad_inputs_get_clear_errors():
    assert run_ranks(_bad_inputs, 2) == [True, True]
