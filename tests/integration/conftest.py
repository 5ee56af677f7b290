"""Fixtures of the integration tier: a sandbox host in a network namespace of its own, behind a fake internet.

    fake_internet  FakeInternet; namespaces topo.host / topo.internet, nothing entered
    sandbox_host   the same, with the test's thread moved into topo.host for the whole test
                   (net.up, nft, pyroute2 and every child process act there, never on the real host)
    guests         guests(cfg) -> Netns wired to cfg.tap like a VM, removed after the test

The VM tier can build the same with `ai_sandbox.net.netns.fake_internet()`; see that module's docstring.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from ipaddress import IPv4Interface

import pytest

from ai_sandbox.net import NetConfig
from ai_sandbox.net.netns import FakeInternet, Netns, current_netns, fake_internet, guest_on_tap


def _require_root_tools() -> None:
    if os.geteuid() != 0:
        pytest.skip("integration tier needs root: it creates network namespaces, TAP devices and nftables rules")
    missing = [tool for tool in ("ip", "nft") if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"integration tier needs {' and '.join(missing)} on PATH")
    if not os.path.exists("/dev/net/tun"):
        pytest.skip("integration tier needs /dev/net/tun (the tun kernel module)")


@pytest.fixture
def fake_internet_ns() -> Iterator[FakeInternet]:
    _require_root_tools()
    with fake_internet() as topo:
        yield topo


@pytest.fixture
def sandbox_host(fake_internet_ns: FakeInternet) -> Iterator[FakeInternet]:
    outside = current_netns()
    with fake_internet_ns.host.entered():
        assert current_netns() == fake_internet_ns.host.inode != outside
        yield fake_internet_ns
    assert current_netns() == outside, "the test thread did not return to its own network namespace"


@pytest.fixture
def guests(sandbox_host: FakeInternet) -> Iterator[Callable[[NetConfig], Netns]]:
    with ExitStack() as stack:

        def attach(cfg: NetConfig) -> Netns:
            address = IPv4Interface(f"{cfg.guest_ip}/{cfg.prefix}")
            return stack.enter_context(guest_on_tap(sandbox_host.host, cfg.tap, address, str(cfg.host_ip), cfg.mac))

        yield attach
