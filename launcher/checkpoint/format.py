"""What a finished checkpoint folder is, and reading one safely: what saving, loading, resharding and
consolidating all need. Imports nothing else of launcher/checkpoint/, so each of them can import it.

    <checkpoint.dir>/latest                 the name of the newest finished folder
    <checkpoint.dir>/step_NNNNNNNN/         DeepSpeed's files, rng_rank<r>.pt, and manifest.json:
        {"step": N, "files": [{"path", "size", "sha256"}, ...]}   every other file, in path order

Verification compares every file with the manifest (size first, then sha256) and refuses a file the
manifest does not list, before anything is unpickled. The manifest detects damage, not an attacker
who rewrites it too. Unpickling is `torch.load(weights_only=True)` allowing only tensors, plain data
and the three DeepSpeed classes of `_deepspeed_safe_globals`: no code of the file's choosing runs.

The client state a save passes to DeepSpeed (launcher/train/loop.py) lands in the model states file
of (dp, tp, pp) rank 0 (`main_states_file`) beside DeepSpeed's own entries; among its keys are the
layout and the model's shape (launcher/checkpoint/reshard.py `checkpoint_facts`).
"""

from __future__ import annotations

import hashlib
import json
import pickle
import re
from pathlib import Path
from typing import Any

import torch

LATEST = "latest"
MANIFEST = "manifest.json"
FACTS = ("layout", "model_shape")
"""The client state keys that say how a checkpoint was split and what model it holds."""
_COMPLETE = re.compile(r"step_(\d{8})")  # a finished checkpoint folder's name (fullmatch)


def tag_for(step: int) -> str:
    """The folder name of step `step`'s checkpoint."""
    return f"step_{step:08d}"


def step_of(name: str) -> int | None:
    """The step a finished checkpoint folder's name says, None if `name` is not one (e.g. a .partial)."""
    match = _COMPLETE.fullmatch(name)
    return int(match[1]) if match else None


def read_manifest(path: Path) -> dict | str:
    """The manifest of checkpoint `path`, or one line saying what is wrong with it."""
    file = path / MANIFEST
    if not path.is_dir():
        return f"{path}: no such checkpoint folder"
    if not file.is_file():
        return f"{file}: missing (a save that did not finish, or not a checkpoint folder)"
    try:
        manifest = json.loads(file.read_text())
        for e in manifest["files"]:
            rel = Path(e["path"])
            if rel.is_absolute() or ".." in rel.parts or not (isinstance(e["size"], int) and isinstance(e["sha256"], str)):
                raise ValueError(e)
    except (ValueError, KeyError, TypeError, OSError) as err:  # json's error is a ValueError
        return f"{file}: not a checkpoint manifest ({type(err).__name__}: {str(err)[:80]})"
    step = step_of(path.name)
    if step is not None and step != manifest.get("step"):
        return f"{file}: says step {manifest.get('step')}, the folder's name says {step}"
    return manifest


def check_file(folder: Path, entry: dict) -> str | None:
    """None if the file of manifest entry `entry` matches it, else one line naming the file and the check."""
    file = folder / entry["path"]
    if not file.is_file():
        return f"{file}: missing (listed in {MANIFEST})"
    try:
        size = file.stat().st_size
        if size != entry["size"]:  # checked first: truncation costs no read
            return f"{file}: {size} bytes, {MANIFEST} says {entry['size']} (truncated or overwritten)"
        with open(file, "rb") as f:
            digest = hashlib.file_digest(f, "sha256").hexdigest()
    except OSError as err:  # returned, not raised: in a collective check the other ranks wait for this answer
        return f"{file}: unreadable ({err.strerror})"
    if digest != entry["sha256"]:
        return f"{file}: sha256 differs from {MANIFEST} (corrupted or modified)"
    return None


def unlisted_files(path: Path, manifest: dict) -> list[str]:
    """One line per file under `path` that `manifest` does not vouch for (DeepSpeed might load it), in path order."""
    listed = {e["path"] for e in manifest["files"]} | {MANIFEST}
    found = sorted(p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file())
    return [f"{path / name}: not listed in {MANIFEST}" for name in found if name not in listed]


def verify_alone(path: Path) -> None:
    """Check every file of checkpoint `path` against its manifest in this process alone (no process
    group; launcher/checkpoint/store.py `verify_checkpoint` shares the work over ranks). Raises
    ValueError naming the first file that fails and the check."""
    manifest = read_manifest(path)
    if isinstance(manifest, str):
        raise ValueError(manifest)
    for entry in manifest["files"]:
        problem = check_file(path, entry)
        if problem is not None:
            raise ValueError(problem)
    unlisted = unlisted_files(path, manifest)
    if unlisted:
        raise ValueError(unlisted[0])


def load_weights_only(path: str | Path, map_location: Any = None) -> Any:
    """torch.load that unpickles only tensors, builtins and _deepspeed_safe_globals; DeepSpeed's
    checkpoint engine calls it with (path, map_location). Raises ValueError naming the file."""
    with torch.serialization.safe_globals(_deepspeed_safe_globals()):
        try:
            return torch.load(path, map_location=map_location, weights_only=True)
        except pickle.UnpicklingError as err:
            found = re.search(r"Unsupported global: GLOBAL (\S+)", str(err))
            what = found[1] if found else str(err).strip().splitlines()[-1][:120]
            raise ValueError(f"{path}: holds a pickled global ({what}) that loading refuses; it unpickles only "
                             "tensors, plain data and three DeepSpeed classes") from None


def main_states_file(path: Path) -> Path:
    """The model states file of (dp, tp, pp) rank 0 in checkpoint `path`: where DeepSpeed keeps the lr
    schedule, the step counters and the client state."""
    zero3 = path / "zero_pp_rank_0_mp_rank_00_model_states.pt"
    return zero3 if zero3.is_file() else path / "mp_rank_00_model_states.pt"


def read_checkpoint_facts(path: Path) -> dict:
    """The FACTS that checkpoint folder `path` (verified) records. Raises ValueError naming the file
    when one is missing (not a checkpoint `ithaca train` saved)."""
    file = main_states_file(path)
    saved = load_weights_only(file, "cpu")
    missing = [key for key in FACTS if key not in saved]
    if missing:
        raise ValueError(f"{file}: its client state has no {missing[0]!r}; not a checkpoint saved by `ithaca train`")
    return {key: saved[key] for key in FACTS}


def _deepspeed_safe_globals() -> list[type]:
    """The only classes DeepSpeed 0.19.8 pickles into our checkpoints besides tensors and builtins
    (torch.serialization.get_unsafe_globals_in_checkpoint over ZeRO 0-3, bf16, tp2 and pp2 saves).
    Each is rebuilt from numbers by its own constructor or attribute dict: no code the file chooses."""
    # Imported when a checkpoint is read: DeepSpeed takes seconds to import, and the CLI's preflight
    # reads only the `latest` pointer.
    from deepspeed.runtime.fp16.loss_scaler import LossScaler  # ZeRO optimizer states' static loss scale
    from deepspeed.runtime.zero.config import ZeroStageEnum  # optimizer states' zero_stage
    from deepspeed.utils.tensor_fragment import fragment_address  # dataclass (numel, start)

    return [LossScaler, ZeroStageEnum, fragment_address]
