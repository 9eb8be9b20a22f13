"""The sequence layout: how a sequence is split over the sp ranks, and how each kind of layer crosses them.

One rule covers every method: zigzag over the ring ranks (2*ring chunks; rank r takes chunks r
and 2*ring-1-r), then contiguous over the Ulysses ranks inside each ring rank's part. Ulysses
alone (ring=1) is a contiguous split; ring alone (ulysses=1) is zigzag.

`SequenceLayout` holds the whole choice (sp, the softmax method and its Ulysses degree, the linear
layers' state exchange) and is checked once, when it is made. The mesh owns one
(`ParallelMesh.sequence`, whose ring and Ulysses groups it builds), so the groups, the attention
`parallelize` picks and the loader's split cannot disagree.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

import torch

from ithaca.parallel.zigzag import zigzag_split

SoftmaxMethod = Literal["ulysses", "ring", "usp", "allgather"]
StateExchange = Literal["allgather", "scan"]


class LayoutError(ValueError):
    """A sequence layout that cannot work: the field (named as the run config names it), its value, the fix."""

    def __init__(self, field: str, value: object, fix: str):
        super().__init__(f"{field}={value!r}: {fix}")
        self.field, self.value, self.fix = field, value, fix


@dataclass(frozen=True, kw_only=True)
class SequenceLayout:
    """The sequence-parallel layout of a run; raises LayoutError (a ValueError) naming the field that
    cannot work. Field names are the run config's (`parallel.sp_method`, `model.linear_sp_exchange`)."""

    sp: int = 1
    """Ranks the sequence is split over."""
    sp_method: SoftmaxMethod = "ulysses"
    """How softmax attention crosses them: Ulysses all-to-all, ring attention (zigzag), usp (Ulysses
    inside groups of `ulysses_degree` ranks, a ring across the groups) or allgather (every rank
    gathers all K/V; LASP-2H's choice for the few softmax layers of a hybrid)."""
    ulysses_degree: int | None = None
    """usp only: ranks per Ulysses group."""
    linear_sp_exchange: StateExchange = "allgather"
    """How linear (LASP-2) and delta-rule layers share their states: all-gathered, or scanned point to point."""

    def __post_init__(self) -> None:
        if self.sp < 1:
            raise LayoutError("sp", self.sp, "a degree is >= 1")
        if self.sp_method not in get_args(SoftmaxMethod):
            raise LayoutError("sp_method", self.sp_method, f"use one of {', '.join(get_args(SoftmaxMethod))}")
        if self.linear_sp_exchange not in get_args(StateExchange):
            raise LayoutError("linear_sp_exchange", self.linear_sp_exchange,
                              f"use one of {', '.join(get_args(StateExchange))}")
        if self.sp_method == "usp":
            if self.ulysses_degree is None or self.ulysses_degree < 1 or self.sp % self.ulysses_degree:
                raise LayoutError("ulysses_degree", self.ulysses_degree, f"usp needs ulysses_degree dividing "
                                  f"sp={self.sp} (ulysses_degree x ring degree = sp)")
        elif self.ulysses_degree is not None:
            raise LayoutError("ulysses_degree", self.ulysses_degree, f"only used with sp_method: usp (sp_method "
                              f"is {self.sp_method}); remove it")

    @property
    def ring(self) -> int:
        """Ranks in each attention ring; > 1 means the zigzag layout (for every layer kind)."""
        return {"ulysses": 1, "ring": self.sp, "usp": self.sp // (self.ulysses_degree or 1), "allgather": 1}[self.sp_method]

    @property
    def ulysses(self) -> int:
        """Ranks in each Ulysses all-to-all group (which must split the heads)."""
        return self.sp // self.ring if self.sp_method in ("ulysses", "usp") else 1

    @property
    def chunks(self) -> int:
        """Equal chunks a sequence is cut into: one per rank, two under the ring's zigzag."""
        return self.sp if self.ring == 1 else 2 * self.sp

    def part(self, x: torch.Tensor, sp_rank: int, dim: int = 1) -> torch.Tensor:
        """Rank `sp_rank`'s part of the whole sequence `x` along `dim` (see `sequence_part`)."""
        return sequence_part(x, sp_rank=sp_rank, sp=self.sp, ring=self.ring, dim=dim)


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
