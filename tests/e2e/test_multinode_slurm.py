"""`ithaca submit` on a SLURM cluster of two hosts: slurmctld in node1 and a slurmd in each node of
a namespace cluster (tests/netns_cluster.py, tests/slurm_cluster.py), each node at its own address.

A two-node job of four CPU ranks (dp2 x sp2, Ulysses inside a node, `--gpus-per-node 0`: two
processes a node) is preempted (USR1), requeued by its batch script, and resumes: the finished run
follows the one-process loss curve, each step once, its ranks talking over the nodes' eth0. An
elastic job (`--nodes 2 --min-nodes 1`) loses node 2 (every process on it SIGKILLed, slurmd
included: SLURM marks the node down) and finishes on node 1 alone, on a layout fitted to one rank,
still on the one-process curve.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import failure_text
from netns_cluster import Node, started_cluster as started_nodes
from slurm_cluster import SlurmCluster, namespace_hosts, started_cluster
from test_multinode import STEPS, assert_follows, one_process  # noqa: F401 (one_process: a fixture used here)
from test_train_cli import common_args, loss_history, mlflow_runs

FINISHED = {"COMPLETED", "FAILED", "CANCELLED", "NODE_FAIL", "TIMEOUT"}


@pytest.fixture(scope="module")
def nodes():
    yield from started_nodes(2)


@pytest.fixture(scope="module")
def cluster(nodes, tmp_path_factory):
    yield from started_cluster(tmp_path_factory.mktemp("slurm-netns"), namespace_hosts(nodes))


def submit(cluster: SlurmCluster, shards: Path, out: Path, *options: str, env: dict | None = None) -> tuple[str, Path]:
    """`ithaca submit` on node1 (the cluster's login node); returns the job id and its log."""
    done = subprocess.run(cluster.hosts[0].enter(sys.executable, "-m", "ithaca", "submit", "--nodes", "2",
                                                 "--gpus-per-node", "0", *common_args(shards, out),
                                                 "--set", f"train.steps={STEPS}", *options),
                          capture_output=True, text=True, timeout=120, env={**cluster.env, **(env or {})})
    assert done.returncode == 0, failure_text(done.stderr)
    job_id, log = re.fullmatch(r"submitted job (\d+); log: (\S+)\n", done.stdout).groups()
    return job_id, Path(log)


def wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.3)


def finished(cluster: SlurmCluster, job_id: str, log: Path) -> str:
    """The log of the job, once it completed (else the failure with the daemons' logs)."""
    state = cluster.wait_for_state(job_id, FINISHED, 400)
    text = log.read_text()
    assert state == "COMPLETED", f"{cluster.job_field(job_id, 'Reason')}\n{cluster.daemon_logs()}\n{failure_text(text)}"
    return text


