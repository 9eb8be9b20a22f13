"""Peak bytes one rank holds in a training step, by term.

Model states (counted from the architecture, LlamaArgs.part_parameters, for the rank's pipeline
stage and tp shard; ZeRO partitions over the dp x sp ranks, DeepSpeed's data axis):

    weights        P w, ZeRO-3: P w / Z                      (w = 4 fp32, 2 bf16)
    gradients      P w, ZeRO-2/3: P w / Z
    optimizer      AdamW's two fp32 moments 8 P, and under bf16 the fp32 master and gradient
                   copies 8 P; divided by Z from ZeRO-1 on (bf16 with ZeRO-0: DeepSpeed's bf16
                   optimizer partitions them too)
    comm buffers   ZeRO-1/2/3: DeepSpeed's gradient reduce bucket, reduce_bucket_size = 5e8
                   elements whatever the model's size (measured: 2.0 GB per rank in fp32 on the CPU);
                   two under a pipeline with ZeRO-1 (PIPELINE_ZERO1_BUCKETS)

Activations, per layer and token of the rank's part (s = seq_len / sp tokens, micro_batch rows),
in elements of the compute dtype, fit to live-tensor measurements of one process in fp32
(`python -m ithaca.bench.plan_check --calibrate`: a whole model's forward + backward with 2 and 3
layers, per kind and mode, at several widths, head counts and ffn sizes; data in bench/RESULTS.md):

    S none        10.125 dim + 3 kv_dim + 4 ffn + 10      selective  8 dim + 2 kv_dim + 4 ffn + 2
    L none        17.875 dim + 4 ffn + 198 h + dim d/64 + 18   selective  11 dim + 4 ffn + h + 2
    D none        36.9 dim + 4 ffn + 460 h + dim d/64 + 18     selective  11 dim + 4 ffn + 18
    full          2 dim per layer kept (the block's two inputs) and, in the backward, one layer
                  recomputed with everything `none` keeps
    selective     in the backward, a D layer's recomputed interior: 0.6 of (none - selective), and
                  under sp 6 dim + 1.35 dim d/64 more (its local pass's wider delta rule)

The backward recomputes layer i after the layers above it have freed what they kept, so the
recomputation adds to the peak only what exceeds those (recompute_excess): a D layer below an S
layer (DS) recomputes in the room the S layer's activations left.

(dim d/64: the chunked kernels' d x d state per 64-token chunk and head; 198 h and 460 h: their
within-chunk [64 x 64] matrices and gates.) A tp rank holds the ffn, kv and head terms / tp and
the dim terms whole, except their per-head share (measured at tp2 for S none: 4 of its 10.125
dim; for the other kinds assumed: all but 6 dim). The allgather softmax method adds the gathered
K and V of the whole sequence to each softmax layer. A pipeline's first stage holds pp micro-batches at once (1F1B), stage k
pp - k.

Outside the layers (embedding, final norm, the chunked loss), on the last stage: 4.5625 dim
elements per token, two of the loss's blocks (2048 tokens x 4096 vocabulary rows), the head's
[V/tp, dim] weight gradient before it is added in, and a fixed 1.1 MB; on the first stage the
embedding's dense [V/tp, dim] gradient (both measured with a 32K vocabulary: bench/RESULTS.md).
"""

from __future__ import annotations

import contextlib
import sys
from dataclasses import dataclass

from ithaca.launcher.config.schema import RunConfig
from ithaca.models.llama_args import LlamaArgs

LOSS_TOKEN_CHUNK, LOSS_VOCAB_CHUNK = 2048, 4096
"""kernels/linear_cross_entropy/chunked.py's block (numbers here: that module imports torch)."""
LOSS_FIXED_BYTES = 1_114_112
CHUNK = 64
"""The chunked linear-attention and delta-rule kernels' chunk length."""
REDUCE_BUCKET = 500_000_000
"""DeepSpeed's default zero_optimization.reduce_bucket_size, in gradient elements (engine.py leaves it)."""
PIPELINE_ZERO1_BUCKETS = 2
"""Buckets a pipeline stage holds under ZeRO-1 (DeepSpeed 0.19.8, measured: 3854 MiB at pp2 against 2016
with one). The gradient hooks allocate the bucket in the backward (zero/stage_1_and_2.py setup_buckets);
at the accumulation boundary the pipeline engine's reduce_gradients(pipeline_parallel=True) appends a
second of the same size (stage_1_and_2.py:962, "with PP we must create ipg buffer") that, with
overlap_comm off, is never indexed; both are live while the gradients are reduced."""

