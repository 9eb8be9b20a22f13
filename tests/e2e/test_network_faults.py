"""Network faults between two nodes of a real run (tests/netns_cluster.py): a slow link, then a cut one.

One dp2 run, a rank on each of two network namespaces, each node started as Ithaca starts torchrun
(launcher/runtime/torchrun_main.py). Once step 3 is logged, what node 2 sends is throttled (tc's
token bucket: a slow link; netem is not in this machine's kernel): the run trains on, and steps 5
to 8 take together at least the time node 2's bytes of those steps need at that rate (counted on
its eth0), several times the steps before. Once a checkpoint exists, node 2's bridge port goes down (a partition): node 1's
rank fails within train.collective_timeout and its node stops with the line naming the last
checkpoint; node 2, whose torchrun agent is left blocked on the rendezvous store it cannot reach,
is ended by the failed-rank guard, and no process of either node is left.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time

import pytest

from conftest import failure_text
from ithaca.bench.rendezvous import free_port
from ithaca.launcher.runtime.torchrun_main import AGENT_STUCK_SECONDS
from netns_cluster import THROTTLE_BURST, started_cluster
from test_train_cli import common_args

COLLECTIVE_TIMEOUT = 10
RATE_KBIT = 4000  # 1-2 s a step: node 2 sends 0.45-0.9 MB in each (measured; ZeRO gradient and parameter shards)
SLOW_FROM = 5  # the throttle is set once step 3 is logged: step 4 may have begun before it
CHECKPOINT_EVERY = 8
SLACK = 30  # start-up of an exception's exit, a loaded machine


@pytest.fixture(scope="module")
def cluster():
    yield from started_cluster(2, tag=f"nf{os.getpid()}")


class Output:
    """A node's merged output, collected as it comes."""

    def __init__(self, process: subprocess.Popen):
        self.lines: list[str] = []
        self._thread = threading.Thread(target=self._read, args=(process,), daemon=True)
        self._thread.start()

    def _read(self, process: subprocess.Popen) -> None:
        for line in process.stdout:
            self.lines.append(line)

    def text(self) -> str:
        self._thread.join(timeout=10)
        return "".join(self.lines)

    def step_seconds(self) -> dict[int, float]:
        return {int(m[1]): float(m[2]) for line in list(self.lines)
                if (m := re.search(r"\bstep=(\d+) .*\bs_step=([\d.]+)", line))}


def wait_for(condition, seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"no {what} in {seconds} s"
        time.sleep(0.2)


def namespace_pids(namespace: str) -> list[str]:
    return subprocess.run(["ip", "netns", "pids", namespace], capture_output=True, text=True).stdout.split()


def test_a_slow_link_trains_on_and_a_cut_one_stops_every_process_of_both_nodes(cluster, debug_shards, tmp_path):
    port, checkpoints = free_port(), tmp_path / "checkpoints"
    nodes = [subprocess.Popen(node.command(sys.executable, "-m", "ithaca.launcher.runtime.torchrun_main",
                                           "--checkpoint-dir", str(checkpoints), "--", "--nnodes=2",
                                           "--nproc-per-node=1", "--rdzv-backend=c10d",
                                           f"--rdzv-endpoint=node1:{port}", "--rdzv-id=faults", "-m", "ithaca",
                                           "train", *common_args(debug_shards, tmp_path), "--set", "train.steps=1000",
                                           "--set", f"checkpoint.every={CHECKPOINT_EVERY}",
                                           "--set", f"train.collective_timeout={COLLECTIVE_TIMEOUT}"),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for node in cluster.nodes]
    outputs = [Output(node) for node in nodes]
    try:
        def logged(step: int) -> bool:
            return step in outputs[0].step_seconds() or nodes[0].poll() is not None

        wait_for(lambda: logged(3), 240, "step 3")
        cluster.throttle(cluster.nodes[1], RATE_KBIT)
        wait_for(lambda: logged(SLOW_FROM - 1), 120, f"step {SLOW_FROM - 1}")
        sent = cluster.nodes[1].sent_bytes()
        wait_for(lambda: logged(CHECKPOINT_EVERY), 120, f"step {CHECKPOINT_EVERY}")
        sent = cluster.nodes[1].sent_bytes() - sent
        wait_for(lambda: (checkpoints / "latest").is_file() or nodes[0].poll() is not None, 120, "checkpoint")
        assert nodes[0].poll() is None, failure_text(outputs[0].text())
        cut = time.monotonic()
        cluster.cut(cluster.nodes[1])
        nodes[0].wait(timeout=COLLECTIVE_TIMEOUT + SLACK)
        node1_stopped = time.monotonic() - cut
        nodes[1].wait(timeout=COLLECTIVE_TIMEOUT + AGENT_STUCK_SECONDS + SLACK)
        node2_stopped = time.monotonic() - cut
    finally:
        for node in nodes:
            if node.poll() is None:
                node.kill()
                node.wait()
    texts = [output.text() for output in outputs]
    seconds = outputs[0].step_seconds()
    slow = [seconds[s] for s in range(SLOW_FROM, CHECKPOINT_EVERY + 1)]
    needed = (sent - THROTTLE_BURST) / (RATE_KBIT * 1000 / 8) - 1  # 1 s: step 9 may have begun when counted
    print(f"s_step before the throttle {[seconds[s] for s in (2, 3)]}, at {RATE_KBIT} kbit/s {slow} "
          f"(node 2 sent {sent} bytes: {needed:.1f} s at that rate); after the cut node 1 stopped in "
          f"{node1_stopped:.0f} s, node 2 in {node2_stopped:.0f} s")
    # the steps report the time the slow link took: the bytes cannot have gone faster than the rate
    assert sum(slow) >= needed > 2, (seconds, sent)
    last = checkpoints / (checkpoints / "latest").read_text().strip()
    assert nodes[0].returncode == 1, failure_text(texts[0])
    assert re.search(rf"ithaca: rank 0 \(pid \d+\) exited with code 1, and the job stopped; the last complete "
                     rf"checkpoint is {re.escape(str(last))};", texts[0]), failure_text(texts[0])
    assert "Timed out waiting" in texts[0], failure_text(texts[0])  # gloo's collective_timeout, not the watchdog
    assert nodes[1].returncode == 1, failure_text(texts[1])
    assert re.search(rf"ithaca: rank 1 \(pid \d+\) exited with code 1, and this node's processes are stopped "
                     rf"\(torchrun's agent on node2 waited {AGENT_STUCK_SECONDS:g} s on the rendezvous store, out of "
                     rf"reach, without acting on it\); the last complete checkpoint is {re.escape(str(last))};",
                     texts[1]), failure_text(texts[1])
    for node in cluster.nodes:
        assert namespace_pids(node.namespace) == [], f"processes left in {node.hostname}"
