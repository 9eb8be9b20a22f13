"""ZeRO-3 under sequence parallelism: partitions over dp x sp, gradients summed there and divided by dp.

Sequence-parallel ranks hold different tokens of the same samples and the same weights, so a
weight's gradient is the sum over the sp ranks and the mean over the dp ranks. The loss scale
(parallel/loss_scale.py, whose rule this module keeps true under ZeRO-3) is set for DeepSpeed
summing over dp x sp and dividing by dp, which is what ZeRO-1/2 do
(deepspeed/runtime/zero/stage_1_and_2.py:1508, divide by dp_sp/sp). DeepSpeed 0.19.8's ZeRO-3,
given our mpu, does neither (line numbers in deepspeed/runtime/):

- zero/parameter_offload.py:268 converts the model with zero.Init over `mpu.get_data_parallel_group()`,
  dp alone, so every parameter is partitioned over dp (zero/partition_parameters.py:1302) and its
  gradient is reduce-scattered over that group (zero/stage3.py:644, 1916): the sp ranks never add
  their gradients. DeepSpeed places replicated parameters over dp x sp itself (engine.py:2252),
  but only with MoE or AutoTP (engine.py:2713).
- Over dp x sp, the default reduce-scatter path (zero/stage3.py:1673, 1931) divides by the group
  size dp*sp (comm/coalesced_collectives.py:124); only the all-reduce path taken with
  `reduce_scatter: false` divides by dp*sp/sp = dp (zero/stage3.py:1878), as stages 1 and 2 do.

So every parameter is marked for partitioning over dp x sp before DeepSpeed converts it (the
attribute zero.Init reads, partition_parameters.py:1302), and ZeRO-3 runs with `reduce_scatter: false`
and a bucket no smaller than the largest parameter, so every bucket takes the all-reduce path
(zero/stage3.py:1583, 1626, 1673). The gradient norm then adds each dp x sp rank's own partition
once (zero/stage3.py:2469), then the tp ranks' for tp-split weights. The cost: the gradients are
all-reduced, twice the bytes of a reduce-scatter.
"""

from __future__ import annotations

import torch.distributed as dist
from deepspeed.runtime.config_utils import get_config_default
from deepspeed.runtime.zero.config import DeepSpeedZeroConfig
from torch import nn

from ithaca.parallel.mesh import ParallelMesh


def prepare_zero3_sequence_parallel(model: nn.Module, mesh: ParallelMesh) -> dict[str, bool | int]:
    """Mark `model`'s parameters for ZeRO-3 partitioning over dp x sp; call before deepspeed.initialize.

    Returns the "zero_optimization" entries that route every gradient bucket through the
    all-reduce over dp x sp that divides by dp.
    """
    group = mesh.group("dp_sp")
    for p in model.parameters():
        p.ds_zero_partition_process_group = group
    largest = max(p.numel() for p in model.parameters())
    default = get_config_default(DeepSpeedZeroConfig, "reduce_bucket_size")
    # A parameter larger than the bucket is reduce-scattered alone (zero/stage3.py:1673): ÷ dp*sp.
    # int(): DeepSpeed's default is its own pp_int, which lands in the checkpoint's pickled ds_config
    # and which weights_only loading (launcher/checkpoint/store.py) refuses.
    return {"reduce_scatter": False, "contiguous_gradients": True, "reduce_bucket_size": int(max(default, largest))}


def check_zero3_sequence_parallel(model: nn.Module, optimizer: object, mesh: ParallelMesh) -> None:
    """Raise RuntimeError unless the built ZeRO-3 optimizer partitions and reduces as prepared above.

    These are the facts the gradient's divisor rests on; a DeepSpeed other than 0.19.8 may drop one.
    """
    want = mesh.ranks("dp_sp")
    for name, p in model.named_parameters():
        got = dist.get_process_group_ranks(p.ds_process_group)
        if got != want:
            raise RuntimeError(f"ZeRO-3 partitions {name} over ranks {got}, not dp x sp {want}: this DeepSpeed "
                               "ignores ds_zero_partition_process_group (parallel/zero3.py)")
    facts = {"reduce_scatter": optimizer.reduce_scatter, "contiguous_gradients": optimizer.contiguous_gradients,
             "sequence_parallel_size": optimizer.sequence_parallel_size}
    if facts != {"reduce_scatter": False, "contiguous_gradients": True, "sequence_parallel_size": mesh.sp}:
        raise RuntimeError(f"ZeRO-3 optimizer has {facts}; the gradient divisor dp needs the all-reduce path "
                           f"and sequence_parallel_size={mesh.sp} (parallel/zero3.py)")
