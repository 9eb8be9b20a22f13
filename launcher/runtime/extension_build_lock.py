"""A stale lock of DeepSpeed's CPU shared-memory op build, cleared before ranks start.

Every rank builds (or loads) DeepSpeed's `deepspeed_shm_comm` op when DeepSpeed's communication
starts, under a lock file that torch's extension builder (cpp_extension's FileBaton) creates and
removes. A build killed mid-compile (a Ctrl-C, a killed test run) leaves the file behind, and every
later run on the machine then waits for it forever, printing nothing. A build takes under a minute
on two cores; a lock older than STALE_AFTER_S is taken as left behind and removed, with one line.
A younger one may belong to another run's build right now, so it is left alone.
"""

from __future__ import annotations

import time
from pathlib import Path

from torch.utils.cpp_extension import get_default_build_root

from ithaca.log import get_logger

log = get_logger(__name__)

OP_NAME = "deepspeed_shm_comm"
STALE_AFTER_S = 600.0


def clear_stale_build_lock(build_root: Path | None = None, now: float | None = None) -> list[Path]:
    """Remove the op's build locks older than STALE_AFTER_S under the extension build root
    (TORCH_EXTENSIONS_DIR, or ~/.cache/torch_extensions); returns the ones removed."""
    root = Path(build_root or get_default_build_root())
    now = time.time() if now is None else now
    removed = []
    for lock in root.glob(f"*/{OP_NAME}/lock"):  # one folder per Python and CUDA version
        try:
            age = now - lock.stat().st_mtime
            if age > STALE_AFTER_S:
                lock.unlink()
                removed.append(lock)
                log.warning(f"removed {lock}: a DeepSpeed op build lock {age / 60:.0f} minutes old, left by a "
                            f"build that was killed (every rank would have waited for it forever)")
        except FileNotFoundError:
            pass  # its build finished (or another run removed it) while we looked
    return removed
