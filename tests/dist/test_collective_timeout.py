"""train.collective_timeout reaches the groups a run communicates on, not only the default one:
the mesh's (torch's DeviceMesh) and megatron-core's (which passes its own timeout). A rank that
never joins makes the other's collective fail after that long instead of waiting forever.
(End to end, through `ithaca train`, a hung rank is named by the watchdog:
tests/e2e/test_process_faults.py.)"""

from __future__ import annotations

import time

from harness import run_ranks

TIMEOUT = 2.0


def _wait_on_a_silent_rank() -> list[tuple[str, float, str]]:
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state

    from ithaca.launcher.runtime.distributed import init_distributed

    ctx = init_distributed(dp=2, pp=1, tp=1, collective_timeout=TIMEOUT)  # starts the default group too
    groups = {"mesh dp": ctx.mesh.group("dp"), "megatron dp": parallel_state.get_data_parallel_group()}
    if dist.get_rank() == 1:
        time.sleep(2.5 * TIMEOUT * len(groups))  # never joins; returns once rank 0 is done waiting
        return []
    waits = []
    for name, group in groups.items():
        start = time.monotonic()
        try:
            dist.all_reduce(torch.ones(1), group=group)
            error = "none"
        except RuntimeError as err:
            error = str(err)
        waits.append((name, time.monotonic() - start, error))
    return waits


def test_a_collective_waiting_on_a_silent_rank_fails_after_the_timeout():
    waits, _ = run_ranks(_wait_on_a_silent_rank, 2, timeout=120, init_group=False)  # as under torchrun
    for name, seconds, error in waits:
        assert "Timed out" in error, (name, error)
        assert TIMEOUT * 0.9 < seconds < 3 * TIMEOUT, (name, seconds)
