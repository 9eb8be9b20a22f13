"""Two hosts for real: `torchrun --nnodes 2 --rdzv-backend c10d --rdzv-endpoint node1:PORT -m ithaca
train` started in each of two network namespaces (tests/netns_cluster.py) follows the one-process
loss curve, with the ranks of different nodes talking over the namespaces' veth link.

Each node resolves its own name to 127.0.1.1 (as Debian does), so a rank that bound gloo to the
address of its hostname would listen on loopback and the job would hang: these runs finish only
because the interface is chosen from the rendezvous host (launcher/runtime/network_interface.py).
Namespaces do not share a loopback, so every byte between nodes crosses eth0; the test reads
eth0's counters to show how many. A third node serves the shards over HTTP (tests/shard_server.py)
to the 4-rank run, dropping the connection of each shard's first download half-way.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import failure_text, run_cli
from ithaca.bench.rendezvous import free_port
from ithaca.launcher.train.check import LOSS_RTOL, relative_difference
from netns_cluster import NetnsCluster, unavailable_reason
from test_train_cli import common_args, loss_history

STEPS = 8
STREAMS = 2  # dp x data.workers in every run here, so all read the same batches (data/loader.py)


@pytest.fixture(scope="module")
def cluster():
    reason = unavailable_reason()
    if reason:
        print(f"no namespace cluster: {reason}")
        pytest.skip(reason)
    cluster = NetnsCluster(3)  # node3 serves shards
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()


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
                                             "--set", "data.workers=1")
    # the same batches as the local shards gave the one process, through the cut downloads
    assert_follows(loss_history(tmp_path), one_process)
    assert re.search(rf"data: reading {shard_server}/\S+ failed \(IncompleteRead", "".join(outputs)), outputs[0][-3000:]
    assert link_bytes > 100_000, link_bytes  # the dp gradient all-reduce crosses nodes
