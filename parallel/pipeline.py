"""Pipeline parallelism: the Llama as DeepSpeed pipeline stages (`deepspeed.pipe`).

Why DeepSpeed's engine and not torch.distributed.pipelining: the rest of a run is a DeepSpeed
engine (optimizer, ZeRO-1, bf16, clipping, checkpoints); its PipelineEngine is that engine with a
1F1B schedule, runs over gloo on CPU, and keeps every other feature as it is. torch's pipelining
would need its own optimizer, clipping and checkpoint path beside DeepSpeed's.

The model is a flat list of parts: [embedding, block 0 .. block L-1, final norm, output loss].
Stage s holds a contiguous run of blocks (stage 0 also the embedding, the last stage also the norm
and the loss). The first stage loads each micro-batch as its Batch's tuple (data/batch.py,
`Batch.pipeline_inputs`); between parts, and between stages, travels one tuple of tensors, the
hidden stream before the same Batch tuple in the same order:

    (x, residual, tokens, labels, positions[, doc_ids, resets])

x is the last block's output not yet added to the residual stream (the fused-norm convention of
models/llama.py); between stages x and the residual travel stacked as one [2, b, s, dim] tensor
(one backward call per stage). The micro-batch rides with them whole, so every part reads the
same Batch (the tokens too: one int64 per token beside 2 x dim activations); resets travel as
uint8 (DeepSpeed's p2p sends no bool over gloo) and integer tensors get no gradient. The last
stage returns per-token losses and the loss function sums them, scaled by the step's loss scale
(parallel/loss_scale.py).

Rank layout: DeepSpeed's grid sees axes (pipe, data, model) = (pp, dp x sp, tp), which is our
mesh's order (pp slowest, tp fastest) with dp x sp flattened; its "data" group is our dp_sp group,
so ZeRO-1 reduces gradients over dp x sp and divides by dp x sp (parallel/loss_scale.py).
"""

from __future__ import annotations

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.pipe import LayerSpec, PipelineModule, TiedLayerSpec
from deepspeed.runtime.pipe.topology import ProcessTopology
from megatron.core.model_parallel_config import ModelParallelConfig
from torch import nn

from ithaca.data.batch import Batch
from ithaca.log import get_logger
from ithaca.models.llama import build_block, build_embedding, build_head
from ithaca.models.llama_args import LlamaArgs
from ithaca.models.mixer import SequenceInfo
from ithaca.models.norm import RMSNorm
from ithaca.parallel.mesh import ParallelMesh

log = get_logger(__name__)

Activations = tuple[torch.Tensor, ...]


def pack(x: torch.Tensor, residual: torch.Tensor | None, batch: Batch) -> tuple:
    """The tuple one part hands the next: (x, residual, *batch.to_tuple()) (residual is None only
    inside stage 0, right after the embedding)."""
    return (x, residual, *batch.to_tuple())


def unpack(items: tuple) -> tuple[torch.Tensor, torch.Tensor | None, Batch]:
    """pack's inverse -> (x, residual, batch)."""
    x, residual, *fields = items
    return x, residual, Batch.from_tuple(fields)


