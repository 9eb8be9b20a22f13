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


def piece_order(*, sp_rank: int, sp: int, ring: int) -> tuple[list[int], int]:
    """Where this rank's part sits in the whole sequence, for methods that need the order of pieces.

    Returns (global indices of the pieces this rank holds, in its local order; number of pieces).
    The sequence is cut into 2*ring*ulysses pieces (ulysses pieces when ring=1), each zigzag chunk
    into `ulysses` of them: ring rank r's part is chunk r then chunk 2*ring-1-r, and Ulysses rank u
    holds its u-th contiguous share, two pieces.
    """
    ulysses = sp // ring
    if ring == 1:
        return [sp_rank], sp
    ring_rank, ulysses_rank = divmod(sp_rank, ulysses)
    part = [ring_rank * ulysses + i for i in range(ulysses)]
    part += [(2 * ring - 1 - ring_rank) * ulysses + i for i in range(ulysses)]
    return part[2 * ulysses_rank: 2 * ulysses_rank + 2], 2 * sp
