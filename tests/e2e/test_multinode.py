"""Two hosts for real: `torchrun --nnodes 2 --rdzv-backend c10d --rdzv-endpoint node1:PORT -m ithaca
train` started in each of two network namespaces (tests/netns_cluster.py) follows the one-process
loss curve, with the ranks of different nodes talking over the namespaces' veth link.

Each node resolves its own name to 127.0.1.1 (as Debian does), so a rank that bound gloo to the
address of its hostname would listen on loopback and the job would hang: these runs finish only
because the interface is chosen from the rendezvous host (launcher/runtime/network_interface.py).
Namespaces do not share a loopback, so every byte between nodes crosses eth0; the test reads
eth0's counters to show how many. An elastic run (`--nnodes 1:2`) loses node 2 (every process of
it SIGKILLed) and finishes on node 1 alone, on a layout fitted to one rank (launcher/runtime/elastic.py),
still on the one-process curve. A third node serves the shards over HTTP (tests/shard_server.py)
to the 4-rank run, dropping the connection of each shard's first download half-way.
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

from conftest import failure_text, run_cli
from ithaca.bench.rendezvous import free_port
from ithaca.launcher.train.check import LOSS_RTOL, relative_difference
from netns_cluster import NetnsCluster, started_cluster
from test_train_cli import common_args, loss_history, mlflow_runs

STEPS = 8
STREAMS = 2  # dp x data.workers in every run here, so all read the same batches (data/loader.py)


@pytest.fixture(scope="module")
def cluster():
    yield from started_cluster(3)  # node3 serves shards


@pytest.fixture(scope="module")
def one_process(debug_shards, tmp_path_factory) -> dict[int, float]:
    out = tmp_path_factory.mktemp("one-process")
    done = run_cli("train", *common_args(debug_shards, out), "--nproc", "1", "--set", f"train.steps={STEPS}",
                   "--set", "parallel.dp=1", "--set", f"data.workers={STREAMS}")
    assert done.returncode == 0, failure_text(done.stderr)
    return loss_history(out)


def train_on_two_nodes(cluster: NetnsCluster, shards: Path | str, out: Path, nproc: int, *overrides: str) -> tuple[list[str], int]:
    """Run torchrun in nodes 1 and 2; returns each node's output and the bytes node 2's eth0 carried."""
    port = free_port()
    before = cluster.nodes[1].interface_bytes()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    nodes = [subprocess.Popen(node.command(sys.executable, "-m", "torch.distributed.run", "--nnodes=2",
                                           f"--nproc-per-node={nproc}", "--rdzv-backend=c10d",
                                           f"--rdzv-endpoint=node1:{port}", "--rdzv-id=multinode", "-m", "ithaca",
                                           "train", *common_args(shards, out),
                                           "--set", f"train.steps={STEPS}", *overrides),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
             for node in cluster.nodes[:2]]
    try:
        outputs = [node.communicate(timeout=400)[0] for node in nodes]
    finally:
        for node in nodes:
            if node.poll() is None:
                node.kill()
    assert all(node.returncode == 0 for node in nodes), "\n=====\n".join(failure_text(o) for o in outputs)
    return outputs, cluster.nodes[1].interface_bytes() - before


def assert_follows(curve: dict[int, float], reference: dict[int, float]) -> None:
    assert sorted(curve) == list(range(1, STEPS + 1))
    # fp32 on both sides, differing in reduction order only (launcher/train/check.py's tolerance)
    worst = max(relative_difference(curve[s], reference[s]) for s in reference)
    assert worst < LOSS_RTOL, (curve, reference)


def test_sp2_ring_across_two_nodes_follows_one_process_over_their_link(cluster, one_process, debug_shards, tmp_path):
    outputs, link_bytes = train_on_two_nodes(cluster, debug_shards, tmp_path, 1, "--set", "parallel.dp=1", "--set", "parallel.sp=2",
                                             "--set", "parallel.sp_method=ring", "--set", f"data.workers={STREAMS}")
    assert_follows(loss_history(tmp_path), one_process)
    for node, output in zip(cluster.nodes[:2], outputs):
        chosen = re.findall(r"network: gloo binds to (\S+) \((\S+)\)", output)
        assert chosen == [("eth0", node.address)], failure_text(output)
    # a ring step sends K/V both ways each layer: far more than the rendezvous' few kilobytes
    assert link_bytes > 1_000_000, link_bytes


@pytest.fixture
def shard_server(cluster, debug_shards):
    """tests/shard_server.py in node3, serving the debug shards; every shard's first answer is cut."""
    from ithaca.data import read_manifest

    port = free_port()
    drops = [arg for s in read_manifest(debug_shards).shards for arg in ("--drop", s.name)]
    server = subprocess.Popen(cluster.nodes[2].command(sys.executable, str(Path(__file__).parent.parent / "shard_server.py"),
                                                       str(debug_shards), str(port), *drops),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert server.stdout.readline().startswith("serving"), server.stdout.read()
    yield f"http://{cluster.nodes[2].hostname}:{port}"
    server.kill()
    server.wait()


def test_dp2_by_sp2_with_ulysses_inside_each_node_on_shards_over_http_follows_one_process(
        cluster, one_process, debug_shards, shard_server, tmp_path):
    outputs, link_bytes = train_on_two_nodes(cluster, shard_server, tmp_path, 2, "--set", "parallel.dp=2",
                                             "--set", "parallel.sp=2", "--set", "parallel.sp_method=ulysses",
                                             "--set", "data.workers=1", "--set", "train.network_interface=eth0")
    # the same batches as the local shards gave the one process, through the cut downloads
    assert_follows(loss_history(tmp_path), one_process)
    for output in outputs:  # the configured interface, logged once a node
        assert re.findall(r"network: (.*)", output) == ["gloo binds to eth0 (GLOO_SOCKET_IFNAME is set)"], output[-3000:]
    assert re.search(rf"data: reading {shard_server}/\S+ failed \(IncompleteRead", "".join(outputs)), outputs[0][-3000:]
    assert link_bytes > 100_000, link_bytes  # the dp gradient all-reduce crosses nodes


def test_an_elastic_run_that_loses_a_node_finishes_on_the_one_left_on_the_same_curve(
        cluster, one_process, debug_shards, tmp_path):
    """dp2 (one rank a node, 2 streams) loses node 2 after the step-4 checkpoint; node 1 restarts
    alone as dp1 x 2 accumulation x 2 data workers: the one-process run's layout and batches."""
    port = free_port()
    # node 2's rank hangs at step 6 (ITHACA_TEST_FAULT, launcher/runtime/faults.py), so the kill
    # below lands mid-run however fast the steps go
    envs = [{**os.environ, "OMP_NUM_THREADS": "1"},
            {**os.environ, "OMP_NUM_THREADS": "1", "ITHACA_TEST_FAULT": "hang:6:1"}]
    # last_call_timeout: the first round waits for both nodes; the restart waits that long for node 2
    nodes = [subprocess.Popen(node.command(sys.executable, "-m", "torch.distributed.run", "--nnodes=1:2",
                                           "--nproc-per-node=1", "--max-restarts=1", "--rdzv-backend=c10d",
                                           "--rdzv-conf=last_call_timeout=15", f"--rdzv-endpoint=node1:{port}",
                                           "--rdzv-id=elastic", "-m", "ithaca", "train", *common_args(debug_shards, tmp_path),
                                           "--set", f"train.steps={STEPS}", "--set", "checkpoint.every=4"),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
             for node, env in zip(cluster.nodes[:2], envs)]
    try:
        deadline = time.monotonic() + 300
        while not (tmp_path / "checkpoints" / "latest").is_file() and time.monotonic() < deadline:
            time.sleep(0.2)
        agent = nodes[1].pid  # ip netns exec, unshare and sh exec into torchrun's agent: same pid
        ranks = Path(f"/proc/{agent}/task/{agent}/children").read_text().split()
        for pid in [*map(int, ranks), agent]:
            os.kill(pid, signal.SIGKILL)
        output = nodes[0].communicate(timeout=400)[0]
    finally:
        for node in nodes:
            if node.poll() is None:
                node.kill()
                node.wait()
    assert nodes[0].returncode == 0, failure_text(output)
    change = ("world 2 -> 1: dp 2 -> 1, accumulation 1 -> 2, data workers 1 -> 2; resharding "
              f"{tmp_path / 'checkpoints' / 'step_00000004'}")
    assert f"ithaca: {change}" in output, failure_text(output)
    client, (run,) = mlflow_runs(tmp_path)
    assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "loss")) == list(range(1, STEPS + 1))
    assert_follows(loss_history(tmp_path), one_process)
