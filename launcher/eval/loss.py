"""Forward-only eval loss under the training layout, summed token-weighted over every rank.

Each rank runs its piece (`Batch.part`, the mesh's sequence layout) of its dp share's micro-batches
through the engine without gradients: the model itself when pp = 1 (activation checkpointing does
nothing without gradients: models/mixer.py), DeepSpeed's inference schedule through the stages
when pp > 1. Every piece carries its tokens' document positions, so the per-token losses are
bucketed by position (launcher/eval/positions.py) on the rank that holds them; the sums over
dp x sp (each token once: tp ranks hold copies) and the last stage's broadcast make every rank's
totals the global ones, whatever the layout.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import deepspeed
import torch
import torch.distributed as dist

from ithaca.data.batch import Batch
from ithaca.launcher.eval.positions import bucket_bounds, bucket_of
from ithaca.parallel.mesh import ParallelMesh


@dataclass(frozen=True)
class EvalTotals:
    """An eval's token-weighted sums over every eval token of every rank."""

    loss_sum: float
    tokens: int
    bucket_sums: list[float]
    bucket_tokens: list[int]
    seq_len: int

    @property
    def loss(self) -> float:
        return self.loss_sum / self.tokens

    @property
    def ppl(self) -> float:
        return math.exp(min(self.loss, 700.0))  # exp overflows float64 past ~709

    def bucket_losses(self) -> dict[tuple[int, int], float]:
        """(first, last) position -> mean loss of the eval tokens there; buckets without tokens left out."""
        return {b: s / n for b, s, n in zip(bucket_bounds(self.seq_len), self.bucket_sums, self.bucket_tokens) if n}


class _CollectLosses:
    """The pipeline's loss_fn during an eval: keeps each micro-batch's per-token losses."""

    def __init__(self) -> None:
        self.losses: list[torch.Tensor] = []

    def __call__(self, losses: torch.Tensor, _labels: torch.Tensor) -> torch.Tensor:
        self.losses.append(losses.detach())
        return losses.sum()


def pipeline_losses(engine: deepspeed.DeepSpeedEngine, pieces: list[Batch]) -> list[torch.Tensor] | None:
    """Per-token losses of each piece through DeepSpeed's inference schedule: on the last stage, else None.

    The training loss_fn is swapped out for the eval and back, and the engine forgets the activation
    shapes before and after (the eval's seq_len may differ from training's), so the next training
    step sends and receives exactly as it would have without the eval.
    """
    module, collect = engine.module, _CollectLosses()
    train_loss_fn, module.loss_fn = module.loss_fn, collect
    engine.reset_activation_shape()
    try:
        engine.eval_batch(iter([p.pipeline_inputs() for p in pieces]), reduce_output=None, bcast_loss=False,
                          num_micro_batches=len(pieces))
    finally:
        module.loss_fn = train_loss_fn
        engine.reset_activation_shape()
    return collect.losses if engine.is_last_stage() else None


def evaluate(engine: deepspeed.DeepSpeedEngine, batches: list[list[Batch]], mesh: ParallelMesh,
             device: torch.device, seq_len: int) -> EvalTotals:
    """The eval totals of `batches` (this dp rank's micro-batches of each eval batch, whole windows of
    `seq_len` tokens). Collective over the world; every rank returns the same totals."""
    n_buckets = len(bucket_bounds(seq_len))
    # [loss sum, token count, bucket sums..., bucket counts...] in float64: sums of up to 2^53 tokens stay exact
    totals = torch.zeros(2 + 2 * n_buckets, dtype=torch.float64, device=device)
    was_training = engine.training
    engine.eval()
    try:
        for micro_batches in batches:
            pieces = [b.part(mesh.sequence, sp_rank=mesh.rank("sp")).to(device) for b in micro_batches]
            if mesh.pp > 1:
                losses = pipeline_losses(engine, pieces)
            else:
                with torch.no_grad():
                    losses = [engine(piece) for piece in pieces]
            for piece, loss in zip(pieces, losses or []):
                _add(totals, loss.double(), piece, n_buckets)
    finally:
        engine.train(was_training)
    dist.all_reduce(totals, group=mesh.group("dp_sp"))
    dist.all_reduce(totals, group=mesh.group("pp"))  # only the last stage holds losses: the sum is its totals
    values = totals.tolist()
    return EvalTotals(loss_sum=values[0], tokens=int(values[1]), bucket_sums=values[2:2 + n_buckets],
                      bucket_tokens=[int(v) for v in values[2 + n_buckets:]], seq_len=seq_len)


def _add(totals: torch.Tensor, losses: torch.Tensor, piece: Batch, n_buckets: int) -> None:
    counted = piece.labels >= 0  # the loss is 0 where a label is < 0, and those tokens are not counted
    buckets = bucket_of(piece.positions[counted])
    totals[0] += losses[counted].sum()
    totals[1] += counted.sum()
    totals[2:2 + n_buckets].index_add_(0, buckets, losses[counted])
    totals[2 + n_buckets:].index_add_(0, buckets, torch.ones_like(losses[counted]))
