"""The loss scale of a training step: what each rank multiplies its summed token losses by before
the backward pass, so that DeepSpeed's own averaging leaves the gradient of the global mean.

The rule (DESIGN.md, "Loss and counts under SP"). The loss of a step is

    loss = (sum of token losses over every dp x sp rank and micro-batch) / T

with T the real (label >= 0) tokens of the global batch, each counted once: every dp x sp rank
counts its own pieces and the counts are summed over the dp_sp group (tp ranks and pipeline
stages hold copies of the same tokens and are not added). Never a mean of per-rank means: ranks
and micro-batches hold different numbers of real tokens.

Each rank backpropagates `scale` x (its micro-batch's loss sum). DeepSpeed then sums the gradients
over the dp x sp ranks, divides the sum by a divisor D (`gradient_divisor`) and, accumulating M
micro-batches, divides by M as well. So

    scale = D * M / T    gives    gradient = (D * M / T) * sum / (D * M) = d(loss)

D is DeepSpeed's, as configured by this package:
- the plain engine: D = dp. Our mpu (parallel/megatron_bridge.py) tells DeepSpeed that the sp
  ranks share samples, so ZeRO 1-2 all-reduce over dp x sp and divide by dp x sp / sp
  (deepspeed/runtime/zero/stage_1_and_2.py:1508, DeepSpeed 0.19.8). ZeRO-3 does neither by
  itself; parallel/zero3.py partitions it over dp x sp and routes every gradient bucket through
  the all-reduce that divides by dp, the same D (that module says how, and checks it at start-up).
- the pipeline engine (pp > 1): D = dp x sp. Its grid (parallel/pipeline.py) has no sp axis: its
  data-parallel group is our dp x sp group, which it averages over.
The pipeline's loss function (parallel/pipeline.py, `TokenWeightedLoss`) applies the same scale
to each micro-batch on the last stage.
"""

from __future__ import annotations

from ithaca.parallel.mesh import ParallelMesh


def gradient_divisor(mesh: ParallelMesh, *, pipelined: bool) -> int:
    """D of the rule: what DeepSpeed divides the dp x sp sum of the gradients by, dp under the plain
    engine, dp x sp under the pipeline engine (module docstring)."""
    return mesh.dp * mesh.sp if pipelined else mesh.dp


def loss_scale(mesh: ParallelMesh, *, pipelined: bool, micro_batches: int, global_tokens: float) -> float:
    """scale = D * M / T: what each rank multiplies its micro-batches' loss sums by (module docstring).

    `pipelined`: the step runs on DeepSpeed's pipeline engine (mesh.pp > 1); `micro_batches`: M, the
    micro-batches each rank accumulates in the step; `global_tokens`: T, the real tokens of the
    global batch (each rank's count summed over the dp_sp group). Raises ValueError if M < 1 or T <= 0
    (a batch with no targets has no mean loss).
    """
    if micro_batches < 1:
        raise ValueError(f"loss_scale: micro_batches={micro_batches}; a step runs at least one")
    if not global_tokens > 0:
        raise ValueError(f"loss_scale: global_tokens={global_tokens}; the global batch needs a token with a "
                         "label >= 0")
    return gradient_divisor(mesh, pipelined=pipelined) * micro_batches / global_tokens
