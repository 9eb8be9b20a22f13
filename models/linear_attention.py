"""A linear-attention token mixer with decay, feature map, output norm and output gate options.

Heads are split over tp like softmax attention's (q, k and v have n_heads heads; no GQA here).
The sequence mixing itself is the mixer's `attend` (models/mixer.py's LinearAttend), local when
built; `ithaca.parallel.parallelize` swaps in `ithaca.parallel.lasp2_attention` on the mesh, so
this file never communicates.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.model_parallel_config import ModelParallelConfig
from torch import nn

from ithaca.kernels import swiglu
from ithaca.models.init import normal_init
from ithaca.models.llama_args import LlamaArgs
from ithaca.models.mixer import LinearAttend, LocalLinearAttend, SequenceInfo, recompute
from ithaca.models.norm import HeadRMSNorm

GATE_LOGIT_NORMALIZER = 16.0
"""GLA divides log-sigmoid gates by 16 so decays start close to 1 (arXiv:2312.06635, section 4.4)."""

FEATURE_MAPS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "identity": lambda x: x,
    "elu1": lambda x: F.elu(x) + 1,
    "silu": F.silu,
}


def retention_log_decay(n_heads: int) -> torch.Tensor:
    """RetNet's per-head decays, log(1 - 2^(-5 - head)) for heads 0..n_heads-1."""
    return torch.log1p(-(2.0 ** (-5.0 - torch.arange(n_heads, dtype=torch.float32))))



class RecurrentMixer(nn.Module):
    """What linear-attention (L) and Gated DeltaNet (models/delta_net.py, D) layers share: heads split
    over tp, the [q; k; v] projection, the fixed per-head decays, and the output end (per-head
    RMSNorm, silu output gate, row-parallel projection). Subclasses call `_build_output` where its
    parameters belong in the model's order (models/state_layout.py)."""

    def __init__(self, args: LlamaArgs, mp: ModelParallelConfig, tp_rank: int):
        super().__init__()
        self.args = args
        self.selective = args.activation_checkpointing == "selective"
        self.local_heads, self.head_dim = args.n_heads // mp.tensor_model_parallel_size, args.head_dim
        self.local = slice(tp_rank * self.local_heads, (tp_rank + 1) * self.local_heads)  # this rank's heads
        # stride=3: the master weight is [q; k; v] and each tp rank takes its heads of all three
        self.qkv = tensor_parallel.ColumnParallelLinear(args.dim, 3 * args.n_heads * args.head_dim, config=mp,
                                                        bias=False, stride=3, init_method=normal_init(args.init_std),
                                                        gather_output=False)

    def _build_output(self, args: LlamaArgs, mp: ModelParallelConfig) -> None:
        """The retention decays (a buffer), the output norm, gate and projection, as `args` asks."""
        width = args.n_heads * args.head_dim
        if args.linear_decay == "retention":
            self.register_buffer("log_decay", retention_log_decay(args.n_heads)[self.local], persistent=False)
        if args.linear_output_norm:
            self.out_norm = HeadRMSNorm(self.local_heads, args.head_dim, args.norm_eps, args.kernels)
        if args.linear_output_gate:
            self.out_gate = tensor_parallel.ColumnParallelLinear(args.dim, width, config=mp, bias=False,
                                                                 init_method=normal_init(args.init_std), gather_output=False)
        self.out = tensor_parallel.RowParallelLinear(
            width, args.dim, config=mp, bias=False, input_is_parallel=True, skip_bias_add=False,
            init_method=normal_init(args.init_std / math.sqrt(2 * args.n_layers)))

    def _output_gate(self, x: torch.Tensor) -> torch.Tensor | None:
        return self.out_gate(x)[0] if self.args.linear_output_gate else None

    def _finish(self, o: torch.Tensor, out_gate: torch.Tensor | None) -> torch.Tensor:
        """The mixed tokens o [b, s, h/tp, d] through the output norm and gate -> [b, s, h/tp * d]."""
        if self.args.linear_output_norm:
            o = self.out_norm(o)
        o = o.flatten(2)
        if out_gate is not None:
            o = swiglu(out_gate, o, impl=self.args.kernels)  # silu(x W_gate) * o
        return o


class LinearAttention(RecurrentMixer):
    def __init__(self, args: LlamaArgs, mp: ModelParallelConfig, tp_rank: int):
        super().__init__(args, mp, tp_rank)
        self.attend: LinearAttend = LocalLinearAttend(args.kernels)
        if args.linear_decay == "gated":
            self.gate = tensor_parallel.ColumnParallelLinear(args.dim, args.n_heads, config=mp, bias=True,
                                                             init_method=normal_init(args.init_std), gather_output=False)
        self._build_output(args, mp)

    def forward(self, x: torch.Tensor, seq: SequenceInfo) -> torch.Tensor:
        gate = self.gate(x)[0] if self.args.linear_decay == "gated" else None
        out_gate = self._output_gate(x)
        qkv = self.qkv(x)[0]
        o = recompute(self.mix, qkv, gate, out_gate, seq) if self.selective else self.mix(qkv, gate, out_gate, seq)
        return self.out(o)[0]

    def mix(self, qkv: torch.Tensor, gate: torch.Tensor | None, out_gate: torch.Tensor | None,
            seq: SequenceInfo) -> torch.Tensor:
        """The interior between the projections (feature maps, decay, linear attention, output norm
        and gate): the projections' outputs -> [b, s, h/tp * d]."""
        b, s, _ = qkv.shape
        q, k, v = qkv.view(b, s, 3, self.local_heads, self.head_dim).unbind(2)  # [b, s, h/tp, d] each
        feature = FEATURE_MAPS[self.args.linear_feature_map]
        log_decay = None
        if gate is not None:
            log_decay = F.logsigmoid(gate.float()) / GATE_LOGIT_NORMALIZER  # [b, s, h/tp]
        elif self.args.linear_decay == "retention":
            log_decay = self.log_decay
        return self._finish(self.attend(feature(q), feature(k), v, log_decay=log_decay, resets=seq.resets), out_gate)