def test_a_preempted_two_node_job_of_four_ranks_resumes_on_the_one_process_curve(
        cluster, nodes, one_process, debug_shards, tmp_path):
    before = nodes.nodes[1].interface_bytes()
    # node 2 sends at 8 Mbit/s until the requeue: each step's dp all-reduce (about a megabyte from
    # node 2) takes a second or more, so USR1 lands long before the last step on any machine
    nodes.throttle(nodes.nodes[1], 8000)
    job_id, log = submit(cluster, debug_shards, tmp_path, "--set", "parallel.dp=2", "--set", "parallel.sp=2",
                         "--set", "parallel.sp_method=ulysses", "--set", "data.workers=1")
    wait_for(lambda: log.is_file() and "step=1 " in log.read_text(), 300,
             f"job {job_id} never logged a step:\n{cluster.daemon_logs()}")
    assert cluster.run("scancel", "--signal=USR1", job_id).returncode == 0
    wait_for(lambda: cluster.job_field(job_id, "Restarts") == "1" and cluster.job_field(job_id, "JobState") == "PENDING"
             and cluster.run("sinfo", "-h", "-N", "-o", "%T").stdout.split() == ["idle", "idle"], 120,
             f"job {job_id} was not requeued:\n{failure_text(log.read_text())}")
    nodes.unthrottle(nodes.nodes[1])
    # a requeued job waits 2 minutes (BeginTime); sooner, but not within the second of the requeue
    # (tests/e2e/test_slurm.py says why)
    assert cluster.run("scontrol", "update", f"jobid={job_id}", "EligibleTime=now+3").returncode == 0
    text = finished(cluster, job_id, log)
    stopped = int(re.search(r"stopped by SIGUSR1 at step=(\d+) after its checkpoint", text).group(1))
    assert stopped < STEPS and "(restart 1)" in text and f"at step={stopped}" in text.split("(restart 1)")[1]
    assert "on 2 node(s): node[1-2]; rendezvous at node1:" in text
    client, (run,) = mlflow_runs(tmp_path)
    assert run.info.status == "FINISHED"
    assert_follows(loss_history(tmp_path), one_process)  # each step once, on the curve
    chosen = set(re.findall(r"network: gloo binds to (\S+) \((\S+)\)", text))
    assert chosen == {("eth0", n.address) for n in nodes.nodes}, failure_text(text)
    assert nodes.nodes[1].interface_bytes() - before > 100_000  # the dp gradient all-reduce crosses nodes


def processes_in(node: Node) -> list[int]:
    """Every process in `node`'s network namespace: its slurmd, the job's slurmstepd, torchrun, ranks."""
    namespace = os.stat(f"/run/netns/{node.namespace}").st_ino
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if os.stat(f"/proc/{pid}/ns/net").st_ino == namespace:
                found.append(int(pid))
        except OSError:
            pass  # ended meanwhile
    return found


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_text().replace("\0", " ")
    except OSError:
        return ""


def test_an_elastic_job_that_loses_a_node_finishes_on_the_one_left_on_the_same_curve(
        cluster, nodes, one_process, debug_shards, tmp_path):
    """dp2, one rank a node (torchrun ranks nodes by hostname: rank 1 is node2's) loses node 2 (every
    process on it, slurmd included) after the step-4 checkpoint; SLURM marks it down, and node 1
    restarts alone as dp1 x 2 accumulation x 2 data workers. Node 2 then comes back for the next test."""
    # rank 1 hangs at step 6 (ITHACA_TEST_FAULT, launcher/runtime/faults.py), so the kill lands mid-run
    job_id, log = submit(cluster, debug_shards, tmp_path, "--min-nodes", "1", "--max-restarts", "1",
                         "--set", "checkpoint.every=4", env={"ITHACA_TEST_FAULT": "hang:6:1"})
    wait_for(lambda: (tmp_path / "checkpoints" / "latest").is_file(), 300,
             f"job {job_id} made no checkpoint:\n{cluster.daemon_logs()}")
    lost = nodes.nodes[1]
    assert any(_cmdline(pid).startswith(f"slurmstepd: [{job_id}.0]") for pid in processes_in(lost))
    for pid in processes_in(lost):
        os.kill(pid, signal.SIGKILL)
    try:
        text = finished(cluster, job_id, log)
    finally:
        cluster.start_slurmd(cluster.hosts[1])
    assert f"srun: error: Node failure on {lost.hostname}" in text, failure_text(text)
    change = ("world 2 -> 1: dp 2 -> 1, accumulation 1 -> 2, data workers 1 -> 2; resharding "
              f"{tmp_path / 'checkpoints' / 'step_00000004'}")
    assert f"ithaca: {change}" in text, failure_text(text)
    client, (run,) = mlflow_runs(tmp_path)
    assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "loss")) == list(range(1, STEPS + 1))
    assert_follows(loss_history(tmp_path), one_process)
    assert not (tmp_path / "slurm" / f"node-status-{job_id}").exists()
    cluster.wait_until_idle(60)  # node 2 is back in service
