"""A stop signal that reaches one rank stops every rank at the same step boundary."""

from __future__ import annotations

import os
import signal

from harness import run_ranks


def _agree(signal_rank: int, signum: int) -> list[str | None]:
    import torch
    import torch.distributed as dist

    from ithaca.launcher.runtime.preemption import StopOnSignal

    stopper = StopOnSignal()
    try:
        decisions = [stopper.agreed(torch.device("cpu"))]  # nothing received yet
        if dist.get_rank() == signal_rank:
            os.kill(os.getpid(), signum)  # the handler runs before os.kill returns
        decisions.append(stopper.agreed(torch.device("cpu")))
    finally:
        stopper.restore()
    return [d.name if d else None for d in decisions]


def test_one_ranks_signal_is_every_ranks_decision():
    for signum, name in ((signal.SIGUSR1, "SIGUSR1"), (signal.SIGTERM, "SIGTERM")):
        assert run_ranks(_agree, 2, 1, signum) == [[None, name], [None, name]]