LayerCoefficients = tuple[float, float, float, float, float, float, float]
"""Elements per token: (dim kept whole on every tp rank, dim split over tp (per-head tensors: q,
the attention's output), kv_dim, ffn, heads, dim * head_dim / CHUNK, constant)."""
ACTIVATIONS: dict[tuple[str, str], LayerCoefficients] = {
    ("S", "none"): (6.125, 4, 3, 4, 0, 0, 10),
    ("S", "selective"): (6, 2, 2, 4, 0, 0, 2),
    ("L", "none"): (6, 11.875, 0, 4, 198, 1, 18),
    ("L", "selective"): (6, 5, 0, 4, 1, 0, 2),
    ("D", "none"): (6, 30.9, 0, 4, 460, 1, 18),
    ("D", "selective"): (6, 5, 0, 4, 0, 0, 18),
}
SELECTIVE_RECOMPUTE_SHARE = {"S": 0.0, "L": 0.0, "D": 0.6}
"""Under selective checkpointing, the backward recomputes one mixer's interior at a time; this share
of what `none` keeps beyond `selective` is live at once at the peak (measured: S and L none; D
0.58-0.82 of it over three shapes at 1K tokens, 0.53 at 2K)."""
SP_DELTA_INTERIOR = (6.0, 1.35)
"""Under sp, a D layer's recomputed interior holds (dim, dim * head_dim / CHUNK) x these elements per
token more: its local pass runs the delta rule on d_v + d_k value columns, not d_v
(parallel/delta_rule.py), widening the values, U and the outputs, and each chunk's state. Measured
with bench/plan_check.py's counter: D sp2 at 2K against one process at 1K tokens, 1629-3763 more per
token at dim 256 (8 and 16 heads) and 512."""
FULL_KEPT_STREAMS = 2
"""activation_checkpointing=full keeps each block's two inputs, two [b, s, dim] tensors."""
OUTSIDE_DIM = 4.5625
"""Elements per token and dim outside the layers (embedding output, final norm, the loss's input)."""


@dataclass(frozen=True)
class MemoryTerms:
    """Bytes one rank holds at its peak, by term (`largest` names the biggest)."""
    weights: int
    gradients: int
    optimizer: int
    activations: dict[str, int]
    """by layer kind: "softmax", "linear", "delta"; and "recompute" (what the layer the backward
    recomputes adds to the peak beyond those: recompute_excess)"""
    loss: int
    comm_buffers: int

    def as_dict(self) -> dict[str, int]:
        return {"weights": self.weights, "gradients": self.gradients, "optimizer": self.optimizer,
                **{f"activations_{kind}": b for kind, b in self.activations.items()}, "loss": self.loss,
                "comm_buffers": self.comm_buffers}

    @property
    def total(self) -> int:
        return sum(self.as_dict().values())

    @property
    def largest(self) -> str:
        terms = self.as_dict()
        return max(terms, key=terms.get)


KIND_NAMES = {"S": "softmax", "L": "linear", "D": "delta"}


def layer_elements_per_token(args: LlamaArgs, kind: str, mode: str, tp: int) -> float:
    """Activation elements one layer of `kind` keeps per token of this rank's part under `mode`."""
    if mode == "full":
        return FULL_KEPT_STREAMS * args.dim
    c_whole, c_split, c_kv, c_ffn, c_heads, c_state, const = ACTIVATIONS[(kind, mode)]
    kv_dim = args.kv_heads * args.head_dim
    return (c_whole * args.dim + (c_split * args.dim + c_kv * kv_dim + c_ffn * args.ffn_dim + c_heads * args.n_heads
                                + c_state * args.dim * args.head_dim / CHUNK) / tp + const)


def recomputed_elements_per_token(args: LlamaArgs, kind: str, mode: str, tp: int, sp: int) -> float:
    """What the backward recomputes of one layer of `kind` and holds at once, per token: under full
    checkpointing the whole layer (what `none` keeps), under selective a D layer's mixer interior."""
    if mode == "full":
        return layer_elements_per_token(args, kind, "none", tp)
    if mode == "none":
        return 0.0
    beyond = layer_elements_per_token(args, kind, "none", tp) - layer_elements_per_token(args, kind, "selective", tp)
    wider = 0.0
    if kind == "D" and sp > 1:
        per_dim, per_state = SP_DELTA_INTERIOR
        wider = (per_dim * args.dim + per_state * args.dim * args.head_dim / CHUNK) / tp
    return SELECTIVE_RECOMPUTE_SHARE[kind] * beyond + wider


