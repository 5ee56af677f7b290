"""net.up / down / reconcile for real: TAPs, nftables and traffic, all inside the test's own namespaces."""

from __future__ import annotations

import dataclasses
import json
from ipaddress import IPv4Interface
from pathlib import Path

import pytest

from ai_sandbox import net
from ai_sandbox.errors import SandboxError
from ai_sandbox.net import rules, tap
from ai_sandbox.net.netns import whoami, whoami_server
from ai_sandbox.runner import run

pytestmark = pytest.mark.integration

PORT = 8000
POOL = net.DEFAULT_POOL


def _plan(*names: str) -> list[net.NetConfig]:
    cfgs: list[net.NetConfig] = []
    for name in names:
        cfgs.append(net.plan(name, {c.subnet for c in cfgs}, POOL))
    return cfgs


def _ruleset() -> str:
    return run(["nft", "-j", "list", "ruleset"]).stdout


def test_up_creates_tap_rules_and_forwarding(sandbox_host):
    (a,) = _plan("alpha")
    net.up("alpha", a, (3128,))
    assert tap.list_taps() == [a.tap]
    assert [str(i) for i in tap.addresses_of(a.tap)] == [f"{a.host_ip}/30"]
    assert Path("/proc/sys/net/ipv4/ip_forward").read_text().strip() == "1"
    assert Path(f"/proc/sys/net/ipv6/conf/{a.tap}/disable_ipv6").read_text().strip() == "1"
    chains = {o["chain"]["name"] for o in net.rules_of("alpha") if "chain" in o}
    assert chains == set(rules.chains_of(net.pool.sandbox_id("alpha")))
    before = _shape()
    net.up("alpha", a, (3128,))  # again (a restart): the same objects, nothing duplicated
    assert _shape() == before


def _shape() -> list[str]:
    """The live table without handles, comparable between two moments."""
    items = rules.list_table()["nftables"]
    strip = [{k: {f: v for f, v in body.items() if f != "handle"} for k, body in item.items()} for item in items]
    return sorted(json.dumps(i, sort_keys=True) for i in strip if "metainfo" not in i)


def test_guest_reaches_the_internet_through_masquerade(sandbox_host, guests):
    (a,) = _plan("alpha")
    net.up("alpha", a)
    whoami_server(sandbox_host.internet, sandbox_host.internet_ip, PORT)
    guest = guests(a)
    assert whoami(guest, sandbox_host.internet_ip, PORT) == sandbox_host.uplink_ip


def test_without_nat_the_fake_internet_cannot_answer(sandbox_host, guests):
    # The topology itself must not make NAT look like it worked: drop our NAT chain and the reply is lost.
    (a,) = _plan("alpha")
    net.up("alpha", a)
    run(["nft", "flush", "chain", "inet", "ai_sandbox", f"nat_{net.pool.sandbox_id('alpha')}"])
    whoami_server(sandbox_host.internet, sandbox_host.internet_ip, PORT)
    assert whoami(guests(a), sandbox_host.internet_ip, PORT, timeout=1) is None


def test_sandboxes_cannot_reach_each_other(sandbox_host, guests):
    a, b = _plan("alpha", "beta")
    net.up("alpha", a, (PORT,))
    net.up("beta", b, (PORT,))
    ga, gb = guests(a), guests(b)
    whoami_server(gb, str(b.guest_ip), PORT)
    whoami_server(sandbox_host.host, "0.0.0.0", PORT)  # a service on the host, e.g. the proxy
    assert whoami(ga, str(a.host_ip), PORT) == str(a.guest_ip)  # its own gateway, on an allowed port
    assert whoami(gb, str(b.host_ip), PORT) == str(b.guest_ip)
    assert whoami(ga, str(b.guest_ip), PORT, timeout=1) is None  # the other guest
    assert whoami(ga, str(b.host_ip), PORT, timeout=1) is None  # the other sandbox's gateway
    assert whoami(ga, sandbox_host.uplink_ip, PORT, timeout=1) is None  # any other host address
    run(["nft", "delete", "table", "inet", "ai_sandbox"])  # the control: without our table all of it works
    assert whoami(ga, str(b.guest_ip), PORT) == str(a.guest_ip)
    assert whoami(ga, str(b.host_ip), PORT) == str(a.guest_ip)


