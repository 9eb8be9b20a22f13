"""Start an `ithaca` command again under torchrun on this machine, owning every process it starts
(launcher/runtime/supervisor.py): what `ithaca train`, `ithaca check` and `ithaca eval` do when
they are not under torchrun already."""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path

from ithaca.launcher.config.schema import RunConfig
from ithaca.launcher.runtime.extension_build_lock import clear_stale_build_lock
from ithaca.launcher.runtime.supervisor import run_owned


def start_torchrun(cfg: RunConfig, nproc: int, ithaca_argv: list[str], *, max_restarts: int = 0,
                   checkpoint_dir: Path | None = None) -> int:
    """Run `python -m ithaca *ithaca_argv` as `nproc` ranks; returns the exit code to exit with.
    `checkpoint_dir`: a training run's, so that a failure report names its last checkpoint."""
    training = [] if checkpoint_dir is None else ["--checkpoint-dir", str(checkpoint_dir)]
    cmd = [sys.executable, "-m", "ithaca.launcher.runtime.torchrun_main", *training,
           "--parent-pid", str(os.getpid()), "--", "--standalone", f"--nproc_per_node={nproc}",
           f"--max-restarts={max_restarts}", f"--shutdown-timeout={math.ceil(cfg.train.collective_timeout)}",
           "-m", "ithaca", *ithaca_argv]
    # PYTHONSAFEPATH: torchrun starts the ranks with `-m`, which would put the working directory first on
    # sys.path, and a checkout's kernels/, data/, models/ would shadow installed packages of those names.
    clear_stale_build_lock()
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "PYTHONSAFEPATH": "1"}
    return run_owned(cmd, env, grace=cfg.train.step_timeout)
