"""The loss scale's rule (parallel/loss_scale.py, DESIGN.md "Loss and counts under SP"): each rank's
scaled loss sums, averaged as DeepSpeed averages gradients, give the global batch's mean token loss."""

from __future__ import annotations

import itertools
import random

import pytest

from ithaca.parallel.loss_scale import gradient_divisor, loss_scale
from ithaca.parallel.mesh import ParallelMesh
from ithaca.parallel.sequence_layout import SequenceLayout


def mesh_of(dp: int, sp: int, pp: int) -> ParallelMesh:
    """The degrees alone (no process group): all the scale reads."""
    return ParallelMesh(device_mesh=None, dp=dp, pp=pp, tp=1, sequence=SequenceLayout(sp=sp))


def deepspeed_average(per_rank: list[list[float]], dp: int, sp: int, pipelined: bool) -> float:
    """What DeepSpeed 0.19.8 does to the gradients of per_rank[rank][micro_batch] (dp x sp ranks,
    written down from its source, not from loss_scale.py): gradient accumulation divides each
    micro-batch's gradient by the micro-batch count; the data-parallel reduction sums over its group
    (dp x sp ranks in both engines) and divides by dp_world_size / sequence_parallel_size under
    ZeRO 1-2 with our mpu (dp x sp / sp; ZeRO-3 is routed to the same, parallel/zero3.py), by its
    data-parallel world size (dp x sp: its grid has no sp axis) under the pipeline engine."""
    micro_batches = len(per_rank[0])
    summed = sum(g / micro_batches for rank in per_rank for g in rank)
    return summed / (dp * sp if pipelined else dp * sp / sp)


@pytest.mark.parametrize("dp, sp, pp, micro_batches", [
    (1, 1, 1, 1), (2, 1, 1, 1), (1, 2, 1, 1), (2, 2, 1, 3), (4, 2, 1, 2), (1, 4, 1, 5),
    (1, 1, 2, 4), (2, 1, 2, 2), (1, 2, 2, 3), (2, 4, 4, 8),
])
def test_scaled_sums_averaged_as_deepspeed_does_give_the_global_mean(dp, sp, pp, micro_batches):
    rng = random.Random(dp * 1000 + sp * 100 + pp * 10 + micro_batches)
    ranks = dp * sp  # one pipeline replica's dp x sp ranks: every stage's gradient is averaged alike
    # per rank and micro-batch: (its token-loss sum, its real tokens); counts differ (padding, labels < 0)
    pieces = [[(rng.uniform(0, 50), rng.randint(1, 40)) for _ in range(micro_batches)] for _ in range(ranks)]
    global_tokens = float(sum(t for rank in pieces for _, t in rank))
    global_mean = sum(loss for rank in pieces for loss, _ in rank) / global_tokens
    pipelined = pp > 1
    scale = loss_scale(mesh_of(dp, sp, pp), pipelined=pipelined, micro_batches=micro_batches,
                       global_tokens=global_tokens)
    scaled = [[scale * loss for loss, _ in rank] for rank in pieces]  # d(scale * sum) = scale * d(sum)
    assert deepspeed_average(scaled, dp, sp, pipelined) == pytest.approx(global_mean, rel=1e-12)
    # the same statement per token: the weight each token's loss gets is 1 / global_tokens
    assert scale / (gradient_divisor(mesh_of(dp, sp, pp), pipelined=pipelined) * micro_batches) == \
        pytest.approx(1 / global_tokens, rel=1e-15)


def test_a_mean_of_per_rank_means_is_not_the_rule():
    """Two sp ranks, one holding 1 real token and one 3: the global mean weighs every token alike."""
    (loss_a, tokens_a), (loss_b, tokens_b) = (4.0, 1), (3.0, 3)
    scale = loss_scale(mesh_of(1, 2, 1), pipelined=False, micro_batches=1, global_tokens=tokens_a + tokens_b)
    got = deepspeed_average([[scale * loss_a], [scale * loss_b]], dp=1, sp=2, pipelined=False)
    assert got == pytest.approx(7.0 / 4) and got != pytest.approx((loss_a / tokens_a + loss_b / tokens_b) / 2)


def test_the_divisor_is_dp_without_and_dp_x_sp_with_the_pipeline():
    for dp, sp in itertools.product((1, 2, 4), (1, 2, 8)):
        assert gradient_divisor(mesh_of(dp, sp, 1), pipelined=False) == dp
        assert gradient_divisor(mesh_of(dp, sp, 2), pipelined=True) == dp * sp


@pytest.mark.parametrize("micro_batches, global_tokens, field", [(0, 10.0, "micro_batches"),
                                                                  (1, 0.0, "global_tokens")])
def test_a_step_without_micro_batches_or_targets_is_refused(micro_batches, global_tokens, field):
    with pytest.raises(ValueError, match=f"loss_scale: {field}="):
        loss_scale(mesh_of(1, 1, 1), pipelined=False, micro_batches=micro_batches, global_tokens=global_tokens)