def test_host_ports_not_listed_are_closed(sandbox_host, guests):
    (a,) = _plan("alpha")
    net.up("alpha", a, (PORT,))
    whoami_server(sandbox_host.host, "0.0.0.0", PORT + 1)
    assert whoami(guests(a), str(a.host_ip), PORT + 1, timeout=1) is None


def test_metadata_service_is_refused(sandbox_host, guests):
    (a,) = _plan("alpha")
    net.up("alpha", a)
    whoami_server(sandbox_host.internet, "0.0.0.0", PORT)
    guest = guests(a)
    assert whoami(guest, sandbox_host.internet_ip, PORT) == sandbox_host.uplink_ip
    assert whoami(guest, sandbox_host.metadata_ip, PORT, timeout=1) is None


def test_nothing_from_outside_enters_a_sandbox(sandbox_host, guests):
    (a,) = _plan("alpha")
    net.up("alpha", a)
    guest = guests(a)
    whoami_server(guest, "0.0.0.0", PORT)
    sandbox_host.internet.ip("route", "add", str(POOL), "via", sandbox_host.uplink_ip)
    assert whoami(sandbox_host.internet, str(a.guest_ip), PORT, timeout=1) is None
    assert whoami(sandbox_host.host, str(a.guest_ip), PORT) == str(a.host_ip)  # the host itself may (SSH)
    run(["nft", "delete", "table", "inet", "ai_sandbox"])  # the control
    assert whoami(sandbox_host.internet, str(a.guest_ip), PORT) == sandbox_host.router_ip


def test_a_tap_without_policy_gets_nothing(sandbox_host, guests):
    # A device named like ours but unknown to the table (half-made, or made by hand) is shut by the hook chains.
    (a,) = _plan("alpha")
    net.up("alpha", a)
    stray = dataclasses.replace(net.plan("stray", {a.subnet}, POOL), tap="aisb-0123456789")
    tap.create_tap(stray.tap, IPv4Interface(f"{stray.host_ip}/{stray.prefix}"))
    guest = guests(stray)
    whoami_server(sandbox_host.host, "0.0.0.0", PORT)
    assert whoami(guest, str(stray.host_ip), PORT, timeout=1) is None
    run(["nft", "delete", "table", "inet", "ai_sandbox"])  # the control
    assert whoami(guest, str(stray.host_ip), PORT) == str(stray.guest_ip)


def test_guest_ipv6_is_dropped(sandbox_host, guests):
    (a,) = _plan("alpha")
    net.up("alpha", a)
    guest = guests(a)
    guest.ip("-6", "addr", "add", "fd00::2/64", "dev", "eth0", "nodad")
    # up() turns IPv6 off on the TAP; turn it back on to prove the firewall drops it as well.
    Path(f"/proc/sys/net/ipv6/conf/{a.tap}/disable_ipv6").write_text("0\n")
    run(["ip", "-6", "addr", "add", "fd00::1/64", "dev", a.tap, "nodad"])
    whoami_server(sandbox_host.host, "::", PORT)
    assert whoami(guest, "fd00::1", PORT, timeout=1) is None
    run(["nft", "delete", "table", "inet", "ai_sandbox"])  # the control: without our table it gets through
    assert whoami(guest, "fd00::1", PORT) == "fd00::2"


