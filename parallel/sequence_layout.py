"""Which part of a full sequence each sequence-parallel rank holds.

One rule covers every method: zigzag over the ring ranks (2*ring chunks; rank r takes chunks r
and 2*ring-1-r), then contiguous over the Ulysses ranks inside each ring rank's part. Ulysses
alone (ring=1) is a contiguous split; ring alone (ulysses=1) is zigzag.
"""

from __future__ import annotations

import torch

from ithaca.parallel.zigzag import zigzag_split


def sequence_part(x: torch.Tensor, *, sp_rank: int, sp: int, ring: int, dim: int = 1) -> torch.Tensor:
    """This sp rank's part of `x` along `dim` (sp_rank = ring_rank * (sp // ring) + ulysses_rank).

    Raises ValueError if the length does not divide into the layout's chunks.
    """
    ulysses = sp // ring
    ring_rank, ulysses_rank = divmod(sp_rank, ulysses)
    part = zigzag_split(x, ring_rank, ring, dim) if ring > 1 else x
    if part.shape[dim] % ulysses:
        raise ValueError(f"sequence_part: length {x.shape[dim]} does not split over ring={ring} x ulysses={ulysses}")
    return part.chunk(ulysses, dim=dim)[ulysses_rank]
