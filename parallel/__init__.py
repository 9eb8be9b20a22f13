"""Parallelism: the device mesh, sequence-parallel attention, and the megatron-core/DeepSpeed bridge."""

from ithaca.parallel.mesh import ParallelMesh, build_mesh
from ithaca.parallel.ulysses import ulysses_attention

__all__ = ["ParallelMesh", "build_mesh", "ulysses_attention"]