class EmbeddingPart(nn.Module):
    """A Batch's tuple (`Batch.pipeline_inputs`) -> the activations tuple; with tied embeddings
    the same module ends the pipeline too (`loss`), so DeepSpeed ties its weight across the stages."""

    def __init__(self, args: LlamaArgs, mp: ModelParallelConfig, seed: int, tp_group: dist.ProcessGroup | None):
        super().__init__()
        self.embed = build_embedding(args, mp, seed)
        if args.tie_embeddings:
            self.head = build_head(args, mp, seed, tp_group)  # holds no weight of its own

    def forward(self, inputs: Activations) -> tuple:
        batch = Batch.from_tuple(inputs)
        return pack(self.embed(batch.tokens), None, batch)

    def loss(self, inputs: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        hidden, labels = inputs
        return self.head(hidden, labels, weight=self.embed.weight)


class BlockPart(nn.Module):
    def __init__(self, args: LlamaArgs, mp: ModelParallelConfig, seed: int, layer: int, tp_rank: int):
        super().__init__()
        self.block = build_block(args, mp, seed, layer, tp_rank)

    def forward(self, inputs: tuple) -> tuple:
        x, residual, batch = unpack(inputs)
        x, residual = self.block(x, residual, SequenceInfo.of(batch))
        return pack(x, residual, batch)


class FinalNormPart(nn.Module):
    def __init__(self, args: LlamaArgs):
        super().__init__()
        self.norm = RMSNorm(args.dim, args.norm_eps, args.kernels)

    def forward(self, inputs: tuple) -> tuple[torch.Tensor, torch.Tensor]:
        x, residual, batch = unpack(inputs)
        hidden, _ = self.norm(x, residual)
        return hidden, batch.labels


class LossPart(nn.Module):
    """(hidden, labels) -> per-token losses [b, s] (the output head of an untied model)."""

    def __init__(self, args: LlamaArgs, mp: ModelParallelConfig, seed: int, tp_group: dist.ProcessGroup | None):
        super().__init__()
        self.head = build_head(args, mp, seed, tp_group)

    def forward(self, inputs: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        hidden, labels = inputs
        return self.head(hidden, labels)


class TokenWeightedLoss:
    """The pipeline's loss_fn: sum of this micro-batch's token losses times the step's `scale`
    (`loss_scale` of parallel/loss_scale.py, set by the training step before each step); keeps
    the unscaled sum of the step."""

    def __init__(self) -> None:
        self.scale, self.sums = 1.0, []

    def start_step(self, scale: float) -> None:
        self.scale, self.sums = scale, []

    @property
    def step_sum(self) -> torch.Tensor:
        """The step's unscaled loss sum (fp64, on the losses' device; read it on the last stage)."""
        return torch.stack(self.sums).sum()

    def __call__(self, losses: torch.Tensor, _labels: torch.Tensor) -> torch.Tensor:
        total = losses.sum()
        self.sums.append(total.detach().double())  # no host copy: the schedule runs on without a sync
        return total * self.scale


class StagedPipeline(PipelineModule):
    """A PipelineModule whose stage bounds are given (`parts`: layer-list offsets, one more than stages).

    DeepSpeed balances by building every layer to count its parameters; ours are counted from the
    architecture (LlamaArgs.part_parameters) or given as parallel.pp_split, so each rank builds only
    its own stage's parts.
    """

    def __init__(self, layers: list, parts: list[int], **kwargs):
        self._given_parts = parts
        super().__init__(layers, **kwargs)

    def _partition_layers(self, method: str = "given") -> None:  # DeepSpeed's hook, called from __init__
        self.parts = self._given_parts
        stage = self._topo.get_coord(self.global_rank).pipe
        self._set_bounds(start=self.parts[stage], stop=self.parts[stage + 1])

    def forward(self, inputs: tuple) -> tuple | torch.Tensor:
        """The stage's parts; between stages, x and the residual stream travel stacked as one tensor.

        DeepSpeed's stage backward calls `.backward` once per floating output (retain_graph for
        all but the last), so two outputs would run the stage's backward graph twice; measured on
        the CPU, stage 0's backward took 5.8x its forward with two outputs.
        """
        if self.stage_id > 0:
            stacked, *rest = inputs
            inputs = (stacked[0], stacked[1], *rest)
        outputs = super().forward(inputs)
        if self.stage_id < self.num_stages - 1:
            x, residual, *rest = outputs
            outputs = (torch.stack([x, residual]), *rest)
        return outputs


def balance_blocks(weights: list[int], pp: int) -> list[int]:
    """Blocks per stage that minimize the heaviest stage; `weights` are the parts' parameter counts
    [embedding, blocks..., head] (the embedding sits on stage 0, the head on the last stage)."""
    first, *blocks, last = weights
    n = len(blocks)
    prefix = [0]
    for w in blocks:
        prefix.append(prefix[-1] + w)

    def stage_weight(stage: int, start: int, stop: int) -> int:
        return prefix[stop] - prefix[start] + (first if stage == 0 else 0) + (last if stage == pp - 1 else 0)

    # best[s][i]: the lightest possible heaviest stage when stages 0..s hold blocks 0..i-1
    inf = float("inf")
    best = [[inf] * (n + 1) for _ in range(pp)]
    cut = [[0] * (n + 1) for _ in range(pp)]
    for i in range(1, n + 1):
        best[0][i] = stage_weight(0, 0, i)
    for s in range(1, pp):
        for i in range(s + 1, n + 1):
            for j in range(s, i):  # stage s holds blocks j..i-1, every stage at least one
                heaviest = max(best[s - 1][j], stage_weight(s, j, i))
                if heaviest < best[s][i]:
                    best[s][i], cut[s][i] = heaviest, j
    counts, i = [], n
    for s in range(pp - 1, 0, -1):
        counts.append(i - cut[s][i])
        i = cut[s][i]
    return [i, *reversed(counts)]


def stage_blocks(args: LlamaArgs, pp: int, pp_split: list[int] | None) -> list[int]:
    """Blocks per stage: `pp_split` as given, else balanced by parameter count."""
    if pp > args.n_layers:
        raise ValueError(f"pp={pp}: more stages than n_layers={args.n_layers}; every stage needs a block")
    if pp_split is not None:
        if len(pp_split) != pp or sum(pp_split) != args.n_layers or min(pp_split) < 1:
            raise ValueError(f"pp_split={pp_split}: give {pp} block counts, each >= 1, summing to "
                             f"n_layers={args.n_layers}")
        return list(pp_split)
    return balance_blocks(args.part_parameters(), pp)


def pipeline_topology(mesh: ParallelMesh) -> ProcessTopology:
    """DeepSpeed's view of the mesh, checked against ours: (pipe, data = dp x sp, model = tp)."""
    topology = ProcessTopology(axes=["pipe", "data", "model"], dims=[mesh.pp, mesh.dp * mesh.sp, mesh.tp])
    rank = dist.get_rank()
    coord = topology.get_coord(rank)
    here = (mesh.rank("pp"), mesh.rank("dp_sp"), mesh.rank("tp"))
    assert (coord.pipe, coord.data, coord.model) == here, f"rank {rank}: DeepSpeed sees {coord}, the mesh {here}"
    return topology


def pipeline_llama(args: LlamaArgs, mesh: ParallelMesh, mp: ModelParallelConfig, *, seed: int,
                   pp_split: list[int] | None) -> StagedPipeline:
    """This rank's pipeline stage of the Llama `args` (weights equal to the whole model's parts)."""
    deepspeed.init_distributed(dist_backend=dist.get_backend())  # PipelineModule talks through deepspeed.comm
    tp_group = mesh.group("tp") if mesh.tp > 1 else None
    tp_rank = mesh.rank("tp")
    blocks = stage_blocks(args, mesh.pp, pp_split)
    log.info(f"pipeline: {mesh.pp} stages holding {blocks} blocks "
             f"({'parallel.pp_split' if pp_split else 'balanced by parameter count'}; the embedding on the "
             "first, the final norm and the loss on the last)")
    if args.tie_embeddings:
        embedding = TiedLayerSpec("embedding", EmbeddingPart, args, mp, seed, tp_group,
                                  tied_weight_attr=["embed.weight"])
        head = TiedLayerSpec("embedding", EmbeddingPart, args, mp, seed, tp_group, forward_fn=_tied_loss,
                             tied_weight_attr=["embed.weight"])
    else:
        embedding = LayerSpec(EmbeddingPart, args, mp, seed, tp_group)
        head = LayerSpec(LossPart, args, mp, seed, tp_group)
    layers = [embedding, *(LayerSpec(BlockPart, args, mp, seed, i, tp_rank) for i in range(args.n_layers)),
              LayerSpec(FinalNormPart, args), head]
    parts = [0]
    for count in blocks:
        parts.append(parts[-1] + count)
    parts = [0, *(1 + p for p in parts[1:-1]), len(layers)]
    return StagedPipeline(layers, parts, topology=pipeline_topology(mesh), loss_fn=TokenWeightedLoss())


def _tied_loss(module: EmbeddingPart, inputs: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    return module.loss(inputs)
