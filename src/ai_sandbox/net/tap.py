"""TAP devices and the few kernel settings around them, through netlink (pyroute2).

Everything acts in the network namespace of the calling thread, which is what lets the tests run it inside a
namespace of their own.
"""

from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import Callable
from ipaddress import IPv4Interface, IPv4Network
from pathlib import Path
from typing import TypeVar

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from ai_sandbox.errors import SandboxError
from ai_sandbox.net.pool import TAP_PREFIX

T = TypeVar("T")
_ENODEV = 19
_IP_FORWARD = Path("/proc/sys/net/ipv4/ip_forward")


def _netlink(fn: Callable[[IPRoute], T]) -> T:
    """Run fn with a fresh IPRoute socket.

    pyroute2's synchronous API drives its own event loop, which fails inside a running one (our async commands).
    A fresh thread avoids that and, being created by this thread, shares its network namespace.
    """

    def call() -> T:
        with IPRoute() as ipr:
            return fn(ipr)

    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return call()
    box: dict[str, object] = {}

    def worker() -> None:
        try:
            box["value"] = call()
        except BaseException as e:  # handed to the caller's thread below
            box["error"] = e

    thread = threading.Thread(target=worker, name="aisb-netlink")
    thread.start()
    thread.join()
    if "error" in box:
        raise box["error"]  # type: ignore[misc]
    return box["value"]  # type: ignore[return-value]


def _index(ipr: IPRoute, name: str) -> int | None:
    found = ipr.link_lookup(ifname=name)
    return found[0] if found else None


def create_tap(name: str, host_ip: IPv4Interface, owner_uid: int | None = None) -> None:
    """Create a persistent TAP with the host end's address, and bring it up.

    vnet_hdr on lets QEMU/Firecracker offload checksums and segmentation; multi_queue off because one vCPU
    queue per sandbox is plenty and both VMMs then open it the same way. A stale device of that name (a crashed
    run) is replaced: `up` is only called for a sandbox that is not running.
    """

    def make(ipr: IPRoute) -> None:
        stale = _index(ipr, name)
        if stale is not None:
            ipr.link("del", index=stale)
        kwargs: dict[str, object] = {"uid": owner_uid} if owner_uid is not None else {}
        ipr.link(
            "add",
            ifname=name,
            kind="tuntap",
            mode="tap",
            ifr={"no_pi": 1, "vnet_hdr": 1, "multi_queue": 0, "one_queue": 0},
            **kwargs,
        )
        index = _index(ipr, name)
        if index is None:
            raise SandboxError(f"TAP device {name} vanished right after it was created")
        _disable_ipv6(name)  # before "up", so no link-local address ever appears
        ipr.addr("add", index=index, address=str(host_ip.ip), prefixlen=host_ip.network.prefixlen)
        ipr.link("set", index=index, state="up")

    _netlink(make)


def _disable_ipv6(name: str) -> None:
    # No link-local address on the host end: the guest gets nothing over IPv6 from the host, not even RAs.
    knob = Path("/proc/sys/net/ipv6/conf") / name / "disable_ipv6"
    if knob.exists():  # absent when the host runs without IPv6
        knob.write_text("1\n")


def delete_tap(name: str) -> bool:
    """Remove the device if it exists; True when something was removed."""

    def remove(ipr: IPRoute) -> bool:
        index = _index(ipr, name)
        if index is None:
            return False
        try:
            ipr.link("del", index=index)
        except NetlinkError as e:
            if e.code != _ENODEV:  # gone in between: that is what we wanted
                raise
        return True

    return _netlink(remove)


def list_taps(prefix: str = TAP_PREFIX) -> list[str]:
    """Names of the devices whose name starts with `prefix` (ours, by the naming scheme)."""

    def names(ipr: IPRoute) -> list[str]:
        return sorted(n for link in ipr.get_links() if (n := link.get("IFLA_IFNAME") or "").startswith(prefix))

    return _netlink(names)


def find_uplink() -> str | None:
    """Interface of the IPv4 default route with the lowest metric (where sandbox traffic is masqueraded), or None
    on a host without one (offline)."""

    def find(ipr: IPRoute) -> str | None:
        routes = sorted(ipr.get_default_routes(family=socket.AF_INET), key=lambda r: r.get("RTA_PRIORITY") or 0)
        for route in routes:
            oif = route.get("RTA_OIF")
            if oif is None and route.get("RTA_MULTIPATH"):
                oif = route.get("RTA_MULTIPATH")[0]["oif"]
            if oif is not None:
                return ipr.get_links(oif)[0].get("IFLA_IFNAME")
        return None

    return _netlink(find) or None


def default_uplink() -> str:
    """`find_uplink`, where a missing default route is an error."""
    uplink = find_uplink()
    if not uplink:
        raise SandboxError("the host has no IPv4 default route", hint="connect the host to a network")
    return uplink


def address_conflicts(subnet: IPv4Network, ignore: str) -> list[str]:
    """Interfaces other than `ignore` holding an address that overlaps `subnet` ("dev addr/len")."""

    def scan(ipr: IPRoute) -> list[str]:
        names = {link["index"]: link.get("IFLA_IFNAME") for link in ipr.get_links()}
        hits = []
        for addr in ipr.get_addr(family=socket.AF_INET):
            iface = IPv4Interface(f"{addr.get('IFA_ADDRESS')}/{addr['prefixlen']}")
            dev = names.get(addr["index"], "?")
            if dev != ignore and iface.network.overlaps(subnet):
                hits.append(f"{dev} {iface}")
        return hits

    return _netlink(scan)


def addresses_of(name: str) -> list[IPv4Interface]:
    """IPv4 addresses of a device (empty if it does not exist)."""

    def scan(ipr: IPRoute) -> list[IPv4Interface]:
        index = _index(ipr, name)
        if index is None:
            return []
        return [
            IPv4Interface(f"{a.get('IFA_ADDRESS')}/{a['prefixlen']}")
            for a in ipr.get_addr(family=socket.AF_INET, index=index)
        ]

    return _netlink(scan)


def enable_ip_forward() -> None:
    """Let the kernel route between the TAPs and the uplink (the sysctl is per network namespace)."""
    if _IP_FORWARD.read_text().strip() != "1":
        _IP_FORWARD.write_text("1\n")
