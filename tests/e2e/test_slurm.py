"""`ithaca submit` on a real one-node SLURM cluster (tests/slurm_cluster.py): a run finishes with
its MLflow run and checkpoints; a rank killed in a job with --max-restarts restarts it on the
uninterrupted curve; sbatch's own refusals reach the user and leave nothing behind. Preemption
(USR1, requeue, resume) is tested on the two-node cluster: tests/e2e/test_multinode_slurm.py.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from conftest import failure_text, run_cli
from slurm_cluster import SlurmCluster, started_cluster

STEPS = 40  # past the killed rank's step 30 and the checkpoint at 20 it restarts from


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    yield from started_cluster(tmp_path_factory.mktemp("slurm"))


def submit(cluster: SlurmCluster, shards: Path, out: Path, *extra: str, env: dict | None = None):
    return run_cli("submit", "--config", "debug-cpu", "--nodes", "1", "--gpus-per-node", "0",
                   "--set", f"data.path={shards}", "--set", f"train.output_dir={out}", "--set", f"train.steps={STEPS}",
                   "--set", "data.seq_len=64", "--set", "train.global_batch=4", "--set", "checkpoint.every=1000",
                   *extra, env={**cluster.env, **(env or {})})


def submitted_job(done) -> tuple[str, Path]:
    assert done.returncode == 0, failure_text(done.stderr)
    job_id, log = re.fullmatch(r"submitted job (\d+); log: (\S+)\n", done.stdout).groups()
    return job_id, Path(log)


def mlflow_run(out: Path):
    client = MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow' / 'mlflow.db'}")
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    return run, {m.step: m.value for m in client.get_metric_history(run.info.run_id, "loss")}


@pytest.fixture(scope="module")
def finished_job(cluster, debug_shards, tmp_path_factory):
    out = tmp_path_factory.mktemp("slurm-run")
    job_id, log = submitted_job(submit(cluster, debug_shards, out))
    state = cluster.wait_for_state(job_id, {"COMPLETED", "FAILED", "CANCELLED"}, 300)
    assert state == "COMPLETED", f"{cluster.daemon_logs()}\n{failure_text(log.read_text())}"
    return out, log


def test_a_submitted_run_finishes_with_its_mlflow_run_and_checkpoint(finished_job):
    out, log = finished_job
    text = log.read_text()
    assert "on 1 node(s)" in text and "rendezvous at" in text and f"step={STEPS} " in text
    run, losses = mlflow_run(out)
    assert run.info.status == "FINISHED" and sorted(losses) == list(range(1, STEPS + 1))
    assert (out / "checkpoints" / "latest").read_text() == f"step_{STEPS:08d}"


def test_a_rank_killed_in_a_job_restarts_it_on_the_uninterrupted_curve(cluster, finished_job, debug_shards, tmp_path):
    # sbatch hands the submitting environment to the job: rank 1 is killed in step 30 (tests only)
    out = tmp_path / "run"
    job_id, log = submitted_job(submit(cluster, debug_shards, out, "--max-restarts", "1", "--set",
                                       "checkpoint.every=20", env={"ITHACA_TEST_FAULT": "kill:30:1"}))
    state = cluster.wait_for_state(job_id, {"COMPLETED", "FAILED", "CANCELLED"}, 300)
    text = log.read_text()
    assert state == "COMPLETED", f"{cluster.daemon_logs()}\n{failure_text(text)}"
    assert "restart 1: resuming from the latest complete checkpoint" in text
    assert re.search(r"resumed from \S+step_00000020 at step=20", text), failure_text(text)
    run, losses = mlflow_run(out)
    assert run.info.status == "FINISHED" and losses == mlflow_run(finished_job[0])[1]  # each step once


def test_sbatch_refusing_an_unknown_partition_is_reported_and_nothing_is_left(cluster, debug_shards, tmp_path):
    done = submit(cluster, debug_shards, tmp_path / "run", "--partition", "nope")
    assert done.returncode == 1 and "sbatch refused the job" in done.stderr and "partition" in done.stderr.lower()
    assert not (tmp_path / "run").exists()
