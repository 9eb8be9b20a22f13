"""Checkpoints: DeepSpeed's engine state plus our step, data position, RNG and MLflow run.

A checkpoint is written under a `.partial` name and renamed once every rank has finished, and
`latest` is replaced atomically after that, so an interrupted save never becomes the one a
resume picks.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

if TYPE_CHECKING:  # importing DeepSpeed takes seconds; the CLI's preflight needs only resolve_checkpoint
    import deepspeed

LATEST = "latest"


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def save_checkpoint(engine: deepspeed.DeepSpeedEngine, ckpt_dir: Path, step: int, client_state: dict) -> Path:
    """Save on every rank (collective); returns the finished checkpoint's folder."""
    final = ckpt_dir / tag_for(step)
    partial_tag = f"{final.name}.partial"
    rank = dist.get_rank()
    if rank == 0:
        shutil.rmtree(ckpt_dir / partial_tag, ignore_errors=True)
    dist.barrier()
    engine.save_checkpoint(str(ckpt_dir), tag=partial_tag, client_state=client_state, save_latest=False)
    torch.save(_rng_state(), ckpt_dir / partial_tag / f"rng_rank{rank}.pt")
    dist.barrier()  # every rank's files are written before the folder gets its final name
    if rank == 0:
        if final.exists():
            shutil.rmtree(final)
        (ckpt_dir / partial_tag).rename(final)
        tmp = ckpt_dir / f"{LATEST}.tmp"
        tmp.write_text(final.name)
        os.replace(tmp, ckpt_dir / LATEST)
    dist.barrier()
    return final


def resolve_checkpoint(ckpt_dir: Path, resume: str) -> Path:
    """'latest' -> the folder `latest` names; else `resume` must be a checkpoint folder.

    Raises ValueError naming the fix when there is none.
    """
    if resume == LATEST:
        pointer = ckpt_dir / LATEST
        if not pointer.is_file():
            raise ValueError(f"--resume: no checkpoint in {ckpt_dir} yet; train without --resume first, "
                             "or give a checkpoint folder")
        path = ckpt_dir / pointer.read_text().strip()
    else:
        path = Path(resume)
    if not path.is_dir() or not any(path.glob("mp_rank_*_model_states.pt")):
        raise ValueError(f"--resume={str(path)!r}: not a finished checkpoint folder (step_NNNNNNNN)")
    return path


def load_checkpoint(engine: deepspeed.DeepSpeedEngine, path: Path) -> dict:
    """Restore engine state (weights, optimizer, schedule) and this rank's RNG; returns the client state."""
    loaded, client_state = engine.load_checkpoint(str(path.parent), tag=path.name)
    if loaded is None:
        raise ValueError(f"--resume={str(path)!r}: DeepSpeed could not load it (see the log above)")
    rng_file = path / f"rng_rank{dist.get_rank()}.pt"
    if rng_file.is_file():
        _set_rng_state(torch.load(rng_file, weights_only=False))
    return client_state


def _rng_state() -> dict:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
