"""`ithaca submit` on a real one-node SLURM cluster (tests/slurm_cluster.py): a run finishes with
its MLflow run and checkpoints; a preempted run (USR1) checkpoints, requeues itself and resumes
on the uninterrupted loss curve; a rank killed in a job with --max-restarts restarts it on the same
curve; sbatch's own refusals reach the user and leave nothing behind.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from conftest import failure_text, run_cli
from slurm_cluster import SlurmCluster, started_cluster

STEPS = 300  # ~8 s of training: long enough to signal it mid-run


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


def test_a_preempted_job_requeues_and_resumes_on_the_uninterrupted_curve(cluster, finished_job, debug_shards, tmp_path):
    out = tmp_path / "run"
    job_id, log = submitted_job(submit(cluster, debug_shards, out, "--set", "train.log_every=1"))
    deadline = time.monotonic() + 240
    while not (log.is_file() and re.search(r"step=2\d ", log.read_text())):
        assert time.monotonic() < deadline, "the job never reached step 20"
        time.sleep(0.3)
    assert cluster.run("scancel", "--signal=USR1", job_id).returncode == 0
    deadline = time.monotonic() + 120
    while not (cluster.job_field(job_id, "Restarts") == "1" and cluster.job_field(job_id, "JobState") == "PENDING"
               and cluster.run("sinfo", "-h", "-o", "%T").stdout.strip() == "idle"):
        assert time.monotonic() < deadline, f"job {job_id} was not requeued:\n{failure_text(log.read_text())}"
        time.sleep(0.3)
    # SLURM holds a requeued job for 2 minutes (BeginTime); once the node has cleaned up after the
    # first run, make it eligible sooner, but not within the second of the requeue: slurmd revoked
    # the first run's credential then, and refuses ("Job credential revoked") one issued in that
    # same second, failing the job
    assert cluster.run("scontrol", "update", f"jobid={job_id}", "EligibleTime=now+3").returncode == 0
    state = cluster.wait_for_state(job_id, {"COMPLETED", "FAILED", "CANCELLED"}, 300)
    reason = cluster.job_field(job_id, "Reason")
    assert state == "COMPLETED", f"{reason}\n{cluster.daemon_logs()}\n{failure_text(log.read_text())}"
    text = log.read_text()
    stopped = int(re.search(r"stopped by SIGUSR1 at step=(\d+) after its checkpoint", text).group(1))
    assert "requeueing job" in text and "(restart 1)" in text and f"at step={stopped}" in text.split("(restart 1)")[1]
    run, losses = mlflow_run(out)
    _, uninterrupted = mlflow_run(finished_job[0])
    assert run.info.status == "FINISHED" and sorted(losses) == list(range(1, STEPS + 1))
    # same processes and data positions, state restored exactly: bit-identical curves
    assert losses == uninterrupted and stopped < STEPS
    assert not (out / "preempted.json").exists()


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
