"""Checkpoints: DeepSpeed's engine state plus our step, data position, RNG and MLflow run.

A save (every rank; collective) writes `step_NNNNNNNN.partial`, then, once every rank's files are
closed, hashes and fsyncs them (each rank a share) and rank 0 writes `manifest.json` last: every
file's relative path, size and sha256, and the step. Only then is the folder renamed to
`step_NNNNNNNN` and `latest` replaced atomically, each rename fsynced; so a save killed at any
point leaves `latest` naming the previous complete checkpoint. The next save removes what a killed
one left (only folders named `step_NNNNNNNN[.old].partial`), and `checkpoint.keep` deletes old ones.

Each save records its layout (dp, tp, pp, sp, sp_method, ZeRO stage, precision, pp_split) and its
model's shape in the client state (launcher/checkpoint/reshard.py `checkpoint_facts`); a load under the same
layout is DeepSpeed's own, one under another layout is resharded (launcher/checkpoint/reshard.py), one of
another model shape is refused naming the field.

A load first checks every file against the manifest (launcher/checkpoint/format.py: size, then sha256)
and refuses a missing, truncated, modified or unlisted file in one line naming it, before anything is
unpickled. Resuming from `latest` then falls back to the newest earlier checkpoint that passes, saying
so; a folder given by name is refused. DeepSpeed 0.19.8 loads with `torch.load(weights_only=False)`;
we route its loads through format.py's `load_weights_only`, so unpickling runs no code that the file chooses.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from ithaca.launcher.checkpoint.format import (LATEST, MANIFEST, check_file, load_weights_only, read_checkpoint_facts,
                                              read_manifest, step_of, tag_for, unlisted_files)
from ithaca.launcher.checkpoint.reshard import (CheckpointLayout, check_model_shape, check_reshardable, load_resharded,
                                               written_layout)
from ithaca.log import get_logger

if TYPE_CHECKING:  # importing DeepSpeed takes seconds; the CLI's preflight needs only resolve_checkpoint
    import deepspeed

    from ithaca.launcher.config.schema import RunConfig
    from ithaca.parallel.mesh import ParallelMesh

log = get_logger(__name__)

_PARTIAL = re.compile(r"step_\d{8}(\.old)?\.partial")  # one being written, or being deleted (fullmatch)


def save_checkpoint(engine: deepspeed.DeepSpeedEngine, ckpt_dir: Path, step: int, client_state: dict, *,
                    keep: int | None = None) -> Path:
    """Save on every rank (collective); returns the finished checkpoint's folder.

    `keep`: afterwards delete all but the `keep` newest complete checkpoints up to this step
    (folders of later steps, left by a run resumed from an earlier one, stay); None keeps all.
    """
    final = ckpt_dir / tag_for(step)
    partial = ckpt_dir / f"{final.name}.partial"
    rank = dist.get_rank()
    if rank == 0 and ckpt_dir.is_dir():
        # Every rank passed the previous save's closing barrier, so a .partial here is a killed save's.
        for stale in sorted(p for p in ckpt_dir.iterdir() if p.is_dir() and _PARTIAL.fullmatch(p.name)):
            log.info(f"removing {stale}: left by a save that did not finish")
            shutil.rmtree(stale)
    dist.barrier()  # no rank writes into `partial` before a stale one of that name is gone
    engine.save_checkpoint(str(ckpt_dir), tag=partial.name, client_state=client_state, save_latest=False)
    torch.save(_rng_state(), partial / f"rng_rank{rank}.pt")
    dist.barrier()  # every rank's files are closed before they are listed and hashed
    files = _describe_files(partial)
    if rank == 0:
        _write_synced(partial / MANIFEST, json.dumps({"step": step, "files": files}, indent=1))
        for folder in (partial, *(p for p in partial.rglob("*") if p.is_dir())):
            _fsync_dir(folder)  # the files' names are durable before the folder's new name is
        _publish(partial, final)
        if keep is not None:
            _prune(ckpt_dir, step, keep)
    dist.barrier()
    return final


def resolve_checkpoint(ckpt_dir: Path, resume: str) -> Path:
    """'latest' -> the folder `latest` names; else `resume` must be a checkpoint folder with a manifest.

    Reads no checkpoint file (the CLI's preflight calls it before any process starts); the full
    check is load_checkpoint's. Raises ValueError naming the fix when there is none.
    """
    if resume == LATEST:
        pointer = ckpt_dir / LATEST
        if not pointer.is_file():
            raise ValueError(f"--resume: no checkpoint in {ckpt_dir} yet; train without --resume first, "
                             "or give a checkpoint folder")
        return ckpt_dir / pointer.read_text().strip()
    path = Path(resume)
    if not (path / MANIFEST).is_file():
        raise ValueError(f"--resume={str(path)!r}: not a finished checkpoint folder (step_NNNNNNNN with {MANIFEST})")
    return path


def load_checkpoint(engine: deepspeed.DeepSpeedEngine, ckpt_dir: Path, resume: str, *, cfg: RunConfig,
                    mesh: ParallelMesh) -> tuple[Path, dict]:
    """Verify, then restore engine state (weights, optimizer, schedule) and this rank's RNG (collective).

    `resume`: 'latest' (if its checkpoint fails verification, the newest earlier one that passes is
    used and one line says why) or a checkpoint folder (refused if it fails). Every rank takes the
    same decision: rank 0 lists the candidates, every rank checks a share of each one's files.
    A checkpoint written under another layout than `cfg`'s is resharded (launcher/checkpoint/reshard.py);
    one of another model shape is refused naming the field.
    Returns (the folder loaded, the client state). Raises ValueError naming the file and the failed check.
    """
    candidates = _from_rank0(lambda: _candidates(ckpt_dir, resume))
    path, problem = candidates[0], verify_checkpoint(candidates[0])
    for earlier in candidates[1:]:
        if problem is None:
            break
        log.warning(f"--resume: {problem}; falling back to the previous checkpoint, {earlier}")
        path, problem = earlier, verify_checkpoint(earlier)
    if problem is not None:
        also = "; no earlier checkpoint passes either" if len(candidates) > 1 else ""
        raise ValueError(f"--resume: {problem}{also}")

    facts = _from_rank0(lambda: read_checkpoint_facts(path))
    check_model_shape(facts, cfg.model, path)
    written, running = written_layout(facts), CheckpointLayout.of(cfg)
    if written != running:
        check_reshardable(written, running)
        log.info(f"resharding checkpoint {path} written under {written} to {running}")
        client_state = load_resharded(engine, path, cfg.model, mesh)
        _load_rng(path)
        return path, client_state

    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    assert isinstance(engine.checkpoint_engine, TorchCheckpointEngine)  # launcher/train/engine.py sets no other writer
    # This engine's loads only: DeepSpeed's own TorchCheckpointEngine.load passes weights_only=False.
    engine.checkpoint_engine.load = load_weights_only
    loaded, client_state = engine.load_checkpoint(str(path.parent), tag=path.name)
    if loaded is None:
        raise ValueError(f"--resume={str(path)!r}: DeepSpeed could not load it (see the log above)")
    _load_rng(path)
    return path, client_state


def _load_rng(path: Path) -> None:
    """This rank's RNG state from checkpoint `path`, if it has one (a resharded run may have more ranks)."""
    rng_file = path / f"rng_rank{dist.get_rank()}.pt"
    if rng_file.is_file():
        _set_rng_state(load_weights_only(rng_file))


def verify_checkpoint(path: Path) -> str | None:
    """None if every file under `path` matches its manifest, else one line naming the first file
    (in manifest order) that does not and the check it failed (collective: every rank gets the same answer)."""
    manifest = _from_rank0(lambda: read_manifest(path))
    if isinstance(manifest, str):
        return manifest
    rank, world = dist.get_rank(), dist.get_world_size()
    entries = manifest["files"]
    found = [(i, check_file(path, entries[i])) for i in range(rank, len(entries), world)]
    if rank == 0:
        found += [(len(entries), problem) for problem in unlisted_files(path, manifest)]
    every = [None] * world
    dist.all_gather_object(every, [(i, p) for i, p in found if p is not None])
    problems = sorted(item for share in every for item in share)
    return problems[0][1] if problems else None


def _candidates(ckpt_dir: Path, resume: str) -> list[Path]:
    """The folder to load, then (for 'latest' only) the earlier complete ones, newest first."""
    path = resolve_checkpoint(ckpt_dir, resume)
    if resume != LATEST:
        return [path]
    below = step_of(path.name) or 0
    return [path, *(ckpt_dir / tag_for(s) for s in sorted(_complete_steps(ckpt_dir), reverse=True) if s < below)]


def _describe_files(folder: Path) -> list[dict]:
    """Every file under `folder` as {path, size, sha256}, in path order, on rank 0 ([] elsewhere); each rank
    hashes and fsyncs a share (collective). fsync on the rank that reads the file: on one machine the
    page cache is shared; across machines a shared filesystem hands the writer's data over at close."""
    rank, world = dist.get_rank(), dist.get_world_size()
    names = _from_rank0(lambda: sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()))
    mine = []
    for name in names[rank::world]:
        with open(folder / name, "rb") as f:
            digest = hashlib.file_digest(f, "sha256").hexdigest()
            os.fsync(f.fileno())
            mine.append({"path": name, "size": os.fstat(f.fileno()).st_size, "sha256": digest})
    every = [None] * world if rank == 0 else None
    dist.gather_object(mine, every, dst=0)
    return sorted((e for share in every for e in share), key=lambda e: e["path"]) if rank == 0 else []


