"""Elastic re-layout: the configured layout fitted to the world torchrun's elastic rendezvous gave
(`--nnodes MIN:MAX --max-restarts K`: after a node is lost the nodes that are left start again,
fewer; when it comes back, the next restart has the configured world again).

The rule: keep tp x pp x sp (a model-parallel group needs all its ranks, and its sequence split
is the run's), let dp = world / (tp x pp x sp), and keep the global batch by gradient accumulation
(micro_batch kept, so accumulation = global_batch / (micro_batch x dp)). The data is read as
dp x max(data.workers, 1) streams; the stream count is kept by scaling data.workers when it divides
evenly, so every step reads the batches of the configured run (data/loader.py). Otherwise the
workers stay as configured and the data is re-split exactly (data/resplit.py), but the order changes.
The model and optimizer state are resharded from the checkpoint (launcher/checkpoint/reshard.py).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from ithaca.launcher.config.schema import ConfigError, RunConfig


def fit_to_world(cfg: RunConfig, world: int, checkpoint: Path | None) -> tuple[RunConfig, str | None]:
    """`cfg` with dp, data.workers (and so the accumulation) derived for `world` ranks, and one
    line saying what changed (None when the configured layout is the world's).

    Raises ConfigError naming the last checkpoint and the layouts that would fit, when tp x pp x sp
    does not divide `world` or the global batch cannot be kept."""
    p, data = cfg.parallel, cfg.data
    if world == p.world_size:
        return cfg, None
    group = p.tp * p.pp * p.sp
    resume = f"the last complete checkpoint is {checkpoint}" if checkpoint else "no checkpoint was completed"
    if world % group:
        raise ConfigError("parallel", {"tp": p.tp, "pp": p.pp, "sp": p.sp},
                          f"tp x pp x sp = {group} ranks no longer fit the {world} left; {resume}; layouts that "
                          f"fit {world} ranks: {', '.join(_fitting(cfg, world))} (resume from it with --set)")
    dp = world // group
    if cfg.train.global_batch % (cfg.train.micro_batch * dp):
        raise ConfigError("train.global_batch", cfg.train.global_batch,
                          f"is not a multiple of micro_batch x dp = {cfg.train.micro_batch * dp} with the {world} "
                          f"ranks left (dp {p.dp} -> {dp}); {resume}")
    streams = p.dp * max(data.workers, 1)
    workers = streams // dp if streams % dp == 0 and streams // dp >= 1 else data.workers
    if workers == 1 and data.workers == 0:
        workers = 0  # one stream read in the training process, as configured
    fitted = dataclasses.replace(cfg, parallel=dataclasses.replace(p, dp=dp),
                                 data=dataclasses.replace(data, workers=workers))
    kept = "" if dp * max(workers, 1) == streams else (
        f" (the {streams} data streams cannot be kept: re-split, so the data order changes)")
    line = (f"world {p.world_size} -> {world}: dp {p.dp} -> {dp}, accumulation {cfg.grad_accum_steps} -> "
            f"{fitted.grad_accum_steps}, data workers {data.workers} -> {workers}{kept}; "
            f"{f'resharding {checkpoint}' if checkpoint else 'starting from step 0'}")
    return fitted, line


def layout_for_this_attempt(cfg: RunConfig, checkpoint: Path | None) -> tuple[RunConfig, str | None]:
    """The layout this torchrun attempt trains on, and the line saying what changed (None: the config's).

    A job torchrun may restart (--max-restarts 1 or more) fits `cfg` to the world it was given on every
    attempt: an elastic job (--nnodes MIN:MAX) can start on fewer nodes (SLURM gives it fewer), lose one
    (a restart) or take one back, and a node that comes back counts its attempts from 0 again. A job
    that cannot restart keeps the configured layout: a world other than the config's is the caller's
    mistake and the config check refuses it."""
    from ithaca.launcher.runtime.distributed import env_world_size, restart_attempt, restarts_allowed

    if not (restart_attempt() or restarts_allowed()):
        return cfg, None
    return fit_to_world(cfg, env_world_size(), checkpoint)


def _fitting(cfg: RunConfig, world: int) -> list[str]:
    """tp, pp, sp settings under the configured ones whose product divides `world`."""
    p = cfg.parallel
    options = [f"parallel.tp={tp} parallel.pp={pp} parallel.sp={sp}"
               for tp in _divisors(p.tp) for pp in _divisors(p.pp) for sp in _divisors(p.sp)
               if world % (tp * pp * sp) == 0]
    return options[::-1][:3] or ["none"]


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]
