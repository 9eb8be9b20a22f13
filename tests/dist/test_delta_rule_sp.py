"""delta_rule_attention over gloo equals the single-process delta-rule recurrence, forward and backward,
with either exchange (the all-gather of transition pairs, the point-to-point scan of states).

Twin pattern (tests/twin.py): every rank draws the full inputs from one seed (as Gated DeltaNet feeds
them: L2-normed keys, sigmoid beta, logsigmoid gates, packed documents), runs the token recurrence on
the whole sequence once, then delta_rule_attention on its part with each exchange, and compares its
part of the output and of every gradient (q, k, v, beta, gates) under a random cotangent. The inputs
have long memory (beta ~0.1, gates ~0.98), and each twin checks that the state carried between pieces
changes the output by far more than the tolerance, so a dropped or wrong incoming state fails.
Both exchanges share one rank job per layout and one reference per case: the token recurrence is
the costly part, so the scan adds little time.
"""

from __future__ import annotations

from functools import partial
from typing import Callable

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from harness import run_ranks
from twin import Input, check_twin

H, DK, DV = 2, 8, 6
# fp32, as tests/kernels/test_delta_rule.py: the chunked form and the cross-rank composition
# reorder sums of O(1) terms; 1e-4 covers that and still fails on a missing or wrong incoming state.
TOL = dict(rtol=1e-4, atol=1e-4)
CARRIED = 1e-2
"""Smallest change the incoming state must make to every non-first piece's output: 100x the tolerance."""


