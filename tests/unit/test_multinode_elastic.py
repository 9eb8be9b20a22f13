"""Elastic re-layout (launcher/runtime/elastic.py): the configured layout fitted to a smaller world."""

from __future__ import annotations

from pathlib import Path

import pytest

from ithaca.launcher.config.load import load_config
from ithaca.launcher.config.schema import ConfigError
from ithaca.launcher.runtime.elastic import fit_to_world, layout_for_this_attempt

CKPT = Path("runs/x/checkpoints/step_00000020")


def config(*overrides: str):
    return load_config("debug-cpu", ["train.global_batch=8", "train.micro_batch=2", *overrides])


def test_a_lost_node_shrinks_dp_and_keeps_the_global_batch_and_the_streams():
    cfg = config("parallel.dp=2", "parallel.sp=2")
    fitted, line = fit_to_world(cfg, 2, CKPT)
    assert (fitted.parallel.dp, fitted.parallel.sp, fitted.data.workers) == (1, 2, 2)
    assert fitted.train.global_batch == 8 and fitted.grad_accum_steps == 2 * cfg.grad_accum_steps
    assert line == f"world 4 -> 2: dp 2 -> 1, accumulation 2 -> 4, data workers 1 -> 2; resharding {CKPT}"
    assert fit_to_world(cfg, 4, CKPT) == (cfg, None)  # the node is back: the configured layout


def test_streams_that_cannot_be_kept_are_said_to_be_re_split():
    fitted, line = fit_to_world(config("parallel.dp=4", "train.micro_batch=1", "train.global_batch=12"), 3, None)
    assert (fitted.parallel.dp, fitted.data.workers) == (3, 1) and "re-split" in line and "step 0" in line


def test_a_model_parallel_group_that_no_longer_fits_stops_naming_the_checkpoint_and_what_fits():
    with pytest.raises(ConfigError, match=rf"4 ranks no longer fit the 2 left; the last complete checkpoint is "
                                          rf"{CKPT}; layouts that fit 2 ranks: parallel.tp=1 parallel.pp=1 parallel.sp=2"):
        fit_to_world(config("parallel.dp=1", "parallel.sp=4", "parallel.sp_method=ring"), 2, CKPT)


@pytest.mark.parametrize("restart, allowed, fitted", [("0", "0", False), ("0", "1", True), ("1", "1", True)])
def test_a_job_that_can_restart_is_fitted_on_every_attempt(monkeypatch, restart, allowed, fitted):
    """SLURM may start an elastic job on fewer nodes, and a node that comes back counts its attempts from 0:
    a job torchrun may restart is fitted from its first attempt on; one that cannot keeps the config's."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", restart)
    monkeypatch.setenv("TORCHELASTIC_MAX_RESTARTS", allowed)
    cfg = config("parallel.dp=2", "parallel.sp=2")
    layout, line = layout_for_this_attempt(cfg, CKPT)
    assert (layout.parallel.dp, line is not None) == ((1, True) if fitted else (2, False))
