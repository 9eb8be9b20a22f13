"""Process-group setup from the environment torchrun sets; gloo on CPU, nccl on CUDA."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ithaca.parallel.megatron_bridge import initialize_megatron
from ithaca.parallel.mesh import ParallelMesh, build_mesh

TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def launched_by_torchrun() -> bool:
    return all(name in os.environ for name in TORCHRUN_VARS)


def env_world_size() -> int:
    return int(os.environ["WORLD_SIZE"])


@dataclass(frozen=True)
class Distributed:
    mesh: ParallelMesh
    device: torch.device


def init_distributed(*, dp: int, pp: int, tp: int, sp: int, ring: int = 1) -> Distributed:
    """Start the default process group (if needed), the mesh and megatron-core's groups."""
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend)
    mesh = build_mesh(dp=dp, pp=pp, tp=tp, sp=sp, ring=ring, device_type=device.type)
    initialize_megatron(mesh)
    return Distributed(mesh=mesh, device=device)
