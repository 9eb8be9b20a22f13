"""Which network interface gloo (or NCCL) binds to: the one that reaches the other nodes.

Left alone, gloo binds to the address its host's name resolves to, and on Debian (and the test
cluster, tests/netns_cluster.py) a host's own name resolves to 127.0.1.1: ranks of one node then
listen on loopback, where the other nodes cannot reach them, and the first collective hangs.
The interface is therefore chosen from the rendezvous host (MASTER_ADDR): the local interface
that routes to it. On the rendezvous host itself that name resolves to loopback too, so there the
address the other nodes resolve it to is used, which each node publishes in the job's store.
GLOO_SOCKET_IFNAME / NCCL_SOCKET_IFNAME, when set, are used as they are; the config's
`train.network_interface` sets both (`use_configured_interface`, before any process group starts).
"""

from __future__ import annotations

import fcntl
import ipaddress
import os
import socket
import struct

import torch.distributed as dist

from ithaca.launcher.config.schema import ConfigError
from ithaca.log import get_logger

log = get_logger(__name__, all_ranks=True)

SIOCGIFADDR = 0x8915  # linux/sockios.h: read an interface's IPv4 address
PUBLISHED_KEY = "ithaca/rendezvous_host_address"


def interface_variable(backend: str) -> str:
    return "NCCL_SOCKET_IFNAME" if backend == "nccl" else "GLOO_SOCKET_IFNAME"


def route_source(host: str) -> str:
    """The local IPv4 address this host's routing table would send from to reach `host` (no packet
    is sent: connecting a UDP socket only picks the route)."""
    address = socket.getaddrinfo(host, None, family=socket.AF_INET)[0][4][0]
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.connect((address, 9))
        return probe.getsockname()[0]


def interface_of(address: str) -> str:
    """The name of the local interface holding the IPv4 `address`."""
    for _, name in socket.if_nameindex():
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            try:
                request = fcntl.ioctl(probe.fileno(), SIOCGIFADDR, struct.pack("256s", name.encode()[:15]))
            except OSError:  # no IPv4 address on this interface
                continue
        if socket.inet_ntoa(request[20:24]) == address:
            return name
    raise ValueError(f"no local interface holds {address}; set GLOO_SOCKET_IFNAME (or NCCL_SOCKET_IFNAME) to the "
                     "interface that reaches the other nodes")


def use_configured_interface(name: str) -> None:
    """Bind gloo and NCCL to the interface `name` (train.network_interface) by setting both variables,
    which the ranks this process starts inherit; nothing when `name` is empty.

    Raises ConfigError naming the interfaces this node has when `name` is not one of them."""
    if not name:
        return
    here = [interface for _, interface in socket.if_nameindex()]
    if name not in here:
        raise ConfigError("train.network_interface", name,
                          f"{socket.gethostname()} has no such interface (it has {', '.join(here)}); name one of "
                          "them, or leave it empty to use the one that routes to the rendezvous host")
    os.environ["GLOO_SOCKET_IFNAME"] = os.environ["NCCL_SOCKET_IFNAME"] = name


def choose_interface(backend: str, store: dist.Store | None) -> None:
    """Set the backend's interface variable (unless the user set it) to the interface that reaches the
    rendezvous host, and log the choice once per node.

    `store` is the job's store (None outside torchrun, where the job is taken to be one node). In a
    job of several nodes (GROUP_WORLD_SIZE > 1) each node publishes the address it resolves the
    rendezvous host to; a node that resolves it to loopback (the rendezvous host itself) routes to
    the address another node sees instead, if one sees it off loopback (else all nodes are this host).
    """
    variable = interface_variable(backend)
    if os.environ.get(variable):
        _log_choice(f"{backend} binds to {os.environ[variable]} ({variable} is set)")
        return
    host = os.environ["MASTER_ADDR"]
    seen_here = socket.getaddrinfo(host, None, family=socket.AF_INET)[0][4][0]
    target = seen_here
    nodes = int(os.environ.get("GROUP_WORLD_SIZE", "1"))
    if store is not None and nodes > 1:
        if os.environ.get("LOCAL_RANK", "0") == "0":
            store.set(f"{PUBLISHED_KEY}/{os.environ['GROUP_RANK']}", seen_here)
        seen = [store.get(f"{PUBLISHED_KEY}/{node}").decode() for node in range(nodes)]
        elsewhere = [address for address in seen if not ipaddress.ip_address(address).is_loopback]
        if ipaddress.ip_address(seen_here).is_loopback and elsewhere:
            target = elsewhere[0]  # this node is the rendezvous host: its address as the others reach it
    source = route_source(target)
    name = interface_of(source)
    os.environ[variable] = name
    _log_choice(f"{backend} binds to {name} ({source}), the interface that routes to the rendezvous host {host}; "
                f"set {variable} to choose another")


def _log_choice(line: str) -> None:
    if os.environ.get("LOCAL_RANK", "0") == "0":
        log.info("network: %s", line)
