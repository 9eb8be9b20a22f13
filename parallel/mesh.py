"""The device mesh: one object that owns the dp x pp x tp x sp layout and its process groups.

Rank order matches megatron-core's default "tp-cp-ep-dp-pp" (tp fastest, then sp, dp, pp):

    rank = tp_rank + tp * (sp_rank + sp * (dp_rank + dp * pp_rank))

Example, dp=2 sp=2 tp=2 (8 ranks): tp groups {0,1} {2,3} ...; sp groups {0,2} {1,3} {4,6} {5,7};
dp groups {0,4} {1,5} {2,6} {3,7}. Tensor-parallel peers are neighbours (fastest links), then
sequence-parallel peers.

The sp axis is itself ring x ulysses (ulysses faster): sp_rank = ring_rank * ulysses + ulysses_rank,
so a Ulysses all-to-all stays among close ranks and the ring crosses groups (2D sequence
parallelism). Plain Ulysses is ring=1; plain ring attention is ulysses=1.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from ithaca.parallel.sequence_layout import SequenceLayout

AXES = ("pp", "dp", "ring", "ulysses", "tp")  # slowest to fastest; "sp" and "dp_sp" are flattened


@dataclass(frozen=True)
class ParallelMesh:
    """Named axes over a torch DeviceMesh: "dp", "pp", "tp", "sp" (= "ring" x "ulysses") and "dp_sp",
    and the sequence layout whose ring and Ulysses groups they are."""

    device_mesh: DeviceMesh
    dp: int
    pp: int
    tp: int
    sequence: SequenceLayout

    @property
    def sp(self) -> int:
        return self.sequence.sp

    @property
    def ring(self) -> int:
        return self.sequence.ring

    def group(self, axis: str) -> dist.ProcessGroup:
        """The process group along one axis: "dp", "pp", "tp", "sp", "ring", "ulysses" or "dp_sp"."""
        return self.device_mesh.get_group(axis)

    def rank(self, axis: str) -> int:
        return dist.get_rank(self.group(axis))

    def ranks(self, axis: str) -> list[int]:
        """Global ranks of this rank's group along `axis`, in group order."""
        return dist.get_process_group_ranks(self.group(axis))


def build_mesh(*, dp: int, pp: int, tp: int, device_type: str,
               sequence: SequenceLayout = SequenceLayout()) -> ParallelMesh:
    """Build every group of the layout; needs an initialized default process group of
    dp*pp*tp*sequence.sp ranks. `sequence` (default: no sequence parallelism) says how the sp ranks
    split a sequence; its ring degree shapes the "ring" and "ulysses" axes, e.g.

        build_mesh(dp=1, pp=1, tp=1, device_type="cpu", sequence=SequenceLayout(sp=2, sp_method="ring"))
    """
    sp, ring = sequence.sp, sequence.ring
    world = dist.get_world_size()
    if dp * pp * tp * sp != world:
        raise ValueError(f"build_mesh: dp*pp*tp*sp={dp * pp * tp * sp} must equal the world size {world}")
    mesh = init_device_mesh(device_type, (pp, dp, ring, sp // ring, tp), mesh_dim_names=AXES)
    mesh["ring", "ulysses"]._flatten("sp")
    mesh["dp", "ring", "ulysses"]._flatten("dp_sp")
    return ParallelMesh(device_mesh=mesh, dp=dp, pp=pp, tp=tp, sequence=sequence)
