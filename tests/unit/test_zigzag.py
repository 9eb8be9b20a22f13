from __future__ import annotations

import pytest
import torch

from ithaca.parallel import sequence_part, zigzag_merge, zigzag_split


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_split_gives_chunks_r_and_mirror_and_merge_inverts_it(world):
    x = torch.arange(2 * world * 3).view(1, -1)  # chunks of 3 positions
    parts = [zigzag_split(x, r, world) for r in range(world)]
    for r, part in enumerate(parts):
        assert part[0, :3].tolist() == list(range(3 * r, 3 * r + 3))
        mirror = 2 * world - 1 - r
        assert part[0, 3:].tolist() == list(range(3 * mirror, 3 * mirror + 3))
    assert torch.equal(zigzag_merge(parts), x)


def test_length_must_divide_into_2p_chunks():
    with pytest.raises(ValueError, match="length 10 along dim 1 must be divisible by 2\\*world=4"):
        zigzag_split(torch.zeros(1, 10), 0, 2)


@pytest.mark.parametrize("sp, ring", [(2, 1), (4, 1), (2, 2), (4, 4), (4, 2), (8, 2), (8, 4)])
def test_piece_order_names_what_sequence_part_holds(sp, ring):
    from ithaca.parallel.sequence_layout import piece_order

    n_pieces = piece_order(sp_rank=0, sp=sp, ring=ring)[1]
    x = torch.arange(n_pieces * 3).view(1, -1)  # pieces of 3 positions
    for rank in range(sp):
        pieces, _ = piece_order(sp_rank=rank, sp=sp, ring=ring)
        expected = torch.cat([x[:, 3 * p: 3 * p + 3] for p in pieces], dim=1)
        assert torch.equal(sequence_part(x, sp_rank=rank, sp=sp, ring=ring), expected), (rank, pieces)
