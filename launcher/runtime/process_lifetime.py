"""Linux controls that keep every process of a run inside the life of the command that started it.

Two kernel features (prctl(2)), both Linux-only; elsewhere they are unavailable and the functions
say so by returning False (the launcher still forwards signals, but a killed parent can leave
orphans there):
- the parent-death signal: a process asks to receive a signal when its parent exits, so ranks
  stop when torchrun is killed, and torchrun stops when `ithaca train` is;
- the child subreaper: orphaned descendants are re-parented to `ithaca train` instead of to init,
  so it can still find (and stop) a loader worker or a rank whose torchrun died.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

_PR_SET_PDEATHSIG = 1
_PR_SET_CHILD_SUBREAPER = 36


def _prctl(option: int, value: int) -> bool:
    if not sys.platform.startswith("linux"):
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(option, value, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), f"prctl({option}, {value}) failed")
    return True


def die_with_parent(signum: signal.Signals, parent_pid: int | None = None) -> bool:
    """Deliver `signum` to this process when its parent exits (set it at start, before any thread).

    The parent may already be gone by the time this runs: if `parent_pid` (what the parent said
    its pid was) or the parent seen before the call is no longer our parent, the signal is sent now.
    """
    parent = os.getppid() if parent_pid is None else parent_pid
    if not _prctl(_PR_SET_PDEATHSIG, int(signum)):
        return False
    if os.getppid() != parent:
        os.kill(os.getpid(), signum)
    return True


def become_subreaper() -> bool:
    """Orphaned descendants of this process become its children (so `wait` and psutil see them)."""
    return _prctl(_PR_SET_CHILD_SUBREAPER, 1)