def test_down_leaves_no_trace(sandbox_host, guests):
    a, b = _plan("alpha", "beta")
    net.up("alpha", a)
    net.up("beta", b)
    net.down("alpha")
    net.down("alpha")  # idempotent
    sid_a = net.pool.sandbox_id("alpha")
    assert tap.list_taps() == [b.tap]
    assert net.rules_of("alpha") == []
    assert sid_a not in _ruleset() and str(a.guest_ip) not in _ruleset()
    whoami_server(sandbox_host.internet, sandbox_host.internet_ip, PORT)
    assert whoami(guests(b), sandbox_host.internet_ip, PORT) == sandbox_host.uplink_ip  # beta unharmed
    net.down("beta")
    assert tap.list_taps() == []
    assert "ai_sandbox" not in _ruleset()


def test_reconcile_removes_what_a_crashed_sandbox_left(sandbox_host):
    a, b, c = _plan("alpha", "beta", "crashed")
    for name, cfg in zip(("alpha", "beta", "crashed"), (a, b, c), strict=True):
        net.up(name, cfg)
    tap.delete_tap(b.tap)  # half gone already: rules without a TAP
    assert net.reconcile({"alpha"}) == sorted([b.tap, c.tap])
    assert tap.list_taps() == [a.tap]
    assert net.rules_of("beta") == [] and net.rules_of("crashed") == []
    assert net.rules_of("alpha")
    assert net.reconcile({"alpha"}) == []
    assert net.reconcile(set()) == [a.tap]
    assert "ai_sandbox" not in _ruleset()


def test_reconcile_leaves_foreign_devices_alone(sandbox_host):
    run(["ip", "tuntap", "add", "dev", "aisb-mine", "mode", "tap"])
    assert net.reconcile(set()) == []
    assert tap.list_taps() == ["aisb-mine"]


def test_failed_up_leaves_nothing(sandbox_host, monkeypatch):
    (a,) = _plan("alpha")

    def broken(doc, what="apply"):
        raise SandboxError("nft said no")

    monkeypatch.setattr(rules, "apply", broken)
    with pytest.raises(SandboxError, match="nft said no"):
        net.up("alpha", a)
    monkeypatch.undo()
    assert tap.list_taps() == []
    assert net.rules_of("alpha") == []


def test_up_refuses_a_subnet_already_on_the_host(sandbox_host):
    (a,) = _plan("alpha")
    run(["ip", "addr", "add", "10.213.0.1/24", "dev", sandbox_host.uplink])
    with pytest.raises(SandboxError, match="overlaps uplink0"):
        net.up("alpha", a)
    assert tap.list_taps() == []


def test_uplink_is_the_default_route_interface(sandbox_host):
    assert tap.default_uplink() == sandbox_host.uplink


def test_rendered_rules_are_accepted_by_nft(sandbox_host):
    # nft -c checks the full document against the kernel without changing anything.
    (a,) = _plan("alpha")
    doc = rules.render_up("alpha", a, "uplink0", (22, 3128))
    path = sandbox_host.host.workdir / "doc.json"
    path.write_text(json.dumps(doc))
    run(["nft", "-c", "-j", "-f", str(path)])
    assert "ai_sandbox" not in _ruleset()


def test_works_from_async_code(sandbox_host):
    import asyncio

    (a,) = _plan("alpha")

    async def main() -> None:
        net.up("alpha", a)
        net.down("alpha")

    asyncio.run(main())
    assert tap.list_taps() == []


def test_tap_is_what_the_vmms_expect(sandbox_host):
    # One queue, virtio-net header, persistent, and openable by the user who runs the VMM.
    (a,) = _plan("alpha")
    net.up("alpha", a, owner_uid=4242)
    link = json.loads(run(["ip", "-d", "-j", "link", "show", "dev", a.tap]).stdout)[0]
    info = link["linkinfo"]["info_data"]
    want = {"type": "tap", "pi": False, "vnet_hdr": True, "multi_queue": False, "persist": True}
    assert {k: info[k] for k in want} == want
    assert int(info["user"]) == 4242
