"""Timing several candidates for one job fairly: a warm-up call each, then the candidates
interleaved over repeats, medians, and one outcome per candidate that never crashes the benchmark.

A candidate that cannot start (a peer not installed) carries `skip`; one that runs out of device
memory ends as "OOM"; any other exception ends as "failed: ..." (or the candidate's own
`on_error`); both are caught per candidate so the others still run. On CUDA each call is timed
between two torch.cuda.synchronize(), so queued kernels are inside the interval. Peak memory is
measured on one more call, after the timing (bench/peak_memory.py), so the allocator statistics
never touch the timed calls.
"""

from __future__ import annotations

import gc
import math
import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from ithaca.bench.peak_memory import peak_bytes


@dataclass
class Candidate:
    name: str
    run: Callable[[], Any] | None = None
    """One call of the job: the forward, or the forward and the backward (bench/kernel_jobs.py first
    holds the op's bare forward here, returning its outputs, and wraps it into such a call)."""
    skip: str | None = None
    """Why it does not run (printed as "skipped: <skip>"); run is then None."""
    on_error: str = "failed"
    """How its row starts when a call raises anything but an out-of-memory error."""


@dataclass
class Outcome:
    name: str
    times: list[float] = field(default_factory=list)
    """Seconds per timed call."""
    peak: int | None = None
    """Peak bytes of one call beyond its inputs, None when not measured."""
    status: str | None = None
    """None: timed; else the row's text ("skipped: ...", "OOM", "failed: ...")."""

    @property
    def median_s(self) -> float | None:
        return statistics.median(self.times) if self.status is None and self.times else None


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _release(device: str) -> None:
    """Give a failed call's memory back before the next candidate runs."""
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


def _call(candidate: Candidate, outcome: Outcome, device: str, calls: int = 1) -> float | None:
    """Seconds per call of `calls` back-to-back calls between two synchronizations, or None after
    recording in `outcome` why one failed."""
    try:
        _sync(device)
        start = time.perf_counter()
        for _ in range(calls):
            candidate.run()
        _sync(device)
        return (time.perf_counter() - start) / calls
    except torch.OutOfMemoryError:
        outcome.status = "OOM"
    except Exception as error:  # a peer's or a compiler's failure must not end the run
        message = " ".join(str(error).split())[:160]
        outcome.status = f"{candidate.on_error}: {type(error).__name__}: {message}"
    _release(device)
    return None


def time_candidates(candidates: list[Candidate], device: str, repeats: int, max_call_s: float,
                    min_sample_s: float) -> list[Outcome]:
    """Warm up each candidate (compilation and autotuning happen in its first call), then time
    `repeats` rounds, each taking one sample of every live candidate in turn; then measure each
    one's peak memory.

    A sample is as many back-to-back calls as fill `min_sample_s` (judged by a second warm-up
    call, at most 100), so the launch latency around a microsecond-scale kernel does not swamp
    it; `times` holds seconds per call. A candidate whose call takes longer than `max_call_s` is
    not sampled again: its median is over the samples taken so far (`len(times)` of `repeats`).
    """
    outcomes = [Outcome(c.name, status=None if c.skip is None else f"skipped: {c.skip}") for c in candidates]
    live = [(c, o) for c, o in zip(candidates, outcomes) if o.status is None]
    calls: dict[str, int] = {}
    for candidate, outcome in live:
        first = _call(candidate, outcome, device)
        if first is not None and first > max_call_s:  # slow enough to time alone: spare it a second call
            calls[candidate.name] = 1
        elif first is not None:
            seconds = _call(candidate, outcome, device)
            if seconds is not None:
                calls[candidate.name] = max(1, min(100, math.ceil(min_sample_s / max(seconds, 1e-9))))
    slow: set[str] = set()
    for _ in range(repeats):
        for candidate, outcome in live:
            if outcome.status is None and candidate.name not in slow:
                seconds = _call(candidate, outcome, device, calls[candidate.name])
                if seconds is not None:
                    outcome.times.append(seconds)
                    if seconds > max_call_s:
                        slow.add(candidate.name)
    for candidate, outcome in live:
        if outcome.status is None:
            try:
                outcome.peak = peak_bytes(candidate.run, device)
            except Exception as error:  # e.g. a compiled graph under the CPU's counting dispatch mode
                _release(device)
                print(f"# {candidate.name}: peak memory not measured ({type(error).__name__}: "
                      f"{' '.join(str(error).split())[:120]})", flush=True)
    return outcomes
