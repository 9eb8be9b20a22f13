"""Stopping for preemption: SIGUSR1 (SLURM's warning before the time limit, `--signal=USR1@T`),
SIGTERM (preemption, `scancel`, a killed torchrun's parent-death signal) and SIGINT (Ctrl-C,
handed on by `ithaca train` or torchrun) ask the run to stop; every rank stops at the same step
boundary, after a checkpoint, and rank 0 leaves a marker that tells the batch script to requeue.
Later signals change nothing: `ithaca train` kills the run itself on a second Ctrl-C.

A signal lands on each rank at its own moment, so after every step the ranks all-reduce (max)
the signal they have seen: all of them see the same answer at the same step.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import torch
import torch.distributed as dist

STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT)
MARKER = "preempted.json"
"""Written in train.output_dir by rank 0 after the checkpoint of a stop; slurm/job.sbatch requeues when it exists."""


class StopOnSignal:
    """Records the first stop signal this process receives; `agreed` turns it into a collective decision."""

    def __init__(self):
        self.received = 0
        self._previous = {s: signal.signal(s, self._handle) for s in STOP_SIGNALS}

    def _handle(self, signum: int, frame) -> None:
        self.received = self.received or signum

    def agreed(self, device: torch.device) -> signal.Signals | None:
        """The stop signal any rank has received, the same on every rank (collective over the world)."""
        flag = torch.tensor([self.received], dtype=torch.int64, device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return signal.Signals(int(flag.item())) if flag.item() else None

    def restore(self) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)


def write_marker(output_dir: Path, step: int, signum: signal.Signals) -> None:
    tmp = output_dir / f"{MARKER}.tmp"
    tmp.write_text(json.dumps({"step": step, "signal": signum.name}))
    os.replace(tmp, output_dir / MARKER)


def clear_marker(output_dir: Path) -> None:
    (output_dir / MARKER).unlink(missing_ok=True)
