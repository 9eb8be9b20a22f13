"""Bad numbers in a training step: a NaN or inf loss or gradient norm, seen by every rank at the
same step, that stops the run or skips the update (`train.on_nonfinite`); and loss spikes.

Whether a bad update reaches the weights. DeepSpeed 0.19.8 refuses an update whose global
gradient norm is not finite in each optimizer it wraps ours in: ZeRO 1-2
(`zero/stage_1_and_2.py` step: `is_invalid_grad_norm` -> overflow, for fp32 and for bf16 with
`check_grad_overflow`, default true), ZeRO-3 (`zero/stage3.py`) and bf16 without ZeRO
(`bf16_optimizer.py`). It then drops the gradients, leaves the lr schedule where it was, counts
`engine.skipped_steps` and reports `engine.was_step_applied()` False (logging "OVERFLOW! Skipping
step"). fp32 without ZeRO is the exception: the engine hands the gradients straight to torch's
AdamW, which applies them (measured: NaN weights one step after optim.lr=1e6, and no gradient
norm at all). `guard_plain_optimizer` gives that optimizer the same protocol. So in every
configuration a non-finite gradient never reaches the weights: `stop` leaves the last checkpoint
the last good state, and `skip` has nothing to undo.

The decision is one all-reduce (MAX) of a flag over every rank of the job after the step, so
pipeline stages, which see different parts of the numbers, agree too. `after_step` returns it as
a Verdict that the loop acts on: continue, skip (the update was refused; go on) or stop (raise
`verdict.error(...)`).

The first non-finite parameter gradient is looked for only on the failure path, in what this rank
holds before the update (DeepSpeed drops the gradients when it skips one): the whole gradient
without ZeRO, this rank's optimizer partition under ZeRO 1-3, before clipping (a NaN norm makes
every clipped gradient NaN). Without pipeline stages the step looks before the update when the
loss is already not finite (`before_update`); otherwise, at a stop, the loop computes the step
again at the same weights (the update was skipped) calling `look_for_bad_gradient` before that
update, and asks again (`gather_bad_gradient`). Pipeline stages run forward, backward and update
in one DeepSpeed call, so there the gradient is 'unknown', as is a NaN that does not come back.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from typing import Literal

import torch
import torch.distributed as dist
from torch import nn

from ithaca.launcher.checkpoint.store import LATEST, resolve_checkpoint
from ithaca.launcher.config.schema import RunConfig
from ithaca.log import get_logger

log = get_logger(__name__)

SPIKE_WINDOW = 20
"""Steps in the running mean that a loss spike is measured against."""
SPIKE_MIN_STEPS = 5
"""Finite losses seen before spikes are looked for: the first steps fall too fast to compare."""


class NonFiniteStep(ValueError):
    """A step whose loss or gradient is not finite ends the run; the message is one line that names
    the step, the numbers, the first non-finite gradient and the checkpoint kept."""


def first_nonfinite_grad(module: nn.Module) -> str | None:
    """The name of the first parameter whose gradient, as far as this rank holds it, is not finite.

    Local only (no communication): `param.grad` where it is set (no ZeRO), else this rank's part of
    DeepSpeed's partitioned gradient (ZeRO 1-2: `_hp_mapping`; ZeRO-3: its fp32 partition). Read it
    after the last backward of a step and before `engine.step()`, which drops the gradients.
    """
    for name, param in module.named_parameters():
        grad = _local_grad(param)
        if grad is not None and not bool(torch.isfinite(grad).all()):
            return name
    return None


def _local_grad(param: nn.Parameter) -> torch.Tensor | None:
    if param.grad is not None:
        return param.grad
    if getattr(param, "_hp_mapping", None) is not None:  # ZeRO 1-2, bf16: the piece this rank owns
        return param._hp_mapping.get_lp_grad_fragment(param._index_in_param_group)
    if hasattr(param, "ds_id"):  # ZeRO-3: a private DeepSpeed call; on any change, no name rather than a crash
        try:
            return param._z3_optimizer._get_fp32_grad_state_partition(param=param, release_swap_buffers=False)[0]
        except (AttributeError, KeyError, TypeError):
            return None
    return None


@dataclass(frozen=True)
class Verdict:
    """What the loop does after a step, the same on every rank (`NonFiniteGuard.after_step`)."""

    action: Literal["continue", "skip", "stop"]
    """continue: finite; skip: not finite, the update refused (train.on_nonfinite=skip, under
    train.max_skipped in a row), go on; stop: raise `error(...)`."""
    reason: str = ""
    """stop only: the step, its numbers and why, e.g. "step=3 loss=2.1 grad_norm=inf: not finite"."""
    bad_gradient: str | None = None
    """stop only: the first non-finite gradient a rank found before the update, "name (rank r)"; None
    if none did (the loop may compute the step again to look: module docstring)."""
    kept: str = ""
    """stop only: the checkpoint a --resume continues from, in words."""

    def error(self, bad_gradient: str | None) -> NonFiniteStep:
        """The one-line error a stop raises, naming `bad_gradient` (None: 'unknown')."""
        return NonFiniteStep(f"{self.reason}; first non-finite gradient: {bad_gradient or 'unknown'}; stopped "
                             f"without saving this step, {self.kept}")


class NonFiniteGuard:
    """One per run: call `before_update` between the last backward and `engine.step()` where the step
    can, and `after_step` after every step on every rank (it communicates); act on its Verdict."""

    def __init__(self, cfg: RunConfig, engine, group: dist.ProcessGroup, device: torch.device):
        t = cfg.train
        self.on_nonfinite, self.max_skipped = t.on_nonfinite, t.max_skipped
        self.checkpoint_dir = cfg.checkpoint_dir
        self.engine, self.group, self.device = engine, group, device
        self.skipped = engine.skipped_steps  # DeepSpeed checkpoints its own count, so a resume continues it
        self.in_a_row = 0
        self.spikes = SpikeWatch(t.spike_factor)
        self.first_bad: str | None = None  # this rank's finding before the update, reset every step
        guard_plain_optimizer(engine, group, device)

    def before_update(self, loss: float) -> None:
        """Look for the bad gradient while it is still there, when the (global) loss already says so."""
        if not math.isfinite(loss):
            self.look_for_bad_gradient()

    def look_for_bad_gradient(self) -> None:
        """Between the last backward and `engine.step()` (before DeepSpeed clips and drops them)."""
        self.first_bad = first_nonfinite_grad(self.engine.module)

    def after_step(self, step: int, loss: float, grad_norm: float | None, applied: bool) -> Verdict:
        """The verdict on this step, the same on every rank. Collective over `group`.

        `grad_norm` is DeepSpeed's global norm (None where DeepSpeed computes none); `applied` is
        `engine.was_step_applied()`. A skip has already stepped the lr schedule and warned; a stop
        carries every rank's finding of the first bad gradient (a second collective).
        """
        bad = not (math.isfinite(loss) and (grad_norm is None or math.isfinite(grad_norm)) and applied)
        flag = torch.tensor([float(bad)], device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group)
        if not flag.item():
            self.in_a_row, self.first_bad = 0, None
            self.spikes.see(step, loss)
            return Verdict("continue")
        self.in_a_row += 1
        self.skipped += 1
        numbers = f"step={step} loss={loss:.4g} grad_norm={'n/a' if grad_norm is None else f'{grad_norm:.4g}'}"
        if self.on_nonfinite == "skip" and self.in_a_row < self.max_skipped:
            # DeepSpeed (or guard_plain_optimizer) left the lr schedule where it was; step it so that
            # the learning rate stays the function of the step number the config describes.
            self.engine.lr_scheduler.step()
            log.warning(f"{numbers}: not finite; update skipped (skipped_steps={self.skipped}, "
                        f"{self.in_a_row} in a row of train.max_skipped={self.max_skipped})")
            self.first_bad = None
            return Verdict("skip")
        why = ("not finite" if self.on_nonfinite == "stop" else
               f"not finite for {self.in_a_row} steps in a row (train.max_skipped={self.max_skipped})")
        return Verdict("stop", reason=f"{numbers}: {why}", bad_gradient=self.gather_bad_gradient(),
                       kept=self._kept_checkpoint())

    def gather_bad_gradient(self) -> str | None:
        """Every rank's finding since the last ask (each holds part of the gradients): the lowest
        rank's, as "name (rank r)", or None if no rank found one. Collective over `group`."""
        found: list[str | None] = [None] * dist.get_world_size(self.group)
        dist.all_gather_object(found, self.first_bad, group=self.group)
        self.first_bad = None
        return next((f"{name} (rank {r})" for r, name in enumerate(found) if name is not None), None)

    def _kept_checkpoint(self) -> str:
        try:
            kept = resolve_checkpoint(self.checkpoint_dir, LATEST)
            return f"the last checkpoint is {kept} (--resume continues there)"
        except ValueError:
            return "no checkpoint was written before it"


