"""Two hosts for real: `torchrun --nnodes 2 --rdzv-backend c10d --rdzv-endpoint node1:PORT -m ithaca
train` started in each of two network namespaces (tests/netns_cluster.py) follows the one-process
loss curve, with the ranks of different nodes talking over the namespaces' veth link.

Each node resolves its own name to 127.0.1.1 (as Debian does), so a rank that bound gloo to the
address of its hostname would listen on loopback and the job would hang: these runs finish only
because the interface is chosen from the rendezvous host (launcher/runtime/network_interface.py).
Namespaces do not share a loopback, so every byte between nodes crosses eth0; the test reads
eth0's counters to show how many. An elastic run (`--nnodes 1:2`) loses node 2 (every process of
it SIGKILLed) and goes on on node 1 alone, on a layout fitted to one rank (launcher/runtime/elastic.py);
node 2 comes back and the run grows to both nodes again, still on the one-process curve. A third node serves the shards over HTTP (tests/shard_server.py)
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
from netns_cluster import NetnsCluster, Node, started_cluster
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


def wait_for(condition, what: str, limit: float = 300) -> None:
    deadline = time.monotonic() + limit
    while not condition():
        assert time.monotonic() < deadline, f"waited {limit} s for {what}"
        time.sleep(0.2)


def is_stopped(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(") ")[2].startswith("T")
    except FileNotFoundError:  # a rank of the failed attempt, gone since it was listed
        return False


def sigterm_pending(pid: int) -> bool:
    """Whether SIGTERM waits, undelivered, for the (stopped) process `pid`."""
    status = Path(f"/proc/{pid}/status").read_text()
    pending = [int(re.search(rf"{field}:\s*(\w+)", status).group(1), 16) for field in ("ShdPnd", "SigPnd")]
    return bool((pending[0] | pending[1]) >> (signal.SIGTERM - 1) & 1)


def ranks_of(agent: int) -> list[int]:
    """The processes torchrun's agent `agent` started (ip netns exec, unshare and sh exec into the
    agent: a node's Popen pid is its agent's)."""
    return [int(pid) for pid in Path(f"/proc/{agent}/task/{agent}/children").read_text().split()]


def test_an_elastic_run_goes_on_without_a_lost_node_and_grows_back_when_it_returns_on_the_same_curve(
        cluster, one_process, debug_shards, tmp_path):
    """dp2 (one rank a node, 2 streams) loses node 2 after the step-4 checkpoint; node 1 restarts
    alone as dp1 x 2 accumulation x 2 data workers (the one-process run's layout and batches) and
    trains steps 5 and 6. Node 2 comes back: node 1's agent sees it wait in the rendezvous and stops
    its rank (SIGTERM: it checkpoints step 7 and stops); the next round has both nodes, dp2 again,
    resharded from node 1's dp1 checkpoint."""
    out, port = tmp_path / "run", free_port()

    def start(node: Node, log: Path, fault: str | None = None) -> subprocess.Popen:
        env = {**os.environ, "OMP_NUM_THREADS": "1", **({"ITHACA_TEST_FAULT": fault} if fault else {})}
        # through our wrapper, which lets a node join a later rendezvous round (torchrun_main.py);
        # last_call_timeout: a round waits that long for one more node once one is there, so the
        # first round has both and the restart after the loss waits that long for the lost one
        command = node.command(sys.executable, "-m", "ithaca.launcher.runtime.torchrun_main", "--", "--nnodes=1:2",
                               "--nproc-per-node=1", "--max-restarts=1", "--rdzv-backend=c10d",
                               "--rdzv-conf=last_call_timeout=15", f"--rdzv-endpoint=node1:{port}", "--rdzv-id=elastic",
                               "-m", "ithaca", "train", *common_args(debug_shards, out), "--resume", "auto",
                               "--set", f"train.steps={STEPS}", "--set", "checkpoint.every=4")
        with log.open("w") as sink:
            return subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT, env=env)

    logs = [tmp_path / "node1.log", tmp_path / "node2.log", tmp_path / "node2-back.log"]
    # node 2's rank hangs at step 6 of the first attempt (ITHACA_TEST_FAULT, launcher/runtime/faults.py),
    # so the kill lands mid-run however fast the steps go; node 1's rank stops itself at step 7 of
    # the restarted one, so node 2 comes back while node 1 trains alone
    nodes = [start(cluster.nodes[0], logs[0], "stop:7:0:1"), start(cluster.nodes[1], logs[1], "hang:6:1")]
    try:
        wait_for(lambda: (out / "checkpoints" / "latest").is_file(), "the step-4 checkpoint")
        for pid in [*ranks_of(nodes[1].pid), nodes[1].pid]:
            os.kill(pid, signal.SIGKILL)
        nodes[1].wait()
        wait_for(lambda: any(map(is_stopped, ranks_of(nodes[0].pid))), "node 1's rank to stop at step 7")
        (alone,) = ranks_of(nodes[0].pid)
        nodes.append(start(cluster.nodes[1], logs[2]))
        wait_for(lambda: sigterm_pending(alone), "node 1's agent to stop its rank for the returning node")
        os.kill(alone, signal.SIGCONT)
        for node in (nodes[0], nodes[2]):
            node.wait(timeout=400)
    finally:
        for node in nodes:
            if node.poll() is None:
                node.kill()
                node.wait()
    outputs = [log.read_text() for log in logs]
    assert nodes[0].returncode == 0 and nodes[2].returncode == 0, "\n=====\n".join(failure_text(o) for o in outputs)
    shrink = ("world 2 -> 1: dp 2 -> 1, accumulation 1 -> 2, data workers 1 -> 2; resharding "
              f"{out / 'checkpoints' / 'step_00000004'}")
    assert f"ithaca: {shrink}" in outputs[0], failure_text(outputs[0])
    grow = f"resharding checkpoint {out / 'checkpoints' / 'step_00000007'} written under dp=1 tp=1 pp=1 sp=1"
    assert grow in outputs[0] and "to dp=2 tp=1" in outputs[0].split(grow)[1].splitlines()[0], failure_text(outputs[0])
    client, (run,) = mlflow_runs(out)
    assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "loss")) == list(range(1, STEPS + 1))
    assert_follows(loss_history(out), one_process)
