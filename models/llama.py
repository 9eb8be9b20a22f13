"""Llama-style decoder (RMSNorm, RoPE, SwiGLU, GQA) built from megatron-core tensor-parallel layers
and the fused ops of ithaca.kernels (norms with the residual add, RoPE, SwiGLU, the loss; each
picks its implementation through `args.kernels`).

What is unusual here:
- Weights are created whole on the CPU from one seed and then split by megatron-core
  (`use_cpu_initialization`), so every dp/tp/sp layout starts from the same function.
- q, k and v come from one column-parallel projection laid out per kv group as
  [g query heads, k, v] (g = n_heads / n_kv_heads), so a contiguous tp split keeps groups whole.
- Each mixer calls its `attend` (models/mixer.py: a typed Protocol), local attention when built;
  `ithaca.parallel.parallelize` swaps in sequence-parallel attention bound to the mesh, so this
  file never communicates.
- Every part (embedding, each block, the head) draws its weights from its own seed
  (`init.part_seed`), so a pipeline stage that builds only its blocks gets the whole model's weights.
- `args.activation_checkpointing` recomputes in the backward pass what the forward dropped: whole
  blocks (full) or each mixer's interior between its input and output projections (selective).
- Layers mix tokens with softmax attention, linear attention (models/linear_attention.py) or Gated
  DeltaNet (models/delta_net.py) as `layer_pattern` says, so the same class builds Llama,
  linear-attention, delta-rule and hybrid models.
- Pre-norm blocks hand the stream on unadded: each norm adds the previous block's output to the
  residual stream and normalizes it in one kernel (`rms_norm(x, w, eps, residual=...)`).
- The model returns per-token losses, not logits: the output projection and the cross-entropy are
  one fused, chunked op (`linear_cross_entropy`) that never holds [tokens, vocab] logits; with
  tp > 1 the vocabulary is split over the tp ranks (one all-reduce of max and of sum-exp).
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from megatron.core import tensor_parallel
from megatron.core.model_parallel_config import ModelParallelConfig
from torch import nn

from ithaca.data.batch import Batch
from ithaca.kernels import linear_cross_entropy, rope, swiglu
from ithaca.models.delta_net import GatedDeltaNet
from ithaca.models.init import normal_init, part_seed
from ithaca.models.linear_attention import LinearAttention
from ithaca.models.llama_args import LlamaArgs
from ithaca.models.mixer import LocalSoftmaxAttend, SequenceInfo, SoftmaxAttend, recompute
from ithaca.models.norm import RMSNorm
from ithaca.models.rope_scaling import rope_frequencies


class Attention(nn.Module):
    def __init__(self, args: LlamaArgs, mp: ModelParallelConfig):
        super().__init__()
        tp = mp.tensor_model_parallel_size
        self.attend: SoftmaxAttend = LocalSoftmaxAttend(args.kernels)
        self.selective = args.activation_checkpointing == "selective"
        self.kernels = args.kernels
        self.head_dim = args.head_dim
        inv_freq, self.rope_scale = rope_frequencies(args.head_dim, args.rope_theta, args.rope_scaling)
        # A buffer follows the module to its device; DeepSpeed's bf16 casts parameters only, so it stays fp32.
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.group_size = args.n_heads // args.kv_heads  # query heads per kv head
        self.local_kv_heads = args.kv_heads // tp
        self.qkv = tensor_parallel.ColumnParallelLinear(
            args.dim, (args.n_heads + 2 * args.kv_heads) * args.head_dim, config=mp,
            init_method=normal_init(args.init_std), bias=False, gather_output=False)
        # GPT-2's residual scaling: each block adds two outputs to the stream.
        self.out = tensor_parallel.RowParallelLinear(
            args.n_heads * args.head_dim, args.dim, config=mp, bias=False, input_is_parallel=True,
            skip_bias_add=False, init_method=normal_init(args.init_std / math.sqrt(2 * args.n_layers)))

    def forward(self, x: torch.Tensor, seq: SequenceInfo) -> torch.Tensor:
        qkv, _ = self.qkv(x)
        o = recompute(self.mix, qkv, seq) if self.selective else self.mix(qkv, seq)
        out, _ = self.out(o)
        return out

    def mix(self, qkv: torch.Tensor, seq: SequenceInfo) -> torch.Tensor:
        """The interior between the projections: RoPE and attention, [b, s, qkv width] -> [b, s, h/tp * d]."""
        b, s, _ = qkv.shape
        qkv = qkv.view(b, s, self.local_kv_heads, self.group_size + 2, self.head_dim)
        q = qkv[:, :, :, : self.group_size].reshape(b, s, -1, self.head_dim)  # [b, s, h/tp, d]
        k, v = qkv[:, :, :, -2], qkv[:, :, :, -1]  # [b, s, h_kv/tp, d]
        q, k = rope(q, k, seq.positions, self.inv_freq, scale=self.rope_scale, impl=self.kernels)
        return self.attend(q, k, v, doc_ids=seq.doc_ids).reshape(b, s, -1)


class FeedForward(nn.Module):
    """SwiGLU (arXiv:2002.05202): down(silu(gate(x)) * up(x))."""

    def __init__(self, args: LlamaArgs, mp: ModelParallelConfig):
        super().__init__()
        # stride=2: the master weight is [gate; up] and each tp rank takes its slice of both.
        self.gate_up = tensor_parallel.ColumnParallelLinear(
            args.dim, 2 * args.ffn_dim, config=mp, init_method=normal_init(args.init_std), bias=False,
            gather_output=False, stride=2)
        self.down = tensor_parallel.RowParallelLinear(
            args.ffn_dim, args.dim, config=mp, bias=False, input_is_parallel=True, skip_bias_add=False,
            init_method=normal_init(args.init_std / math.sqrt(2 * args.n_layers)))
        self.kernels = args.kernels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x)[0].chunk(2, dim=-1)
        return self.down(swiglu(gate, up, impl=self.kernels))[0]


class Block(nn.Module):
    def __init__(self, args: LlamaArgs, mp: ModelParallelConfig, mixer: nn.Module):
        super().__init__()
        self.attn_norm = RMSNorm(args.dim, args.norm_eps, args.kernels)
        self.attn = mixer
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps, args.kernels)
        self.ffn = FeedForward(args, mp)
        self.full_recompute = args.activation_checkpointing == "full"

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None,
                seq: SequenceInfo) -> tuple[torch.Tensor, torch.Tensor]:
        """x: the previous block's output, not yet added to the stream `residual` (None: x is the
        embedding, the stream's start) -> (this block's output, not yet added; the stream)."""
        if self.full_recompute:
            return recompute(self.compute, x, residual, seq)
        return self.compute(x, residual, seq)

    def compute(self, x: torch.Tensor, residual: torch.Tensor | None,
                seq: SequenceInfo) -> tuple[torch.Tensor, torch.Tensor]:
        normed, residual = self.attn_norm(x, residual)
        normed, residual = self.ffn_norm(self.attn(normed, seq), residual)
        return self.ffn(normed), residual


class OutputLoss(tensor_parallel.ColumnParallelLinear):
    """The vocab-parallel output projection fused with the cross-entropy: hidden [b, s, dim] and
    labels [b, s] -> per-token losses [b, s] fp32 (0 where a label is < 0); logits never exist.

    It is megatron-core's column-parallel layer for its weight (drawn whole, then split over tp
    by vocabulary) with its own forward, so ZeRO-3 gathers that weight when this module runs.
    """

    def __init__(self, args: LlamaArgs, mp: ModelParallelConfig, tp_group: dist.ProcessGroup | None):
        super().__init__(args.dim, args.vocab_size, config=mp, init_method=normal_init(args.init_std), bias=False,
                         gather_output=False, skip_weight_param_allocation=args.tie_embeddings)
        self.vocab_group, self.kernels = tp_group, args.kernels

    def forward(self, hidden: torch.Tensor, labels: torch.Tensor,
                weight: torch.Tensor | None = None) -> torch.Tensor:
        b, s, dim = hidden.shape
        labels = labels.reshape(-1)
        losses = linear_cross_entropy(hidden.reshape(b * s, dim), self.weight if weight is None else weight,
                                      labels.masked_fill(labels < 0, -100), ignore_index=-100,
                                      group=self.vocab_group, impl=self.kernels)
        return losses.view(b, s)


def build_embedding(args: LlamaArgs, mp: ModelParallelConfig, seed: int) -> tensor_parallel.VocabParallelEmbedding:
    """The vocab-parallel token embedding (part 0 of the model)."""
    with part_seed(seed, 0):
        return tensor_parallel.VocabParallelEmbedding(args.vocab_size, args.dim,
                                                      init_method=normal_init(args.init_std), config=mp)


def build_block(args: LlamaArgs, mp: ModelParallelConfig, seed: int, layer: int, tp_rank: int) -> Block:
    """Block `layer` (part layer + 1) with its mixer from `args.layer_pattern`, local attention."""
    with part_seed(seed, layer + 1):
        kind = args.mixer(layer)
        mixer = {"S": lambda: Attention(args, mp), "L": lambda: LinearAttention(args, mp, tp_rank),
                 "D": lambda: GatedDeltaNet(args, mp, tp_rank)}[kind]()
        return Block(args, mp, mixer)


def build_head(args: LlamaArgs, mp: ModelParallelConfig, seed: int,
               tp_group: dist.ProcessGroup | None) -> OutputLoss:
    """The output projection with the loss (the last part); its vocabulary split over `tp_group`."""
    with part_seed(seed, args.n_layers + 1):
        return OutputLoss(args, mp, tp_group if mp.tensor_model_parallel_size > 1 else None)


class Llama(nn.Module):
    """A Batch (data/batch.py: tokens, labels (< 0: no target), positions and, for packed documents,
    document ids and starts, each [b, s]: the whole sequence or this sp rank's piece of it) ->
    per-token losses [b, s] fp32.

    Built with local attention; `ithaca.parallel.parallelize` makes it sequence parallel. `seed`
    draws the weights (whole, then split over tp by megatron-core); `tp_group` (None: tp = 1)
    splits the vocabulary of the loss and picks this rank's heads' fixed decays.
    """

    def __init__(self, args: LlamaArgs, mp: ModelParallelConfig, *, seed: int = 0,
                 tp_group: dist.ProcessGroup | None = None):
        super().__init__()
        tp_rank = 0 if tp_group is None else dist.get_rank(tp_group)
        self.args = args
        self.embed = build_embedding(args, mp, seed)
        self.blocks = nn.ModuleList(build_block(args, mp, seed, i, tp_rank) for i in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps, args.kernels)
        self.head = build_head(args, mp, seed, tp_group)

    def forward(self, batch: Batch) -> torch.Tensor:
        seq = SequenceInfo.of(batch)
        x, residual = self.embed(batch.tokens), None  # [b, s, dim]
        for block in self.blocks:
            x, residual = block(x, residual, seq)
        hidden, _ = self.norm(x, residual)
        return self.head(hidden, batch.labels, weight=self.embed.weight if self.args.tie_embeddings else None)
