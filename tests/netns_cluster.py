"""A cluster of hosts on one machine for the multi-node tests: each node is a Linux network namespace.

Layout (all made with iproute2 as root, in about a second, removed by `stop`):
- a "switch" namespace holding a bridge, with one veth port per node: the nodes reach each other
  through it and nothing else (the host's own namespace has no port on it, and no node has a
  default route, so no traffic leaves the cluster);
- node i: namespace `<tag>-n<i>`, interface `eth0` with address 10.233.0.<10+i>/24, `lo` up, and
  its own hostname `node<i>` in a UTS namespace made for each command;
- name resolution: `ip netns exec` bind-mounts /etc/netns/<namespace>/hosts over /etc/hosts, so
  every node resolves every `node<j>` to its address (and resolv.conf, so that no lookup waits for
  a DNS server out of reach). Like Debian's installer, a node's own name is
  listed first as 127.0.1.1: a program that binds to "the address of my hostname" (gloo does) ends
  up on loopback unless it chooses the interface that reaches its peers.

Faults: `cut(i)` / `mend(i)` take node i's port on the bridge down and up again (a partition);
`throttle(i, kbit)` limits what node i sends until `unthrottle(i)` (a slow link: tc's token bucket filter; netem's delay
is not used because sch_netem is missing from some kernels, this CI machine's included).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

SUBNET = "10.233.0"
THROTTLE_BURST = 16384  # bytes a throttled node may send at full speed before the rate applies
NETNS_ETC = Path("/etc/netns")


def unavailable_reason() -> str | None:
    """Why no namespace cluster can be made here (None: it can)."""
    if os.geteuid() != 0:
        return "network namespaces need root (ip netns add)"
    for tool in ("ip", "unshare", "nsenter", "tc"):
        if not shutil.which(tool):
            return f"{tool} is not installed (Debian: apt-get install iproute2 util-linux)"
    probe = f"ithaca-probe-{os.getpid()}"
    done = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if done.returncode != 0:
        return f"ip netns add failed: {done.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


@dataclass(frozen=True)
class Node:
    index: int
    namespace: str

    @property
    def hostname(self) -> str:
        return f"node{self.index}"

    @property
    def address(self) -> str:
        return f"{SUBNET}.{10 + self.index}"

    def command(self, *argv: str) -> list[str]:
        """`argv` run inside this node: its network namespace and hosts file, and its hostname."""
        return ["ip", "netns", "exec", self.namespace, "unshare", "--uts", "sh", "-c",
                'hostname "$0" && exec "$@"', self.hostname, *argv]

    def command_keeping_sys(self, *argv: str) -> list[str]:
        """`argv` run inside this node like `command`, but entering only its network namespace (and
        new UTS and mount namespaces for its hostname and name files): `ip netns exec` mounts a fresh
        /sys, which hides the host's /sys/fs/cgroup that slurmd needs. Processes it starts (a SLURM
        job's) stay in the node's namespaces."""
        etc = NETNS_ETC / self.namespace
        binds = " && ".join(f"mount --bind {etc / name} /etc/{name}" for name in ("hosts", "resolv.conf"))
        return ["nsenter", f"--net=/run/netns/{self.namespace}", "unshare", "--uts", "--mount", "sh", "-c",
                f'{binds} && hostname "$0" && exec "$@"', self.hostname, *argv]

    def interface_bytes(self) -> int:
        """Bytes received plus sent on eth0, the node's only way to the other nodes."""
        return self._counter("rx_bytes") + self._counter("tx_bytes")

    def sent_bytes(self) -> int:
        return self._counter("tx_bytes")

    def _counter(self, name: str) -> int:
        return int(subprocess.run(["ip", "netns", "exec", self.namespace, "cat", f"/sys/class/net/eth0/statistics/{name}"],
                                  capture_output=True, text=True, check=True).stdout)


