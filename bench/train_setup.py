"""A shipped config's model on one device, built as the training loop builds it, for benchmarks."""

from __future__ import annotations

import dataclasses
import os

import torch
import torch.distributed as dist

from ithaca.launcher.config_load import load_config
from ithaca.launcher.sequence_parallel import make_attend, make_attend_linear
from ithaca.models.llama import Llama
from ithaca.models.llama_args import LlamaArgs
from ithaca.parallel.megatron_bridge import initialize_megatron, model_parallel_config
from ithaca.parallel.mesh import ParallelMesh, build_mesh


def init_single_process(device: str) -> ParallelMesh:
    """A one-rank process group and mesh (megatron-core's layers need its parallel state)."""
    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000))
        dist.init_process_group("nccl" if device == "cuda" else "gloo", rank=0, world_size=1)
    mesh = build_mesh(dp=1, pp=1, tp=1, sp=1, device_type=device)
    initialize_megatron(mesh)
    return mesh


def build_model(mesh: ParallelMesh, config: str, kernels: str, device: str,
                dtype: torch.dtype) -> tuple[Llama, LlamaArgs]:
    """The config's model with model.kernels=`kernels`, weights from seed 0, on `device` in `dtype`."""
    cfg = load_config(config, ["data.path=unused", "parallel.dp=1", "parallel.tp=1", "parallel.sp=1",
                               "parallel.sp_method=ulysses", "parallel.ulysses_degree=null"])
    args = dataclasses.replace(cfg.model, kernels=kernels)
    torch.manual_seed(0)
    model = Llama(args, model_parallel_config(mesh, dtype), make_attend(mesh, "ulysses", kernels),
                  make_attend_linear(mesh, kernels))
    return model.to(device), args
