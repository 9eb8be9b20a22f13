"""A stuck step is named and its rank stopped; a heartbeat file per rank shows that it moves.

The training loop marks when each step begins and ends (the checkpoint after it included). A
daemon thread checks every few seconds; once a step has run longer than `train.step_timeout` it
- logs one line naming the step, the seconds, and where the main thread is: the innermost
  torch.distributed call on its stack (the collective it is waiting in) and the Ithaca line that
  made it, else the innermost Ithaca line;
- writes every thread's stack to <output>/hang-rank-NNNNN.txt;
- ends the process (exit code 3): torchrun then stops the other ranks, or restarts all of them
  from the last checkpoint under --max-restarts.
A collective waiting on a dead or hung peer fails sooner, by `train.collective_timeout`; the
watchdog also catches what no collective bounds: a stuck read, a deadlocked loader, a rank that
never reaches its collective. On CUDA, collectives run asynchronously, so the stack shows where
the host waits for the GPU (e.g. `.item()`) rather than the NCCL call; PyTorch's NCCL flight
recorder (TORCH_NCCL_TRACE_BUFFER_SIZE) names that one.

Heartbeat: <output>/heartbeat/rank-NNNNN.json ({"step", "time", "pid", "host"}) is replaced
after every step, so a stuck rank's file stops changing: `find OUT/heartbeat -mmin +M` lists the
ranks that have not finished a step in M minutes.
"""

from __future__ import annotations

import faulthandler
import json
import os
import socket
import sys
import threading
import time
from pathlib import Path
from types import FrameType

from ithaca.log import get_logger

log = get_logger(__name__, all_ranks=True)  # a hang is usually on one rank: each names its own

EXIT_HUNG = 3
_PACKAGE = str(Path(__file__).resolve().parents[1])  # the ithaca package's folder
_COLLECTIVES = os.sep.join(("torch", "distributed", "distributed_c10d.py"))


def where_stuck(frame: FrameType | None) -> str:
    """'all_reduce (torch.distributed) called from .../train.py:87 in train_step' for a thread's frame."""
    frames = []
    while frame is not None:
        frames.append(frame)
        frame = frame.f_back
    collective = next((f for f in frames if f.f_code.co_filename.endswith(_COLLECTIVES)), None)
    start = frames.index(collective) if collective else 0
    ours = next((f for f in frames[start:] if _is_ours(f.f_code.co_filename)), None)
    at = "" if ours is None else f"{ours.f_code.co_filename}:{ours.f_lineno} in {ours.f_code.co_name}"
    if collective is not None:
        return f"{collective.f_code.co_name} (torch.distributed)" + (f" called from {at}" if at else "")
    if ours is not None:
        return at
    return "an unknown place (no Ithaca frame on the stack)" if not frames else \
        f"{frames[0].f_code.co_filename}:{frames[0].f_lineno} in {frames[0].f_code.co_name}"


def _is_ours(filename: str) -> bool:
    """A file of the ithaca package (not of a virtual environment inside a source checkout)."""
    return filename.startswith(_PACKAGE + os.sep) and "site-packages" not in Path(filename).parts


class StepWatchdog:
    """Per rank: `begin(step)` / `end(step)` around each step; `close()` at the end of training."""

    def __init__(self, output_dir: Path, rank: int, step_timeout: float, *, poll: float = 2.0):
        self._rank, self._timeout, self._poll = rank, step_timeout, min(poll, step_timeout / 4)
        self._output_dir = output_dir
        self._heartbeat = output_dir / "heartbeat" / f"rank-{rank:05d}.json"
        self._heartbeat.parent.mkdir(parents=True, exist_ok=True)
        self._main = threading.main_thread().ident
        self._step, self._began = 0, None
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="ithaca-step-watchdog", daemon=True)
        self._thread.start()

    def begin(self, step: int) -> None:
        self._step, self._began = step, time.monotonic()

    def end(self, step: int) -> None:
        self._began = None
        tmp = self._heartbeat.with_suffix(".tmp")
        tmp.write_text(json.dumps({"step": step, "time": time.time(), "pid": os.getpid(),
                                   "host": socket.gethostname()}))
        os.replace(tmp, self._heartbeat)

    def close(self) -> None:
        self._closed.set()
        self._thread.join()

    def _watch(self) -> None:
        while not self._closed.wait(self._poll):
            began = self._began
            if began is not None and time.monotonic() - began > self._timeout:
                self._stop_hung(time.monotonic() - began)

    def _stop_hung(self, seconds: float) -> None:
        stuck = where_stuck(sys._current_frames().get(self._main))
        stacks = self._output_dir / f"hang-rank-{self._rank:05d}.txt"
        with open(stacks, "w") as out:
            faulthandler.dump_traceback(out, all_threads=True)
        log.error(f"rank {self._rank}: step {self._step} has run {seconds:.0f} s, over train.step_timeout="
                  f"{self._timeout:g} s; stuck in {stuck}. Every thread's stack: {stacks}. Stopping this rank "
                  f"(exit {EXIT_HUNG})")  # the handler writes to stderr unbuffered: nothing is lost below
        os._exit(EXIT_HUNG)
