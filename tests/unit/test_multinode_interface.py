"""The interface gloo binds to (launcher/runtime/network_interface.py); the two-node case, where it
matters, is tests/e2e/test_multinode.py."""

from __future__ import annotations

import os

import pytest

from ithaca.launcher.cli.main import main
from ithaca.launcher.runtime.network_interface import choose_interface, interface_of, route_source, use_configured_interface

GLOO_BEFORE = os.environ.get("GLOO_SOCKET_IFNAME")


def test_the_interface_is_the_one_routing_to_the_rendezvous_host(monkeypatch):
    monkeypatch.setenv("MASTER_ADDR", "localhost")
    # Set (empty: not chosen), not deleted: monkeypatch then removes the variable the choice writes below;
    # left in this process it reached the namespace nodes a later test started, whose gloo bound to lo.
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "")
    monkeypatch.delenv("GROUP_WORLD_SIZE", raising=False)
    assert route_source("localhost") == "127.0.0.1"
    choose_interface("gloo", None)
    assert os.environ["GLOO_SOCKET_IFNAME"] == "lo"


def test_the_users_interface_variable_wins(monkeypatch):
    monkeypatch.setenv("MASTER_ADDR", "localhost")
    monkeypatch.setenv("NCCL_SOCKET_IFNAME", "ib0")
    choose_interface("nccl", None)
    assert os.environ["NCCL_SOCKET_IFNAME"] == "ib0"


def test_the_chosen_interface_does_not_outlive_the_test_that_chose_it():
    assert os.environ.get("GLOO_SOCKET_IFNAME") == GLOO_BEFORE  # the first test's choice was undone


def test_an_address_no_interface_holds_is_refused_naming_the_variable():
    with pytest.raises(ValueError, match="GLOO_SOCKET_IFNAME"):
        interface_of("192.0.2.1")  # TEST-NET-1: on no interface here


def test_the_configured_interface_binds_gloo_and_nccl_over_the_users_variables(monkeypatch):
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "eth9")  # monkeypatch restores both after the test
    monkeypatch.setenv("NCCL_SOCKET_IFNAME", "")
    use_configured_interface("lo")
    assert (os.environ["GLOO_SOCKET_IFNAME"], os.environ["NCCL_SOCKET_IFNAME"]) == ("lo", "lo")
    use_configured_interface("")  # empty: chosen from the rendezvous host later, variables left as they are
    assert os.environ["GLOO_SOCKET_IFNAME"] == "lo"


def test_an_interface_the_node_lacks_exits_2_naming_it_and_the_nodes_interfaces(capsys, tmp_path, debug_shards):
    out = tmp_path / "run"
    code = main(["train", "--config", "debug-cpu", "--set", f"data.path={debug_shards}", "--set", f"train.output_dir={out}",
                 "--set", "train.network_interface=eth9"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1, err
    assert "train.network_interface='eth9': " in err and "has no such interface (it has lo" in err, err
    assert not out.exists() and os.environ.get("GLOO_SOCKET_IFNAME") == GLOO_BEFORE
