"""One step from a model description to a model laid out on a mesh, torchtitan-style.

    mesh = build_mesh(dp=1, pp=1, tp=2, device_type="cuda", sequence=SequenceLayout(sp=4, sp_method="ring"))
    model = parallelize_llama(args, mesh, seed=0, dtype=torch.bfloat16)

- tp: megatron-core's layers are built already split over the mesh's tp group (weights drawn
  whole, then split), from `model_parallel_config(mesh)`;
- pp: with mesh.pp > 1 the model is built as DeepSpeed pipeline stages (parallel/pipeline.py),
  each rank holding only its own stage's parts;
- sp: every mixer's `attend` is swapped for the sequence-parallel method of its kind, as the
  mesh's sequence layout (`mesh.sequence`) says: softmax layers get its softmax method (Ulysses,
  ring, USP or all-gather K/V), linear layers LASP-2 and Gated DeltaNet layers
  `delta_rule_attention` (with the halo exchange for their short convolution), with its state
  exchange, all in the same split of the sequence;
- activation checkpointing is the model's own (`args.activation_checkpointing`);
- `args.init_from` (a Hugging Face Llama folder): each rank reads only the tensors of its own
  parameters, maps them to our names (models/hf_llama.py) and keeps its tp part (models/state_layout.py),
  so every layout starts from the same weights.
Nothing here reads a config file or imports the launcher.
"""

from __future__ import annotations

from functools import partial

import torch
from torch import nn

from ithaca.log import get_logger
from ithaca.models.hf_llama import HFFolder, load_hf_llama
from ithaca.models.delta_net import GatedDeltaNet
from ithaca.models.linear_attention import LinearAttention
from ithaca.models.llama import Attention, Llama
from ithaca.models.llama_args import KernelChoice, LlamaArgs
from ithaca.models.mixer import (DeltaRuleAttend, LinearAttend, LocalDeltaRuleAttend, LocalLinearAttend,
                                 LocalSoftmaxAttend, ShortConv, SoftmaxAttend, local_short_conv)
from ithaca.models.state_layout import canonical_layout, canonical_name, shard
from ithaca.parallel.allgather_kv import allgather_kv_attention
from ithaca.parallel.delta_rule import delta_rule_attention
from ithaca.parallel.halo import sequence_parallel_causal_conv1d
from ithaca.parallel.lasp2 import lasp2_attention
from ithaca.parallel.megatron_bridge import model_parallel_config
from ithaca.parallel.mesh import ParallelMesh
from ithaca.parallel.ring import ring_attention
from ithaca.parallel.ulysses import ulysses_attention
from ithaca.parallel.usp import usp_attention

log = get_logger(__name__)


def softmax_attend(mesh: ParallelMesh, kernels: KernelChoice = "auto") -> SoftmaxAttend:
    """Causal softmax attention for this mesh: local, or split over sp by its layout's sp_method."""
    method = mesh.sequence.sp_method
    if mesh.sp == 1:
        return LocalSoftmaxAttend(kernels)
    if method == "ulysses":
        return partial(ulysses_attention, group=mesh.group("sp"), causal=True, impl=kernels)
    if method == "ring":
        return partial(ring_attention, group=mesh.group("ring"), causal=True, impl=kernels)
    if method == "usp":
        return partial(usp_attention, ulysses_group=mesh.group("ulysses"), ring_group=mesh.group("ring"), causal=True,
                       impl=kernels)
    return partial(allgather_kv_attention, group=mesh.group("sp"), causal=True, ring=mesh.ring, impl=kernels)


def linear_attend(mesh: ParallelMesh, kernels: KernelChoice = "auto") -> LinearAttend:
    """Linear attention for this mesh: the local chunked form, or LASP-2 over sp in the mesh's layout,
    its states all-gathered or scanned (the layout's `linear_sp_exchange`)."""
    if mesh.sp == 1:
        return LocalLinearAttend(kernels)
    return partial(lasp2_attention, group=mesh.group("sp"), ring=mesh.ring, impl=kernels,
                   exchange=mesh.sequence.linear_sp_exchange)


def delta_rule_attend(mesh: ParallelMesh, kernels: KernelChoice = "auto") -> tuple[DeltaRuleAttend, ShortConv]:
    """The delta rule and the short convolution for this mesh: local, or over sp in the mesh's
    layout (transition pairs all-gathered or states scanned, the layout's `linear_sp_exchange`; the
    conv's halos point to point)."""
    if mesh.sp == 1:
        return LocalDeltaRuleAttend(kernels), local_short_conv
    group = mesh.group("sp")
    return (partial(delta_rule_attention, group=group, ring=mesh.ring, impl=kernels,
                    exchange=mesh.sequence.linear_sp_exchange),
            partial(sequence_parallel_causal_conv1d, group=group, ring=mesh.ring))


def apply_sequence_parallel(model: nn.Module, mesh: ParallelMesh, kernels: KernelChoice = "auto") -> nn.Module:
    """Give every mixer in `model` (a Llama or pipeline stages) the attention of its kind for `mesh`."""
    softmax, linear = softmax_attend(mesh, kernels), linear_attend(mesh, kernels)
    delta, conv = delta_rule_attend(mesh, kernels)
    for module in model.modules():
        if isinstance(module, Attention):
            module.attend = softmax
        elif isinstance(module, LinearAttention):
            module.attend = linear
        elif isinstance(module, GatedDeltaNet):
            module.attend, module.conv = delta, conv
    return model


def parallelize_llama(args: LlamaArgs, mesh: ParallelMesh, *, seed: int = 0, dtype: torch.dtype = torch.float32,
                      pp_split: list[int] | None = None) -> nn.Module:
    """This rank's part of the model `args` on `mesh`: a Llama, or with mesh.pp > 1 a DeepSpeed
    PipelineModule of this rank's stage (`pp_split`: blocks per stage; None balances parameters).
    Sequence parallelism follows `mesh.sequence` (`args.linear_sp_exchange` is not read here: the
    launcher puts it into the mesh's layout).
    Weights are drawn from `seed`, or with `args.init_from` read from that Hugging Face folder
    (raises ValueError naming its config.json field that differs from `args`)."""
    mp = model_parallel_config(mesh, dtype)
    if mesh.pp > 1:
        from ithaca.parallel.pipeline import pipeline_llama  # imports DeepSpeed
        model = pipeline_llama(args, mesh, mp, seed=seed, pp_split=pp_split)
    else:
        model = Llama(args, mp, seed=seed, tp_group=mesh.group("tp"))
    if args.init_from is not None:
        load_hf_weights(model, args, mesh)
    return apply_sequence_parallel(model, mesh, args.kernels)


def load_hf_weights(model: nn.Module, args: LlamaArgs, mesh: ParallelMesh) -> None:
    """Overwrite this rank's parameters (a Llama or pipeline stages) with `args.init_from`'s, each
    cut to this rank's tp part; reads only the tensors this rank holds. No communication."""
    folder = HFFolder(args.init_from)
    layout = canonical_layout(args)
    params = {canonical_name(name, args.n_layers): p for name, p in model.named_parameters()}
    weights = load_hf_llama(folder, args, list(params), layout)
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(shard(weights[name], layout[name], mesh.tp, mesh.rank("tp")))
    theirs = folder.config.get("rope_parameters") or {k: folder.config.get(k) for k in ("rope_theta", "rope_scaling")}
    log.info(f"init_from: {len(params)} tensors from {folder.path} (its rope: {theirs}; this run's: "
             f"rope_theta={args.rope_theta} rope_scaling={args.rope_scaling})")
