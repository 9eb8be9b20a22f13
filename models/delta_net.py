"""A Gated DeltaNet token mixer (arXiv:2412.06464): the layer letter `D` of `layer_pattern`.

    x -> q, k, v (one projection) -> short causal depthwise conv, SiLU -> q, k L2-normalised per head
      -> delta rule with beta = sigmoid(x W_beta) and the decay below -> per-head RMSNorm
      -> * silu(x W_out_gate) -> output projection

Decay (`linear_decay`, shared with `L` layers): plain is DeltaNet (none); retention a fixed decay
per head as RetNet's; gated is Gated DeltaNet's per-token gate in Mamba-2's form,
log_decay = -exp(log_rate) * softplus(x W_gate + gate bias), with log_rate = log(1..16) spread
over the heads and the gate bias softplus^-1 of time steps spread geometrically over
[0.001, 0.1] (both learned; they start from these values, not from random draws, so every tp
layout starts the same). `linear_output_norm`
and `linear_output_gate` switch the output norm and gate, as for `L` layers; `linear_feature_map`
does not apply (q and k are normalised instead).

Heads are split over tp like linear attention's (q, k, v each n_heads heads, [q; k; v] split
with stride 3, the conv's channels with them). The sequence mixing is two swappable calls,
`conv` (models/mixer.py ShortConv) and `attend` (DeltaRuleAttend), local when built;
`ithaca.parallel.parallelize` binds them to the mesh (the halo exchange and
delta_rule_attention), so this file never communicates.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.model_parallel_config import ModelParallelConfig
from megatron.core.tensor_parallel import set_tensor_model_parallel_attributes
from torch import nn

from ithaca.models.init import normal_init
from ithaca.models.linear_attention import RecurrentMixer
from ithaca.models.llama_args import LlamaArgs
from ithaca.models.mixer import (DeltaRuleAttend, LocalDeltaRuleAttend, SequenceInfo, ShortConv, local_short_conv,
                                 recompute)
from ithaca.models.state_layout import ParamLayout, shard

TIME_STEP_RANGE = (0.001, 0.1)
"""Mamba-2's range of initial time steps (softplus of the gate at x = 0), spread over the heads."""


def gate_parameters(n_heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The whole model's (log_rate, gate bias) [n_heads] each: rates 1..16 and time steps
    geometric over TIME_STEP_RANGE, as Mamba-2 draws them but spread evenly instead of drawn."""
    spread = torch.linspace(0, 1, n_heads) if n_heads > 1 else torch.zeros(1)
    log_rate = torch.log(1 + 15 * spread)
    low, high = TIME_STEP_RANGE
    step = torch.exp(math.log(low) + spread * (math.log(high) - math.log(low)))
    return log_rate, step + torch.log(-torch.expm1(-step))  # softplus^-1(step)


class GatedDeltaNet(RecurrentMixer):
    def __init__(self, args: LlamaArgs, mp: ModelParallelConfig, tp_rank: int):
        super().__init__(args, mp, tp_rank)
        tp = mp.tensor_model_parallel_size
        self.attend: DeltaRuleAttend = LocalDeltaRuleAttend(args.kernels)
        self.conv: ShortConv = local_short_conv
        width = args.n_heads * args.head_dim
        # torch's default for a depthwise Conv1d (fan-in K), drawn whole so every tp layout has the same
        # taps; the channels are [q; k; v] like qkv's output, so a rank keeps its heads' part of each
        bound = 1 / math.sqrt(args.delta_conv_size)
        taps = torch.empty(3 * width, args.delta_conv_size).uniform_(-bound, bound)
        self.conv_weight = nn.Parameter(shard(taps, ParamLayout(tuple(taps.shape), 0, stride=3), tp, tp_rank))
        set_tensor_model_parallel_attributes(self.conv_weight, is_parallel=True, dim=0, stride=3)
        self.beta = tensor_parallel.ColumnParallelLinear(args.dim, args.n_heads, config=mp, bias=False,
                                                         init_method=normal_init(args.init_std), gather_output=False)
        if args.linear_decay == "gated":
            self.gate = tensor_parallel.ColumnParallelLinear(args.dim, args.n_heads, config=mp, bias=True,
                                                             init_method=normal_init(args.init_std), gather_output=False)
            log_rate, gate_bias = gate_parameters(args.n_heads)
            self.log_rate = nn.Parameter(log_rate[self.local].clone())
            set_tensor_model_parallel_attributes(self.log_rate, is_parallel=True, dim=0, stride=1)
            with torch.no_grad():
                self.gate.bias.copy_(gate_bias[self.local])
        self._build_output(args, mp)

    def forward(self, x: torch.Tensor, seq: SequenceInfo) -> torch.Tensor:
        gate = self.gate(x)[0] if self.args.linear_decay == "gated" else None
        out_gate = self._output_gate(x)
        qkv, beta = self.qkv(x)[0], self.beta(x)[0]
        inputs = (qkv, beta, gate, out_gate, seq)
        o = recompute(self.mix, *inputs) if self.selective else self.mix(*inputs)
        return self.out(o)[0]

    def mix(self, qkv: torch.Tensor, beta: torch.Tensor, gate: torch.Tensor | None, out_gate: torch.Tensor | None,
            seq: SequenceInfo) -> torch.Tensor:
        """The interior between the projections (conv, normalisation, decay, delta rule, output norm
        and gate): the projections' outputs -> [b, s, h/tp * d]."""
        b, s, _ = qkv.shape
        qkv = F.silu(self.conv(qkv, self.conv_weight, resets=seq.resets))
        q, k, v = qkv.view(b, s, 3, self.local_heads, self.head_dim).unbind(2)  # [b, s, h/tp, d] each
        q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
        log_decay = None
        if gate is not None:
            log_decay = -self.log_rate.float().exp() * F.softplus(gate.float())  # [b, s, h/tp]; the bias is in gate
        elif self.args.linear_decay == "retention":
            log_decay = self.log_decay
        return self._finish(self.attend(q, k, v, torch.sigmoid(beta.float()), log_decay=log_decay, resets=seq.resets),
                            out_gate)