def _inputs(decay: str, b: int, n: int, n_pieces: int) -> dict[str, Input]:
    """Full-sequence inputs with long memory; resets at token 0, at a piece boundary and at random."""
    def resets_of(u: torch.Tensor) -> torch.Tensor:
        resets = u < 0.04
        resets[0, 0] = True  # the very first token
        resets[:, n // n_pieces] = torch.tensor([False, True])  # the second piece: row 0 receives a state, row 1 a reset
        return resets

    inputs = {"q": Input((b, n, H, DK)),
              "k": Input((b, n, H, DK), then=lambda z: F.normalize(z, dim=-1)),
              "v": Input((b, n, H, DV)),
              "beta": Input((b, n, H), then=lambda z: torch.sigmoid(z - 2))}
    if decay == "gated":
        inputs["log_decay"] = Input((b, n, H), then=lambda z: F.logsigmoid(z + 4))
    if decay == "fixed":  # a per-head constant every rank holds whole, as in test_lasp2.py
        inputs["log_decay"] = Input.constant(torch.log(1 - 2.0 ** (-4 - torch.arange(H, dtype=torch.float32))))
    inputs["resets"] = Input((b, n), has_grad=False, draw="uniform", then=resets_of)
    return inputs


def _twin(decay: str, s: int, seed: int, ring: int) -> None:
    from ithaca.kernels.delta_rule import delta_rule
    from ithaca.parallel import delta_rule_attention, sequence_part
    from ithaca.parallel.sequence_layout import piece_order

    rank, world, group = dist.get_rank(), dist.get_world_size(), dist.group.WORLD
    mine_pieces, n_pieces = piece_order(sp_rank=rank, sp=world, ring=ring)
    b, n = 2, s * world
    where = f"decay={decay} s={s} ring={ring} rank={rank}/{world}"

    def parallel(exchange: str) -> Callable[..., torch.Tensor]:
        return lambda q, k, v, beta, **rest: delta_rule_attention(q, k, v, beta, group, ring=ring, exchange=exchange,
                                                                  **rest)

    runs = check_twin(lambda q, k, v, beta, **rest: delta_rule(q, k, v, beta, impl="reference", **rest)[0],
                      {f"exchange={exchange}": parallel(exchange) for exchange in ("allgather", "scan")},
                      _inputs(decay, b, n, n_pieces), part=partial(sequence_part, sp_rank=rank, sp=world, ring=ring),
                      seed=seed, tol=TOL, where=where)

    size = s // len(mine_pieces)
    for exchange, run in runs.items():
        for i, p in enumerate(mine_pieces):
            if p == 0:
                continue  # the sequence's first piece receives nothing
            part = slice(i * size, (i + 1) * size)
            with torch.no_grad():
                piece = {name: t if t.dim() == 1 else t[:, part] for name, t in run.inputs.items()}  # [h]: a fixed decay
                alone, _ = delta_rule(piece.pop("q"), piece.pop("k"), piece.pop("v"), piece.pop("beta"),
                                      **piece)  # the piece from a zero state
            carried = (alone - run.out[:, part]).abs().max().item()
            assert carried > CARRIED, (f"piece {p} {exchange} {where}: the incoming state moves the output by only "
                                       f"{carried:.2e}")


CASES = [(decay, s) for decay in ("none", "fixed", "gated") for s in (12, 140)]
"""Local lengths: 12 (one chunk, zigzag pieces of 6) and 140 (chunks of 64, 64, 12; zigzag 64 + 6)."""


def _all_cases(ring: int) -> int:
    for i, (decay, s) in enumerate(CASES):
        _twin(decay, s, seed=i, ring=ring)
    return len(CASES)


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("layout", ["contiguous", "zigzag"])
def test_delta_rule_attention_matches_the_recurrence(world, layout):
    assert run_ranks(_all_cases, world, 1 if layout == "contiguous" else world) == [len(CASES)] * world


def test_delta_rule_attention_in_the_usp_layout():
    assert run_ranks(_all_cases, 4, 2) == [len(CASES)] * 4  # 2 Ulysses ranks x a ring of 2


def _elements_moved(s: int) -> tuple[int, int]:
    from ithaca.bench.comm_counter import count_bytes_sent
    from ithaca.parallel import delta_rule_attention

    q = torch.randn(1, s, H, DK, requires_grad=True)
    v = torch.randn(1, s, H, DV, requires_grad=True)
    beta = torch.rand(1, s, H, requires_grad=True)
    with count_bytes_sent() as counter:
        delta_rule_attention(q, F.normalize(q, dim=-1), v, beta, dist.group.WORLD).sum().backward()
    return counter.elements_gathered, counter.elements_reduce_scattered


def test_traffic_is_one_pair_per_rank_and_independent_of_length():
    world = 2
    expected = world * 1 * H * DK * (DK + DV)  # P * b * h * (A's d_k^2 + B's d_k d_v)
    for moved in run_ranks(_elements_moved, world, 16) + run_ranks(_elements_moved, world, 32):
        assert moved == (expected, expected)


def _bytes_sent(lengths: tuple[int, ...]) -> dict[tuple[str, int], int]:
    from ithaca.bench.comm_counter import count_bytes_sent
    from ithaca.parallel import delta_rule_attention

    sent = {}
    for s in lengths:
        q = torch.randn(2, s, H, DK, requires_grad=True)
        v = torch.randn(2, s, H, DV, requires_grad=True)
        beta = torch.rand(2, s, H, requires_grad=True)
        for exchange in ("allgather", "scan"):
            with count_bytes_sent() as counter:
                delta_rule_attention(q, F.normalize(q, dim=-1), v, beta, dist.group.WORLD,
                                     exchange=exchange).sum().backward()
            sent[exchange, s] = counter.bytes_sent
    return sent


def test_scan_traffic_is_one_state_per_neighbour_whatever_p_and_length():
    """With the scan each rank sends one fp32 state forward (but the last) and one gradient back (but
    the first), never A: the ends send one state at P=2 and P=4 alike, inner ranks two. The all-gather
    sends 2 (P-1) (A, B) pairs (gather and reduce-scatter), so at P=4 every rank sends more."""
    state = 2 * H * DK * DV * 4  # b=2 rows, fp32
    pair = 2 * H * DK * (DK + DV) * 4
    for world in (2, 4):
        for r, sent in enumerate(run_ranks(_bytes_sent, world, (16, 32))):
            for s in (16, 32):
                assert sent["scan", s] == state * ((r < world - 1) + (r > 0)), (world, r, sent)
                assert sent["allgather", s] == 2 * (world - 1) * pair, (world, r, sent)
                assert world == 2 or sent["scan", s] < sent["allgather", s], (world, r, sent)


def _bad_inputs() -> bool:
    from ithaca.parallel import delta_rule_attention

    q = torch.randn(1, 4, 2, 8)
    beta = torch.rand(1, 4, 2)
    group = dist.group.WORLD
    with pytest.raises(ValueError, match=r"beta must be \[b, s, h\]"):
        delta_rule_attention(q, q, q, torch.rand(1, 4, 3), group)
    with pytest.raises(ValueError, match="exchange='ring'; choose 'allgather' or 'scan'"):
        delta_rule_attention(q, q, q, beta, group, exchange="ring")
    with pytest.raises(ValueError, match="ring=3"):
        delta_rule_attention(q, q, q, beta, group, ring=3)
    with pytest.raises(ValueError, match="ring=2"):  # a zigzag part of odd length
        delta_rule_attention(q[:, :3], q[:, :3], q[:, :3], beta[:, :3], group, ring=2)
    with pytest.raises(ValueError, match="want q = k"):
        delta_rule_attention(q, torch.randn(1, 4, 3, 8), q, beta, group)
    return True


def test_bad_inputs_get_clear_errors():
    assert run_ranks(_bad_inputs, 2) == [True, True]
