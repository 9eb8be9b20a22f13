"""Run a function on several CPU ranks over gloo and collect what each returns.

Ranks are processes (not torchrun) forked from one fork server that imported torch, DeepSpeed,
megatron-core, MLflow and our model and parallel code once: those imports were most of a short case's time
on 2 cores. Each rank runs with the caller's environment at the call, but modules the server
imported read theirs when it started (conftest sets those variables first). An exception on any rank is re-raised here with that rank's traceback; a hang fails after
`timeout` seconds instead of blocking the suite.
"""

from __future__ import annotations

import logging
import os
import socket
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, world: int, port: int, fn: Callable, args: tuple, out_dir: str,
               environ: dict[str, str], init_group: bool) -> None:
    os.environ.clear()
    os.environ.update(environ)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world), DS_ACCELERATOR="cpu")
    torch.set_num_threads(1)  # several ranks share two cores
    try:
        if init_group:
            dist.init_process_group("gloo", rank=rank, world_size=world)
        result = {"value": fn(*args)}
    except BaseException:
        result = {"error": traceback.format_exc()}
    torch.save(result, Path(out_dir) / f"rank{rank}.pt")  # files, not a pipe: a big result cannot block
    if dist.is_initialized() and "error" not in result:
        dist.destroy_process_group()
    os._exit(0)  # a failed rank's peers may be stuck in a collective; the parent reports the error


SERVER_IMPORTS = ["torch", "deepspeed", "megatron.core.tensor_parallel", "mlflow", "ithaca.parallel.parallelize"]
"""Not the launcher: tests/dist/test_library_use.py checks a model runs without importing it."""


def run_ranks(fn: Callable, world: int, *args: Any, timeout: float = 300, init_group: bool = True) -> list[Any]:
    """fn(*args) on `world` ranks with a gloo default group (`init_group=False`: fn starts it, from
    the torchrun-like environment each rank has); returns the results in rank order."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")  # read once, when the fork server imports DeepSpeed
    mp.set_forkserver_preload(SERVER_IMPORTS)
    with tempfile.TemporaryDirectory() as out_dir:
        procs = mp.start_processes(_rank_main, args=(world, free_port(), fn, args, out_dir, dict(os.environ), init_group),
                                   nprocs=world, join=False, start_method="forkserver")
        deadline = time.monotonic() + timeout
        results: dict[int, dict] = {}
        while len(results) < world and time.monotonic() < deadline:
            for rank in range(world):
                path = Path(out_dir) / f"rank{rank}.pt"
                if rank not in results and path.is_file():
                    time.sleep(0.05)  # let the save finish
                    results[rank] = torch.load(path, weights_only=False)
            if any("error" in r for r in results.values()) or not any(p.is_alive() for p in procs.processes):
                time.sleep(0.5)
                break
            time.sleep(0.1)
        for p in procs.processes:
            if p.is_alive():
                p.kill()
            p.join()
        for rank in range(world):
            path = Path(out_dir) / f"rank{rank}.pt"
            if rank not in results and path.is_file():
                results[rank] = torch.load(path, weights_only=False)
    errors = [f"rank {r}:\n{res['error']}" for r, res in sorted(results.items()) if "error" in res]
    if errors:
        raise AssertionError("a rank failed:\n" + "\n".join(errors))
    if len(results) != world:
        raise AssertionError(f"only ranks {sorted(results)} of {world} finished (crash, or timeout after {timeout}s)")
    return [results[r]["value"] for r in range(world)]


class LogLines(logging.Handler):
    """The messages a logger emits in a rank (pytest's caplog does not reach forked ranks)."""

    def __init__(self):
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())
