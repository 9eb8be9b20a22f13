"""Faults injected for real, for tests only (never set in a real job): the one place the test-only
environment variables are read.

`ITHACA_TEST_FAULT=KIND:STEP:RANK[:ATTEMPT]` makes global rank RANK of a training run, at the start of
step STEP (the training loop's one call, `at_step_start`, which does nothing when no fault is planned):
- `kill`: receive SIGKILL at the start of the step, before its first collective, so the other
  ranks wait in that collective and no checkpoint after step STEP-1 can exist (a kill fired
  from a timer could land after the step, and its checkpoint, on a busy machine);
- `hang`: stop before the step's first collective and never return (the others wait in it);
- `stop`: SIGSTOP itself there, so a test holds the rank at a known step until it sends SIGCONT
  (a stop signal sent meanwhile is handled as usual once it continues).
Only attempt ATTEMPT (default 0, the first) of a torchrun job is faulted (TORCHELASTIC_RESTART_COUNT,
unset meaning 0), so a run restarted by --max-restarts goes through.

`ITHACA_TEST_BREAK=sp_grad_scale|sp_grad_drop` makes the layout run of `ithaca check` wrong on
purpose (`break_for_tests`), as a sequence-parallel gradient bug would.
"""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass

from torch import nn

from ithaca.launcher.runtime.distributed import restart_attempt

ENV = "ITHACA_TEST_FAULT"
KINDS = ("kill", "hang", "stop")
TEST_BREAK_VAR = "ITHACA_TEST_BREAK"


@dataclass(frozen=True)
class Fault:
    kind: str
    step: int

    def at_step_start(self, step: int) -> None:
        if step != self.step:
            return
        if self.kind == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        elif self.kind == "stop":
            os.kill(os.getpid(), signal.SIGSTOP)
        else:
            while True:
                time.sleep(3600)


def at_step_start(step: int, rank: int) -> None:
    """The training loop's one call per step, before the step's first collective: this rank's
    planned fault fires if `step` is its step; without ITHACA_TEST_FAULT, nothing happens."""
    fault = planned_fault(rank)
    if fault is not None:
        fault.at_step_start(step)


def planned_fault(rank: int) -> Fault | None:
    """This rank's fault from the environment, or None."""
    spec = os.environ.get(ENV)
    if not spec:
        return None
    kind, step, fault_rank, *attempt = spec.split(":")
    if kind not in KINDS:
        raise ValueError(f"{ENV}={spec!r}: the kind is one of {', '.join(KINDS)}")
    if restart_attempt() != int(attempt[0] if attempt else 0):
        return None
    return Fault(kind, int(step)) if int(fault_rank) == rank else None


def break_for_tests(model: nn.Module, sp: int, sp_rank: int, n_layers: int) -> None:
    """`ithaca check`'s layout run only: make the gradient of the last block's `attn.qkv.weight`
    wrong on every sp rank before DeepSpeed reduces it, as a layout bug would.

    sp_grad_scale: multiplied by sp (a Ulysses backward that forgot to divide); sp_grad_drop: only
    sp rank 0's share kept (its sum over the sp ranks dropped). With sp=1 (the twin) neither
    changes anything. Training never calls this.
    """
    from ithaca.models.state_layout import canonical_name

    mode = os.environ.get(TEST_BREAK_VAR)
    if not mode:
        return
    factors = {"sp_grad_scale": float(sp), "sp_grad_drop": float(sp_rank == 0)}
    if mode not in factors:
        raise ValueError(f"{TEST_BREAK_VAR}={mode}: use one of {', '.join(factors)} (tests only)")
    target = f"blocks.{n_layers - 1}.attn.qkv.weight"
    for name, param in model.named_parameters():
        if canonical_name(name, n_layers) == target:
            param.register_hook(lambda grad: grad * factors[mode])