def recompute_excess(recomputed: list[float], kept: list[float]) -> float:
    """What the backward's recomputation adds to the peak of keeping `kept` (per layer, in order),
    recomputing layer i with `recomputed[i]`: the backward reaches layer i after the layers above it
    have freed what they kept, so layer i adds recomputed[i] less what those held (never below 0)."""
    above = [sum(kept[i + 1:]) for i in range(len(kept))]
    return max([0.0] + [r - a for r, a in zip(recomputed, above)])


def stage_parts(cfg: RunConfig) -> list[tuple[list[int], bool, bool]]:
    """Per pipeline stage: (its blocks' layer indices, holds the embedding, holds the head and loss)."""
    p = cfg.parallel
    if p.pp == 1:  # no pipeline: the seconds of importing DeepSpeed and Megatron are not needed
        counts = [cfg.model.n_layers]
    else:
        # DeepSpeed, which that module imports, logs a notice to stdout on import: `ithaca plan --json` owns stdout
        with contextlib.redirect_stdout(sys.stderr):
            from ithaca.parallel.pipeline import stage_blocks
        counts = stage_blocks(cfg.model, p.pp, p.pp_split)
    parts, start = [], 0
    for stage, count in enumerate(counts):
        parts.append((list(range(start, start + count)), stage == 0, stage == p.pp - 1))
        start += count
    return parts


def stage_memory(cfg: RunConfig, stage: int) -> MemoryTerms:
    """The peak terms of one rank of pipeline stage `stage`."""
    args, p, t = cfg.model, cfg.parallel, cfg.train
    layers, first, last = stage_parts(cfg)[stage]
    sizes = args.part_parameters()
    params = sum(sizes[1 + i] for i in layers) + (sizes[0] if first else 0) + (sizes[-1] if last else 0)
    params //= p.tp
    elem = 2 if t.precision == "bf16" else 4
    zero_group = p.dp * p.sp
    weights = params * elem // (zero_group if t.zero_stage == 3 else 1)
    gradients = params * elem // (zero_group if t.zero_stage >= 2 else 1)
    states = 8 + (8 if t.precision == "bf16" else 0)
    partitioned = t.zero_stage >= 1 or t.precision == "bf16"
    optimizer = params * states // (zero_group if partitioned else 1)

    tokens = t.micro_batch * cfg.data.seq_len // p.sp  # this rank's part of one micro-batch
    in_flight = p.pp - stage
    mode = args.activation_checkpointing
    activations: dict[str, int] = {}
    kept = []  # per layer, elements per token of one micro-batch
    for i in layers:
        kind = args.mixer(i)
        per_token = layer_elements_per_token(args, kind, mode, p.tp)
        if kind == "S" and p.sp_method == "allgather" and p.sp > 1 and mode != "full":
            per_token += 2 * args.kv_heads * args.head_dim / p.tp * (p.sp - 1)  # the whole sequence's K, V
        kept.append(per_token)
        name = KIND_NAMES[kind]
        activations[name] = activations.get(name, 0) + int(per_token * tokens * elem * in_flight)
    recompute = recompute_excess([recomputed_elements_per_token(args, args.mixer(i), mode, p.tp, p.sp)
                                  for i in layers], kept)
    if recompute > 0:
        activations["recompute"] = int(recompute * tokens * elem)
    loss = 0
    vocab = args.vocab_size // p.tp
    if last:
        blocks = 2 * min(vocab, LOSS_VOCAB_CHUNK) * min(tokens, LOSS_TOKEN_CHUNK)
        loss = int((OUTSIDE_DIM * args.dim * tokens + blocks + vocab * args.dim) * elem) + LOSS_FIXED_BYTES
    if first:  # the embedding's output for each micro-batch in flight, and its dense gradient
        loss += (0 if last else args.dim * tokens * in_flight * elem) + vocab * args.dim * elem
    buckets = 0 if t.zero_stage == 0 else PIPELINE_ZERO1_BUCKETS if p.pp > 1 and t.zero_stage == 1 else 1
    comm_buffers = buckets * REDUCE_BUCKET * elem
    return MemoryTerms(weights=weights, gradients=gradients, optimizer=optimizer, activations=activations, loss=loss,
                       comm_buffers=comm_buffers)


def peak_memory(cfg: RunConfig) -> MemoryTerms:
    """The terms of the rank with the largest peak (pipeline stages differ)."""
    return max((stage_memory(cfg, stage) for stage in range(cfg.parallel.pp)), key=lambda m: m.total)
