"""Parallelism: the device mesh, sequence-parallel attention, and the megatron-core/DeepSpeed bridge.

A model laid out on a mesh (tp, pp, sp per layer kind): `ithaca.parallel.parallelize.parallelize_llama`
(imported from its module: it pulls in megatron-core, and with pp > 1 DeepSpeed's pipeline engine).
"""

from ithaca.parallel.allgather_kv import allgather_kv_attention
from ithaca.parallel.delta_rule import delta_rule_attention
from ithaca.parallel.halo import sequence_parallel_causal_conv1d
from ithaca.parallel.lasp2 import lasp2_attention
from ithaca.parallel.mesh import ParallelMesh, build_mesh
from ithaca.parallel.ring import ring_attention
from ithaca.parallel.sequence_layout import SequenceLayout, sequence_part
from ithaca.parallel.ulysses import ulysses_attention
from ithaca.parallel.usp import usp_attention
from ithaca.parallel.zigzag import zigzag_merge, zigzag_split

__all__ = ["ParallelMesh", "SequenceLayout", "allgather_kv_attention", "build_mesh", "delta_rule_attention", "lasp2_attention", "ring_attention", "sequence_parallel_causal_conv1d", "sequence_part", "ulysses_attention", "usp_attention",
           "zigzag_merge", "zigzag_split"]
