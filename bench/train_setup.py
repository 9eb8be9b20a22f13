"""A shipped config's model on one device, built as the training loop builds it, for benchmarks."""

from __future__ import annotations

import dataclasses
import os

import torch

from ithaca.bench.rendezvous import free_port
from ithaca.launcher.config.load import load_config
from ithaca.launcher.runtime.distributed import init_distributed
from ithaca.models.llama import Llama
from ithaca.models.llama_args import LlamaArgs
from ithaca.parallel.mesh import ParallelMesh
from ithaca.parallel.parallelize import parallelize_llama


def init_single_process() -> ParallelMesh:
    """The training loop's process-group setup for one rank (nccl on a GPU machine, gloo otherwise):
    megatron-core's layers need its parallel state."""
    for name, value in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0"), ("MASTER_ADDR", "127.0.0.1"),
                        ("MASTER_PORT", str(free_port()))):
        os.environ.setdefault(name, value)
    return init_distributed(dp=1, pp=1, tp=1).mesh


def build_model(mesh: ParallelMesh, config: str, kernels: str, device: str,
                dtype: torch.dtype) -> tuple[Llama, LlamaArgs]:
    """The config's model with model.kernels=`kernels`, weights from seed 0, on `device` in `dtype`."""
    cfg = load_config(config, ["data.path=unused", "parallel.dp=1", "parallel.tp=1", "parallel.sp=1",
                               "parallel.sp_method=ulysses", "parallel.ulysses_degree=null"])
    args = dataclasses.replace(cfg.model, kernels=kernels)
    model = parallelize_llama(args, mesh, dtype=dtype)
    return model.to(device), args
