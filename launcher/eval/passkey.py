"""Passkey retrieval under the training layout: the prompts of launcher/eval/passkey_prompts.py,
batched as the eval batches are (train.global_batch prompts a batch, each dp rank its contiguous
share in micro-batches of train.micro_batch, the last batch filled with rows that score nothing),
scored teacher-forced: a prompt is retrieved when the argmax at every answer position is the key's
token (launcher/eval/answer_logits.py), and the mean log-likelihood of the key's tokens comes from
the model's own per-token losses. Per-prompt sums are added over dp x sp (each sp rank holds some
answer positions; tp ranks hold copies) and over pp (only the last stage has them), so every rank
returns the same table.
"""

from __future__ import annotations

import dataclasses

import deepspeed
import torch
import torch.distributed as dist

from ithaca.data.batch import Batch
from ithaca.launcher.config.schema import RunConfig
from ithaca.launcher.eval.answer_logits import recording_hits
from ithaca.launcher.eval.loss import pipeline_losses
from ithaca.launcher.eval.passkey_prompts import PasskeyPrompts
from ithaca.launcher.eval.passkey_table import PasskeyTable, passkey_table
from ithaca.parallel.mesh import ParallelMesh


def rank_prompt_batches(prompts: PasskeyPrompts, *, global_batch: int, micro_batch: int, dp: int, dp_rank: int,
                        eos_id: int | None) -> list[list[tuple[Batch, torch.Tensor]]]:
    """This dp rank's (micro-batch, prompt index per row; -1: a filling row) of each prompt batch."""
    n = len(prompts.cells)
    batches = -(-n // global_batch)
    rows = batches * global_batch
    windows = torch.cat([prompts.windows, prompts.windows[:1].expand(rows - n, -1)])
    answer = torch.cat([prompts.answer, torch.zeros(rows - n, prompts.answer.shape[1], dtype=torch.bool)])
    index = torch.cat([torch.arange(n), torch.full((rows - n,), -1)])
    share, out = global_batch // dp, []
    for k in range(batches):
        first = k * global_batch + dp_rank * share
        micro = []
        for i in range(first, first + share, micro_batch):
            batch = Batch.from_window(windows[i: i + micro_batch], eos_id)
            labels = batch.labels.masked_fill(~answer[i: i + micro_batch], -100)
            micro.append((dataclasses.replace(batch, labels=labels), index[i: i + micro_batch]))
        out.append(micro)
    return out


def evaluate_passkey(engine: deepspeed.DeepSpeedEngine, cfg: RunConfig, prompts: PasskeyPrompts, mesh: ParallelMesh,
                     device: torch.device) -> PasskeyTable:
    """The passkey table of `prompts` under the engine's layout. Collective over the world."""
    n = len(prompts.cells)
    # per prompt: [answer tokens, tokens whose argmax is the key's, sum of their log-likelihoods]
    sums = torch.zeros(3, n + 1, dtype=torch.float64, device=device)  # column n takes the filling rows
    t = cfg.train
    batches = rank_prompt_batches(prompts, global_batch=t.global_batch, micro_batch=t.micro_batch, dp=mesh.dp,
                                  dp_rank=mesh.rank("dp"),
                                  eos_id=prompts.eos_id if cfg.data.document_mask else None)
    was_training = engine.training
    engine.eval()
    try:
        for micro_batches in batches:
            pieces = [b.part(mesh.sequence, sp_rank=mesh.rank("sp")).to(device) for b, _ in micro_batches]
            with recording_hits(engine.module) as hits:
                if mesh.pp > 1:
                    losses = pipeline_losses(engine, pieces)
                else:
                    with torch.no_grad():
                        losses = [engine(piece) for piece in pieces]
            for piece, loss, hit, (_, index) in zip(pieces, losses or [], hits, micro_batches):
                column = torch.where(index < 0, n, index).to(device)
                sums[0].index_add_(0, column, (piece.labels >= 0).sum(dim=1).double())
                sums[1].index_add_(0, column, hit)
                sums[2].index_add_(0, column, -loss.double().sum(dim=1))
    finally:
        engine.train(was_training)
    dist.all_reduce(sums, group=mesh.group("dp_sp"))
    dist.all_reduce(sums, group=mesh.group("pp"))
    return passkey_table(prompts, sums[:, :n].cpu())
