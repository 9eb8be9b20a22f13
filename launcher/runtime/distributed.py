"""Process-group setup from the environment torchrun sets; gloo on CPU, nccl on CUDA."""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.distributed.distributed_c10d as c10d

from ithaca.launcher.runtime.network_interface import choose_interface
from ithaca.parallel.megatron_bridge import initialize_megatron
from ithaca.parallel.mesh import ParallelMesh, build_mesh
from ithaca.parallel.sequence_layout import SequenceLayout

TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def launched_by_torchrun() -> bool:
    return all(name in os.environ for name in TORCHRUN_VARS)


def env_world_size() -> int:
    return int(os.environ["WORLD_SIZE"])


def restart_attempt() -> int:
    """Which attempt of a torchrun job this is: 0 first, then one more per --max-restarts restart."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))


def restarts_allowed() -> int:
    """torchrun's --max-restarts for this job (0 outside torchrun)."""
    return int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0"))


def _attempt_store() -> dict:
    """Under torchrun, the store, rank and world size for init_process_group, with keys of this attempt only.

    torchrun (torch 2.13, c10d rendezvous) keeps one store, its agent's, across the attempts of
    --max-restarts and does not prefix its keys per attempt: a restarted rank reads the addresses its
    killed predecessors published and waits forever to connect to them (seen with gloo; pytorch#167288
    reports the same under NCCL). Each attempt therefore gets its own key space. With
    TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 (launcher/runtime/torchrun_main.py sets it) the agent shares
    no store: rank 0 hosts a new one each rendezvous round, as torch's env:// would, and no key
    outlives its round (the restart count, which differs between a node that stayed and one that
    came back, is then not needed to tell the rounds apart).
    """
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT")
    if attempt is None:
        return {}
    rank, address = int(os.environ["RANK"]), (os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]))
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        store = dist.PrefixStore(f"ithaca/attempt_{attempt}", dist.TCPStore(*address, is_master=False))
    else:
        store = dist.TCPStore(*address, is_master=rank == 0)
    return {"store": store, "rank": rank, "world_size": int(os.environ["WORLD_SIZE"])}


@dataclass(frozen=True)
class Distributed:
    mesh: ParallelMesh
    device: torch.device


def init_distributed(*, dp: int, pp: int, tp: int, sequence: SequenceLayout = SequenceLayout(),
                     collective_timeout: float | None = None) -> Distributed:
    """Start the default process group (if needed), the mesh (its sp ranks laid out by `sequence`)
    and megatron-core's groups.

    `collective_timeout` (seconds) bounds every collective of every group the run creates: a
    rank that died or hangs makes the others fail instead of wait forever. torch gives groups
    made without an explicit timeout (the mesh's, megatron-core's, DeepSpeed's) its module
    default, so that default is set too, before any group exists. The network interface the
    backend binds to is chosen first (launcher/runtime/network_interface.py).
    """
    if collective_timeout is not None:
        timeout = timedelta(seconds=collective_timeout)
        c10d.default_pg_timeout = c10d.default_pg_nccl_timeout = timeout
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    if not dist.is_initialized():
        store = _attempt_store()
        choose_interface(backend, store.get("store"))
        dist.init_process_group(backend, timeout=None if collective_timeout is None else timeout, **store)
    mesh = build_mesh(dp=dp, pp=pp, tp=tp, device_type=device.type, sequence=sequence)
    initialize_megatron(mesh)
    return Distributed(mesh=mesh, device=device)
