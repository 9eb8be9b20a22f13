"""A training run that fails stops its loader's worker processes on the way out.

The workers ignore stop signals, so nothing else would stop them while the error is handled:
a caller that keeps the exception (its traceback holds the run's frame, and with it the loader)
would keep them running."""

from __future__ import annotations

import shutil

from harness import run_ranks


def _fail_on_a_corrupt_shard(data: str, out: str) -> tuple[str, int]:
    import multiprocessing

    from ithaca.data import ShardError
    from ithaca.launcher.config.load import load_config
    from ithaca.launcher.train.loop import run_training

    cfg = load_config("debug-cpu", [f"data.path={data}", f"train.output_dir={out}", "data.workers=1",
                                    "data.seq_len=64", "parallel.dp=1", "train.global_batch=2", "train.micro_batch=2",
                                    "train.steps=2"])
    try:
        run_training(cfg)
    except ShardError as err:
        return str(err), len(multiprocessing.active_children())
    raise AssertionError("training read a corrupt shard without an error")


def test_a_failed_run_leaves_no_worker_processes(debug_shards, tmp_path):
    shards = tmp_path / "shards"
    shutil.copytree(debug_shards, shards)
    for shard in shards.glob("*.tar"):
        shard.write_bytes(shard.read_bytes()[:100_000])  # every shard truncated: the first read fails
    ((error, workers_left),) = run_ranks(_fail_on_a_corrupt_shard, 1, str(shards), str(tmp_path / "run"))
    assert "corrupt or truncated" in error and workers_left == 0