class NetnsCluster:
    def __init__(self, nodes: int, tag: str | None = None):
        self.tag = tag or f"ith{os.getpid()}"
        self.switch = f"{self.tag}-sw"
        self.nodes = [Node(i, f"{self.tag}-n{i}") for i in range(1, nodes + 1)]

    def start(self) -> None:
        self._ip("netns", "add", self.switch)
        self._ip("-n", self.switch, "link", "add", "br0", "type", "bridge")
        self._ip("-n", self.switch, "link", "set", "br0", "up")
        for node in self.nodes:
            self._ip("netns", "add", node.namespace)
            self._ip("link", "add", "eth0", "netns", node.namespace, "type", "veth",
                     "peer", "name", self._port(node), "netns", self.switch)
            self._ip("-n", self.switch, "link", "set", self._port(node), "master", "br0")
            self._ip("-n", self.switch, "link", "set", self._port(node), "up")
            self._ip("-n", node.namespace, "addr", "add", f"{node.address}/24", "dev", "eth0")
            self._ip("-n", node.namespace, "link", "set", "eth0", "up")
            self._ip("-n", node.namespace, "link", "set", "lo", "up")
            etc = NETNS_ETC / node.namespace
            etc.mkdir(parents=True, exist_ok=True)
            (etc / "hosts").write_text(self._hosts(node))
            # No DNS server is reachable from a node: ask one on the node's loopback, which refuses at
            # once, instead of the host's, whose every lookup (torch's reverse lookups) would time out.
            (etc / "resolv.conf").write_text("nameserver 127.0.0.1\noptions timeout:1 attempts:1\n")

    def _hosts(self, node: Node) -> str:
        lines = ["127.0.0.1 localhost", f"127.0.1.1 {node.hostname}"]
        lines += [f"{other.address} {other.hostname}" for other in self.nodes if other != node]
        return "\n".join(lines) + "\n"

    def stop(self) -> None:
        """Remove every namespace (their interfaces go with them) and hosts file this cluster made."""
        for namespace in [node.namespace for node in self.nodes] + [self.switch]:
            subprocess.run(["ip", "netns", "del", namespace], capture_output=True)
            shutil.rmtree(NETNS_ETC / namespace, ignore_errors=True)

    def cut(self, node: Node) -> None:
        self._ip("-n", self.switch, "link", "set", self._port(node), "down")

    def mend(self, node: Node) -> None:
        self._ip("-n", self.switch, "link", "set", self._port(node), "up")

    def throttle(self, node: Node, kbit: int) -> None:
        """What `node` sends goes out at `kbit` kbit/s at most (after THROTTLE_BURST bytes); packets
        wait in a queue long enough that none is dropped."""
        self._check(["ip", "netns", "exec", node.namespace, "tc", "qdisc", "replace", "dev", "eth0", "root",
                     "tbf", "rate", f"{kbit}kbit", "burst", str(THROTTLE_BURST), "latency", "60s"])

    def unthrottle(self, node: Node) -> None:
        self._check(["ip", "netns", "exec", node.namespace, "tc", "qdisc", "del", "dev", "eth0", "root"])

    @staticmethod
    def _port(node: Node) -> str:
        return f"p{node.index}"

    def _ip(self, *args: str) -> None:
        self._check(["ip", *args])

    def _check(self, command: list[str]) -> None:
        done = subprocess.run(command, capture_output=True, text=True, timeout=30)
        if done.returncode != 0:
            self.stop()
            raise RuntimeError(f"{' '.join(command)} failed: {done.stderr.strip()}")


def started_cluster(nodes: int, **kwargs) -> Iterator[NetnsCluster]:
    """A module fixture's body: a started cluster of `nodes`, stopped afterwards; the tests skip,
    printing why, where no namespace can be made."""
    import pytest

    reason = unavailable_reason()
    if reason:
        print(f"no namespace cluster: {reason}")
        pytest.skip(reason)
    cluster = NetnsCluster(nodes, **kwargs)
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()
