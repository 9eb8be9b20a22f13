"""The model's canonical state: every parameter's whole shape and how megatron-core splits it over tp.

Canonical names are those of `ithaca.models.llama.Llama` built with tp = 1 (`embed.weight`,
`blocks.3.attn.qkv.weight`, ..., `head.weight`, absent with tied embeddings). Checkpoint readers
join tp shards into these tensors (`unshard`) and loaders cut them again for any tp (`shard`).

The splits are megatron-core's (tests/unit/test_rope_scaling.py checks this table against the
`partition_dim` / `partition_stride` marks of a built model): column-parallel weights (qkv, gate_up,
the output head, linear layers' gates and the per-head output norm) split dim 0, row-parallel ones
(out, down) dim 1, the vocab-parallel embedding dim 0; norms are whole on every rank. A stride s > 1
means the whole tensor is s blocks and each rank holds its 1/tp of every block: gate_up is [gate; up]
(s = 2), a linear layer's qkv [q; k; v] (s = 3). A softmax layer's qkv has stride 1: it is laid out
per kv group [g query heads, k, v], so a contiguous split keeps groups whole.
The table is written out, not read off a model built on the meta device: megatron-core's layers size
themselves by the process's global tp group, so a model built inside a tp run is already split.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ithaca.models.llama_args import LlamaArgs


@dataclass(frozen=True)
class ParamLayout:
    shape: tuple[int, ...]
    """The whole tensor's shape (tp = 1)."""
    tp_dim: int | None
    """The dim split over tp ranks; None: every tp rank holds the whole tensor."""
    stride: int = 1
    """Blocks along tp_dim that are split separately (each rank holds its 1/tp of every block)."""


def canonical_layout(args: LlamaArgs) -> dict[str, ParamLayout]:
    """Every parameter of the model `args`, in the model's order, with its whole shape and tp split."""
    d, f, h, hd = args.dim, args.ffn_dim, args.n_heads, args.head_dim
    out = {"embed.weight": ParamLayout((args.vocab_size, d), 0)}
    for i in range(args.n_layers):
        p = f"blocks.{i}."
        out[p + "attn_norm.weight"] = ParamLayout((d,), None)
        if args.mixer(i) == "S":  # models/llama.py Attention
            out[p + "attn.qkv.weight"] = ParamLayout(((h + 2 * args.kv_heads) * hd, d), 0)
        else:  # models/linear_attention.py LinearAttention, models/delta_net.py GatedDeltaNet
            gated, delta = args.linear_decay == "gated", args.mixer(i) == "D"
            if delta:  # GatedDeltaNet's own parameters come before its submodules'
                out[p + "attn.conv_weight"] = ParamLayout((3 * h * hd, args.delta_conv_size), 0, stride=3)
                if gated:
                    out[p + "attn.log_rate"] = ParamLayout((h,), 0)
            out[p + "attn.qkv.weight"] = ParamLayout((3 * h * hd, d), 0, stride=3)
            if delta:
                out[p + "attn.beta.weight"] = ParamLayout((h, d), 0)
            if gated:
                out[p + "attn.gate.weight"] = ParamLayout((h, d), 0)
                out[p + "attn.gate.bias"] = ParamLayout((h,), 0)
            if args.linear_output_norm:
                out[p + "attn.out_norm.weight"] = ParamLayout((h, hd), 0)
            if args.linear_output_gate:
                out[p + "attn.out_gate.weight"] = ParamLayout((h * hd, d), 0)
        out[p + "attn.out.weight"] = ParamLayout((d, h * hd), 1)
        out[p + "ffn_norm.weight"] = ParamLayout((d,), None)
        out[p + "ffn.gate_up.weight"] = ParamLayout((2 * f, d), 0, stride=2)
        out[p + "ffn.down.weight"] = ParamLayout((d, f), 1)
    out["norm.weight"] = ParamLayout((d,), None)
    if not args.tie_embeddings:
        out["head.weight"] = ParamLayout((args.vocab_size, d), 0)
    return out


def shard(full: torch.Tensor, layout: ParamLayout, tp: int, tp_rank: int) -> torch.Tensor:
    """Tp rank `tp_rank`'s part of the whole tensor `full`, as megatron-core's layers hold it
    (megatron/core/tensor_parallel/layers.py, _initialize_affine_weight_cpu): cut into tp * stride
    equal pieces along tp_dim, the rank takes pieces tp_rank, tp_rank + tp, ..."""
    if layout.tp_dim is None or tp == 1:
        return full
    pieces = full.chunk(tp * layout.stride, dim=layout.tp_dim)
    return torch.cat(pieces[tp_rank::tp], dim=layout.tp_dim)


def unshard(parts: list[torch.Tensor], layout: ParamLayout) -> torch.Tensor:
    """`shard`'s inverse: every tp rank's part, in rank order -> the whole tensor."""
    if layout.tp_dim is None or len(parts) == 1:
        return parts[0]
    blocks = [part.chunk(layout.stride, dim=layout.tp_dim) for part in parts]  # [rank][block]
    return torch.cat([blocks[r][s] for s in range(layout.stride) for r in range(len(parts))], dim=layout.tp_dim)


def pipeline_part_name(part: int, name: str, n_layers: int) -> str:
    """A parameter of pipeline part `part` (parallel/pipeline.py's list: 0 the embedding, 1..n_layers
    the blocks, then the final norm, then the output head) -> its canonical name."""
    if 1 <= part <= n_layers:
        return f"blocks.{part - 1}.{name.removeprefix('block.')}"
    return name  # the embedding, norm and head parts name their parameters as the Llama does


SHAPE_FIELDS = ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim", "tie_embeddings",
                "layer_pattern", "linear_decay", "linear_output_norm", "linear_output_gate", "delta_conv_size")
"""The LlamaArgs fields that `canonical_layout` reads: two models whose values agree have the same tensors."""


def shape_fields(args: LlamaArgs) -> dict[str, int | str | bool | None]:
    """The model's SHAPE_FIELDS and their values (what a checkpoint records of its model)."""
    return {name: getattr(args, name) for name in SHAPE_FIELDS}


def canonical_name(name: str, n_layers: int) -> str:
    """A parameter name of a Llama (already canonical) or of pipeline stages ("<part>.<name>", and
    "tied_modules.embedding.<name>" for the embedding DeepSpeed ties to the head) -> canonical."""
    if name.startswith("tied_modules.embedding."):
        return name.removeprefix("tied_modules.embedding.")
    part, rest = name.split(".", 1)
    return pipeline_part_name(int(part), rest, n_layers) if part.isdigit() else name