class SpikeWatch:
    """Warns (one line) when a finite loss exceeds `factor` x the mean of the last SPIKE_WINDOW losses."""

    def __init__(self, factor: float | None):
        self.factor = factor
        self.losses: deque[float] = deque(maxlen=SPIKE_WINDOW)

    def see(self, step: int, loss: float) -> bool:
        """Record a finite step's loss; True (and a warning) if it is a spike."""
        is_spike = False
        if self.factor is not None and len(self.losses) >= SPIKE_MIN_STEPS:
            mean = sum(self.losses) / len(self.losses)
            is_spike = loss > self.factor * mean
            if is_spike:
                log.warning(f"step={step} loss spike: loss={loss:.4f} is {loss / mean:.1f}x the mean {mean:.4f} "
                            f"of the last {len(self.losses)} steps (train.spike_factor={self.factor})")
        self.losses.append(loss)
        return is_spike


def guard_plain_optimizer(engine, group: dist.ProcessGroup, device: torch.device) -> None:
    """fp32 without ZeRO: make torch's optimizer refuse a non-finite update as DeepSpeed's own do.

    A step pre-hook checks the gradients it is given (after DeepSpeed's clipping, which turns every
    gradient NaN when the norm is not finite), agrees with every rank (MAX all-reduce: the hook
    runs inside `engine.step()` at the same point on every rank), and on a bad step drops the
    gradients (torch's AdamW passes over parameters without one: no update, no moment change) and
    sets `optimizer.overflow`, which the engine reads as DeepSpeed's skip: lr schedule held,
    `skipped_steps` counted, `was_step_applied()` False.
    """
    optimizer = engine.optimizer
    if hasattr(optimizer, "overflow"):  # one of DeepSpeed's optimizers: it checks already
        return

    def refuse_nonfinite(opt: torch.optim.Optimizer, args: tuple, kwargs: dict) -> None:
        grads = [p.grad for group_ in opt.param_groups for p in group_["params"] if p.grad is not None]
        # one norm per gradient (a fused pass): inf or NaN in a gradient makes its norm so
        is_bad = bool(grads) and not bool(torch.isfinite(torch.stack(torch._foreach_norm(grads))).all())
        flag = torch.tensor([float(is_bad)], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
        opt.overflow = bool(flag.item())
        if opt.overflow:
            for group_ in opt.param_groups:
                for p in group_["params"]:
                    p.grad = None

    optimizer.overflow = False
    optimizer.register_step_pre_hook(refuse_nonfinite)
