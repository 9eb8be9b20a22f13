"""Llama-style decoder (RMSNorm, RoPE, SwiGLU, GQA) built from megatron-core tensor-parallel layers.

What is unusual here:
- Weights are created whole on the CPU from one seed and then split by megatron-core
  (`use_cpu_initialization`), so every dp/tp/sp layout starts from the same function.
- q, k and v come from one column-parallel projection laid out per kv group as
  [g query heads, k, v] (g = n_heads / n_kv_heads), so a contiguous tp split keeps groups whole.
- Attention over the (possibly sequence-parallel) heads is a callable handed in by the caller
  (`attend(q, k, v)`), so this file never communicates: the launcher passes plain attention or
  `ithaca.parallel.ulysses_attention` bound to its sp group.
- Layers mix tokens with softmax attention or linear attention (models/linear_attention.py) as
  `layer_pattern` says, so the same class builds Llama, linear-attention and hybrid models.
- The output is vocab-parallel logits; `token_losses` turns them into per-token losses.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.model_parallel_config import ModelParallelConfig
from torch import nn

from ithaca.models.linear_attention import AttendLinear, LinearAttention
from ithaca.models.init import normal_init
from ithaca.models.llama_args import LlamaArgs
from ithaca.models.mixer import SequenceInfo
from ithaca.models.norm import RMSNorm
from ithaca.models.rope import apply_rope, rope_angles

Attend = Callable[..., torch.Tensor]
"""attend(q [b, s, h, d], k [b, s, h_kv, d], v [b, s, h_kv, d], doc_ids=[b, s] or None) -> [b, s, h, d],
causal and, given doc_ids, inside each packed document."""



class Attention(nn.Module):
    def __init__(self, args: LlamaArgs, mp: ModelParallelConfig, attend: Attend):
        super().__init__()
        tp = mp.tensor_model_parallel_size
        self.attend = attend
        self.head_dim = args.head_dim
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
        b, s, _ = x.shape
        qkv, _ = self.qkv(x)
        qkv = qkv.view(b, s, self.local_kv_heads, self.group_size + 2, self.head_dim)
        q = qkv[:, :, :, : self.group_size].reshape(b, s, -1, self.head_dim)  # [b, s, h/tp, d]
        k, v = qkv[:, :, :, -2], qkv[:, :, :, -1]  # [b, s, h_kv/tp, d]
        o = self.attend(apply_rope(q, seq.cos, seq.sin), apply_rope(k, seq.cos, seq.sin), v, doc_ids=seq.doc_ids)
        out, _ = self.out(o.reshape(b, s, -1))
        return out


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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x)[0].chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)[0]


class Block(nn.Module):
    def __init__(self, args: LlamaArgs, mp: ModelParallelConfig, mixer: nn.Module):
        super().__init__()
        self.attn_norm = RMSNorm(args.dim, args.norm_eps)
        self.attn = mixer
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)
        self.ffn = FeedForward(args, mp)

    def forward(self, x: torch.Tensor, seq: SequenceInfo) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), seq)
        return x + self.ffn(self.ffn_norm(x))


class Llama(nn.Module):
    """tokens [b, s], their positions [b, s] and, for packed documents, document ids [b, s] and
    document starts (`resets`, [b, s] bool, found on the whole sequence) -> vocab-parallel logits
    [b, s, vocab/tp].

    `attend` mixes softmax layers, `attend_linear` linear layers; `tp_rank` picks this rank's
    heads' fixed decays.
    """

    def __init__(self, args: LlamaArgs, mp: ModelParallelConfig, attend: Attend,
                 attend_linear: AttendLinear | None = None, tp_rank: int = 0):
        super().__init__()
        if "L" in args.layer_pattern and attend_linear is None:
            raise ValueError(f"Llama: layer_pattern={args.layer_pattern!r} has linear layers; pass attend_linear")
        self.args = args
        self.embed = tensor_parallel.VocabParallelEmbedding(
            args.vocab_size, args.dim, init_method=normal_init(args.init_std), config=mp)

        def mixer(layer: int) -> nn.Module:
            if args.mixer(layer) == "L":
                return LinearAttention(args, mp, attend_linear, tp_rank)
            return Attention(args, mp, attend)

        self.blocks = nn.ModuleList(Block(args, mp, mixer(i)) for i in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.head = tensor_parallel.ColumnParallelLinear(
            args.dim, args.vocab_size, config=mp, init_method=normal_init(args.init_std), bias=False,
            gather_output=False, skip_weight_param_allocation=args.tie_embeddings)

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor, doc_ids: torch.Tensor | None = None,
                resets: torch.Tensor | None = None) -> torch.Tensor:
        x = self.embed(tokens)  # [b, s, dim]
        cos, sin = rope_angles(positions, self.args.head_dim, self.args.rope_theta)
        seq = SequenceInfo(cos=cos, sin=sin, doc_ids=doc_ids, resets=resets)
        for block in self.blocks:
            x = block(x, seq)
        weight = self.embed.weight if self.args.tie_embeddings else None
        logits, _ = self.head(self.norm(x), weight=weight)
        return logits


def token_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy per token from vocab-parallel logits [b, s, v/tp] and labels [b, s] -> [b, s] fp32.

    Labels < 0 mark positions without a target; their loss is 0.
    """
    has_target = labels >= 0
    losses = tensor_parallel.vocab_parallel_cross_entropy(logits.float(), labels.clamp(min=0))
    return losses * has_target
