from __future__ import annotations

import pytest
import torch

from ithaca.parallel import zigzag_merge, zigzag_split


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
