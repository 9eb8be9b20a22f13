"""The one place that sets the global parallel state megatron-core and DeepSpeed need.

megatron-core's tensor-parallel layers and vocab-parallel cross-entropy read their groups from
`megatron.core.parallel_state`; DeepSpeed reads them from an `mpu` object. Both are set here
from our `ParallelMesh`, and the rank sets are checked to be the same, so no other module
touches either global state.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed.distributed_c10d as c10d
from megatron.core import parallel_state
from megatron.core.model_parallel_config import ModelParallelConfig

from ithaca.parallel.mesh import ParallelMesh


def initialize_megatron(mesh: ParallelMesh) -> None:
    """Create megatron-core's groups (sp as its context-parallel axis) and check they match the mesh."""
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    # megatron-core passes its own timeout to its groups: the default's, which the launcher sets to
    # train.collective_timeout (launcher/runtime/distributed.py); it is a timedelta(minutes=...) inside.
    timeout_minutes = c10d.default_pg_timeout.total_seconds() / 60
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=mesh.tp, pipeline_model_parallel_size=mesh.pp,
        context_parallel_size=mesh.sp, create_gloo_process_groups=False,
        distributed_timeout_minutes=timeout_minutes)
    theirs = {
        "tp": parallel_state.get_tensor_model_parallel_group(),
        "sp": parallel_state.get_context_parallel_group(),
        "dp": parallel_state.get_data_parallel_group(),
        "dp_sp": parallel_state.get_data_parallel_group(with_context_parallel=True),
        "pp": parallel_state.get_pipeline_model_parallel_group(),
    }
    for axis, group in theirs.items():
        ours, megatron = mesh.ranks(axis), dist.get_process_group_ranks(group)
        assert ours == megatron, f"mesh axis {axis}: ranks {ours} but megatron-core has {megatron}"


def model_parallel_config(mesh: ParallelMesh, dtype: torch.dtype) -> ModelParallelConfig:
    """megatron-core layer settings for this mesh.

    Weights are initialized whole on the CPU and then split, so every tp degree starts from the
    same master weights (and gloo/CPU runs need no CUDA RNG tracker).
    """
    return ModelParallelConfig(
        tensor_model_parallel_size=mesh.tp, pipeline_model_parallel_size=mesh.pp,
        context_parallel_size=mesh.sp, use_cpu_initialization=True, perform_initialization=True,
        params_dtype=dtype, pipeline_dtype=dtype, gradient_accumulation_fusion=False)


class DeepSpeedMpu:
    """The `mpu` DeepSpeed reads (deepspeed/utils/groups.py).

    "Model parallel" is tp. ZeRO partitions and reduces gradients over the sequence-data-parallel
    group dp x sp; DeepSpeed then divides by dp alone (sp ranks hold parts of the same samples),
    which the training loss accounts for. ZeRO-3 does so only with parallel/zero3.py's settings.
    """

    def __init__(self, mesh: ParallelMesh):
        self.mesh = mesh

    def get_model_parallel_rank(self) -> int:
        return self.mesh.rank("tp")

    def get_model_parallel_world_size(self) -> int:
        return self.mesh.tp

    def get_model_parallel_group(self) -> dist.ProcessGroup:
        return self.mesh.group("tp")

    get_tensor_model_parallel_rank = get_model_parallel_rank
    get_tensor_model_parallel_world_size = get_model_parallel_world_size
    get_tensor_model_parallel_group = get_model_parallel_group

    def get_data_parallel_rank(self) -> int:
        return self.mesh.rank("dp")

    def get_data_parallel_world_size(self) -> int:
        return self.mesh.dp

    def get_data_parallel_group(self) -> dist.ProcessGroup:
        return self.mesh.group("dp")

    def get_sequence_parallel_rank(self) -> int:
        return self.mesh.rank("sp")

    def get_sequence_parallel_world_size(self) -> int:
        return self.mesh.sp

    def get_sequence_parallel_group(self) -> dist.ProcessGroup:
        return self.mesh.group("sp")

    def get_sequence_data_parallel_rank(self) -> int:
        return dist.get_rank(self.mesh.group("dp_sp"))

    def get_sequence_data_parallel_world_size(self) -> int:
        return self.mesh.dp * self.mesh.sp

    def get_sequence_data_parallel_group(self) -> dist.ProcessGroup:
        return self.mesh.group("dp_sp")