def _publish(partial: Path, final: Path) -> None:
    """Give `partial` its final name and point `latest` at it; each step durable before the next."""
    ckpt_dir = final.parent
    aside = None
    if final.exists():  # a run resumed from an earlier step saves this step again
        aside = final.with_name(f"{final.name}.old.partial")  # the next save removes it if we die here
        final.rename(aside)
    partial.rename(final)
    _fsync_dir(ckpt_dir)
    tmp = ckpt_dir / f"{LATEST}.tmp"
    _write_synced(tmp, final.name)
    os.replace(tmp, ckpt_dir / LATEST)
    _fsync_dir(ckpt_dir)
    if aside is not None:
        shutil.rmtree(aside)


def _prune(ckpt_dir: Path, step: int, keep: int) -> None:
    """Delete all but the `keep` newest checkpoints up to `step` (the one `latest` now names)."""
    up_to = sorted(s for s in _complete_steps(ckpt_dir) if s <= step)
    for old in up_to[:-keep]:
        doomed = ckpt_dir / tag_for(old)
        aside = doomed.with_name(f"{doomed.name}.old.partial")  # a half-deleted folder never looks complete
        doomed.rename(aside)
        shutil.rmtree(aside)
        log.info(f"removed {doomed} (checkpoint.keep={keep})")


def _complete_steps(ckpt_dir: Path) -> list[int]:
    return [step for p in ckpt_dir.iterdir() if p.is_dir() and (step := step_of(p.name)) is not None]


def _from_rank0(compute: Any) -> Any:
    """compute() on rank 0, its result on every rank: one view of the folder when ranks' file-system
    caches differ. A ValueError or OSError it raises is raised on every rank, so none waits alone."""
    box: list = [None]
    if dist.get_rank() == 0:
        try:
            box = [(compute(), None)]
        except (ValueError, OSError) as err:
            box = [(None, str(err))]
    dist.broadcast_object_list(box, src=0)
    value, error = box[0]
    if error is not None:
        raise ValueError(error)
    return value


def _write_synced(file: Path, text: str) -> None:
    with open(file, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _rng_state() -> dict:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
