"""Egress modes for real: a table of connection attempts from a guest, per mode, through the host's nftables.

Everything happens in the test's own namespaces (see conftest.py). The fake internet gets, besides 203.0.113.10
and the metadata address, hosts in every private range (routed via the uplink like anything else) and an IPv6
path; the sandbox host serves on the ports a guest might try on its gateway. A control test removes our table
and proves that every target of the table is reachable without it, so each refusal below is the firewall's doing.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from ai_sandbox import net
from ai_sandbox.net import policy, rules
from ai_sandbox.net.netns import FakeInternet, Netns, wait_for
from ai_sandbox.runner import run

pytestmark = pytest.mark.integration

POOL = net.DEFAULT_POOL
PRIVATE = {"10/8": "10.99.0.10", "172.16/12": "172.16.5.10", "192.168/16": "192.168.77.10", "100.64/10": "100.64.1.10"}
METADATA = {"azure": "168.63.129.16", "alibaba": "100.100.100.200"}  # besides 169.254.169.254
ALLOWED_HOST = "10.99.0.20"  # EGRESS_ALLOW_IP in every test below, with EGRESS_ALLOW_TCP_PORTS=5432
INET6, GATEWAY6, GUEST6 = "fd00:1::10", "fd00::1", "fd00::2"
INTERNET_SERVICES = ("tcp:22", "tcp:53", "tcp:80", "tcp:443", "tcp:5432", "tcp:6000", "udp:53")
HOST_SERVICES = ("tcp:22", "tcp:53", "tcp:3128", "tcp:4713", "tcp:8080", "tcp:11434", "udp:53")

# label, protocol, destination (a name resolved per test, or an address), port;  then: open, proxy, offline, nat
TABLE = [
    ("internet tcp/80", "tcp", "INET", 80, 1, 0, 0, 1),
    ("internet tcp/443", "tcp", "INET", 443, 1, 0, 0, 1),
    ("internet tcp/22", "tcp", "INET", 22, 0, 0, 0, 1),
    ("internet tcp/5432 (allowed port, other ip)", "tcp", "INET", 5432, 0, 0, 0, 1),
    ("internet dns udp/53", "udp", "INET", 53, 1, 0, 0, 1),
    ("internet dns tcp/53", "tcp", "INET", 53, 1, 0, 0, 1),
    *[(f"private {r} tcp/80", "tcp", ip, 80, 0, 0, 0, int(r != "100.64/10")) for r, ip in PRIVATE.items()],
    ("private 10/8 dns udp/53", "udp", PRIVATE["10/8"], 53, 0, 0, 0, 1),
    ("metadata 169.254.169.254 tcp/80", "tcp", "METADATA", 80, 0, 0, 0, 0),
    *[(f"metadata {ip} ({cloud}) tcp/80", "tcp", ip, 80, 0, 0, 0, 0) for cloud, ip in METADATA.items()],
    ("allowed host tcp/5432", "tcp", ALLOWED_HOST, 5432, 1, 1, 0, 1),
    ("allowed host tcp/6000 (port not allowed)", "tcp", ALLOWED_HOST, 6000, 0, 0, 0, 1),
    ("allowed host tcp/80", "tcp", ALLOWED_HOST, 80, 0, 0, 0, 1),  # web port, but a private address
    ("gateway tcp/22", "tcp", "GW", 22, 0, 0, 0, 0),
    ("gateway tcp/8080", "tcp", "GW", 8080, 0, 0, 0, 0),
    ("gateway tcp/11434 (ollama)", "tcp", "GW", 11434, 1, 1, 0, 1),
    ("gateway tcp/4713 (pulseaudio)", "tcp", "GW", 4713, 1, 1, 0, 0),
    ("gateway tcp/3128 (proxy)", "tcp", "GW", 3128, 0, 1, 0, 0),
    ("gateway dns udp/53", "udp", "GW", 53, 1, 0, 0, 1),  # the host agent's DNS (open, nat)
    ("gateway dns tcp/53", "tcp", "GW", 53, 1, 0, 0, 1),
    ("gateway icmp echo", "icmp", "GW", 0, 1, 1, 0, 1),
    ("other sandbox's guest tcp/80", "tcp", "OTHER_GUEST", 80, 0, 0, 0, 0),
    ("other sandbox's gateway tcp/11434", "tcp", "OTHER_GW", 11434, 0, 0, 0, 0),
    ("host's uplink address tcp/11434", "tcp", "UPLINK", 11434, 0, 0, 0, 0),
    ("ipv6 gateway tcp/11434", "tcp", GATEWAY6, 11434, 0, 0, 0, 0),
    ("ipv6 internet tcp/443", "tcp", INET6, 443, 0, 0, 0, 0),
]
COLUMN = {"open": 4, "proxy": 5, "offline": 6, "nat": 7}


# One process serves every port of a namespace and answers with the client's address (TCP and UDP, v4 and v6).
_SERVE = r"""
import selectors, socket, sys
sel = selectors.DefaultSelector()
for spec in sys.argv[1:]:
    proto, port = spec.split(":")
    s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM if proto == "tcp" else socket.SOCK_DGRAM)
    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("::", int(port)))
    if proto == "tcp":
        s.listen(16)
    else:
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_RECVPKTINFO, 1)
    sel.register(s, selectors.EVENT_READ, proto)
print("listening", flush=True)
def name(peer):
    return peer[0].removeprefix("::ffff:").encode() + b"\n"
while True:
    for key, _ in sel.select():
        s = key.fileobj
        if key.data == "tcp":
            conn, peer = s.accept()
            with conn:
                conn.sendall(name(peer))
        else:  # answer from the address asked (several live on lo), or masquerade cannot match the reply
            data, anc, _, peer = s.recvmsg(512, socket.CMSG_SPACE(20))
            to = [(socket.IPPROTO_IPV6, socket.IPV6_PKTINFO, d[:16] + bytes(4)) for _, t, d in anc
                  if t == socket.IPV6_PKTINFO]
            s.sendmsg([name(peer)], to, 0, peer)
"""

# All attempts at once, each with its own timeout: [[proto, ip, port, source or ""], ...] -> [answer or null, ...].
_PROBE = r"""
import json, socket, sys, time
from concurrent.futures import ThreadPoolExecutor
attempts, timeout = json.loads(sys.argv[1]), float(sys.argv[2])
def ping(ip, timeout):  # raw ICMP echo (we are root in the namespace); the answer is the replying address
    with socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP) as s:
        ident = int(time.time() * 1000) & 0xFFFF
        body = bytes([8, 0, 0, 0]) + ident.to_bytes(2, "big") + b"\x00\x01" + b"aisb"
        total = sum(int.from_bytes(body[i:i + 2], "big") for i in range(0, len(body), 2))
        total = (total >> 16) + (total & 0xFFFF)
        csum = ~(total + (total >> 16)) & 0xFFFF
        s.sendto(body[:2] + csum.to_bytes(2, "big") + body[4:], (ip, 0))
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            s.settimeout(max(0.01, end - time.monotonic()))
            data, peer = s.recvfrom(256)
            icmp = data[(data[0] & 0x0F) * 4:]
            if peer[0] == ip and icmp[0] == 0 and icmp[4:6] == ident.to_bytes(2, "big"):
                return peer[0]
def one(a):
    proto, ip, port, src = a
    family = socket.AF_INET6 if ":" in ip else socket.AF_INET
    try:
        if proto == "icmp":
            return ping(ip, timeout)
        if proto == "tcp":
            with socket.create_connection((ip, port), timeout, (src, 0) if src else None) as c:
                return c.recv(64).decode().strip() or None
        with socket.socket(family, socket.SOCK_DGRAM) as u:
            if src:
                u.bind((src, 0))
            u.settimeout(timeout / 4)
            for _ in range(4):  # UDP: a lost first datagram must not look like a refusal
                u.sendto(b"ping", (ip, port))
                try:
                    return u.recv(64).decode().strip() or None
                except socket.timeout:
                    pass
    except OSError:
        return None
with ThreadPoolExecutor(len(attempts) or 1) as pool:
    print(json.dumps(list(pool.map(one, attempts))))
"""


def serve(ns: Netns, services: tuple[str, ...]) -> None:
    proc = ns.python(_SERVE, *services, log_name="serve.log")
    log = ns.workdir / "serve.log"
    wait_for(lambda: proc.poll() is not None or "listening" in log.read_text().splitlines(), f"servers in {ns.name}")
    if proc.poll() is not None:
        raise RuntimeError(f"servers in {ns.name} exited: {log.read_text()[-500:]}")


def probe(ns: Netns, attempts: list[tuple[str, str, int, str]], timeout: float = 3.0) -> list[str | None]:
    # 3 s: room for one TCP SYN retransmission (after 1 s) while a fresh link still resolves its neighbours.
    result = ns.run([sys.executable, "-c", _PROBE, json.dumps(attempts), str(timeout)], timeout=30)
    return json.loads(result.stdout)


@dataclass
class World:
    topo: FakeInternet
    a: net.NetConfig
    b: net.NetConfig
    guest: Netns  # alpha's guest, the one that tries everything
    other: Netns  # beta's guest, on beta's TAP
    names: dict[str, str]

    def attempt(self, labels: list[str] | None = None, source: str = "") -> dict[str, str | None]:
        rows = [r for r in TABLE if labels is None or r[0] in labels]
        assert labels is None or len(rows) == len(labels), f"unknown labels in {labels}"
        answers = probe(self.guest, [(proto, self.names.get(d, d), port, source) for _, proto, d, port, *_ in rows])
        return {row[0]: answer for row, answer in zip(rows, answers, strict=True)}


def build(topo: FakeInternet, guests, p: policy.EgressPolicy) -> World:
    """Two sandboxes under policy `p`, a guest on each, servers everywhere, an IPv6 path from alpha's guest."""
    host, inet = topo.host, topo.internet
    for ip in (*PRIVATE.values(), *METADATA.values(), ALLOWED_HOST):
        inet.ip("addr", "add", f"{ip}/32", "dev", "lo")
    # IPv6 both ways without NAT: the firewall is the only thing that could stop it.
    inet.ip("-6", "addr", "add", f"{INET6}/128", "dev", "lo")
    inet.ip("-6", "addr", "add", "fd00:99::1/64", "dev", "wan0", "nodad")
    inet.ip("-6", "route", "add", "fd00::/64", "via", "fd00:99::2")
    host.ip("-6", "addr", "add", "fd00:99::2/64", "dev", topo.uplink, "nodad")
    host.ip("-6", "route", "add", "fd00:1::/64", "via", "fd00:99::1")
    host.run(["sysctl", "-qw", "net.ipv6.conf.all.forwarding=1"])

    a = net.plan("alpha", set(), POOL)
    b = net.plan("beta", {a.subnet}, POOL)
    for name, cfg in (("alpha", a), ("beta", b)):
        net.up(name, cfg, policy.host_ports(p), uplink=topo.uplink, egress=policy.egress_rules(p),
               gateway_icmp=policy.gateway_icmp(p))
    guest, other = guests(a), guests(b)
    # up() turns IPv6 off on the TAP; turn it back on, so only the firewall stands between the guest and IPv6.
    Path(f"/proc/sys/net/ipv6/conf/{a.tap}/disable_ipv6").write_text("0\n")
    host.ip("-6", "addr", "add", f"{GATEWAY6}/64", "dev", a.tap, "nodad")
    guest.ip("-6", "addr", "add", f"{GUEST6}/64", "dev", "eth0", "nodad")
    guest.ip("-6", "route", "add", "default", "via", GATEWAY6)

    serve(inet, INTERNET_SERVICES)
    serve(host, HOST_SERVICES)
    serve(other, ("tcp:80",))
    names = {
        "INET": topo.internet_ip,
        "METADATA": topo.metadata_ip,
        "GW": str(a.host_ip),
        "OTHER_GUEST": str(b.guest_ip),
        "OTHER_GW": str(b.host_ip),
        "UPLINK": topo.uplink_ip,
    }
    return World(topo, a, b, guest, other, names)


def _policy(mode: str, allow_ip: str = ALLOWED_HOST, ports: str = "5432") -> policy.EgressPolicy:
    return policy.parse(mode, allow_ip, ports)


def _without_our_firewall(topo: FakeInternet) -> None:
    """The control: our table gone, a plain masquerade in its place (the internet has no route to the pool)."""
    run(["nft", "delete", "table", "inet", "ai_sandbox"])
    script = topo.host.workdir / "control.nft"
    script.write_text(
        "table ip aisbt_control {\n"
        "  chain post { type nat hook postrouting priority 100; oifname "
        f'"{topo.uplink}" masquerade; }}\n'
        "}\n"
    )
    run(["nft", "-f", str(script)])


def test_the_table_is_large_enough():
    assert len(TABLE) * len(COLUMN) >= 25 and set(COLUMN) == set(policy.MODES)


def test_every_target_is_reachable_without_our_firewall(sandbox_host, guests):
    world = build(sandbox_host, guests, _policy("offline"))
    _without_our_firewall(sandbox_host)
    seen = world.attempt()
    assert {k: v for k, v in seen.items() if v is None} == {}
    assert seen["internet tcp/443"] == sandbox_host.uplink_ip  # masqueraded, as our own rules would
    assert seen["ipv6 internet tcp/443"] == GUEST6  # routed, not translated


@pytest.mark.parametrize("mode", policy.MODES)
def test_what_a_guest_can_reach(sandbox_host, guests, mode):
    world = build(sandbox_host, guests, _policy(mode))
    seen = world.attempt()
    want = {row[0]: bool(row[COLUMN[mode]]) for row in TABLE}
    assert {label: answer is not None for label, answer in seen.items()} == want
    forwarded = [v for k, v in seen.items() if v and not k.startswith(("gateway", "other", "host", "ipv6"))]
    assert set(forwarded) <= {sandbox_host.uplink_ip}  # whatever gets out, gets out masqueraded
    gateway = [v for k, v in seen.items() if v and k.startswith("gateway") and "icmp" not in k]
    assert set(gateway) <= {str(world.a.guest_ip)}  # our servers answer with the client's address
    assert seen["gateway icmp echo"] in (None, str(world.a.host_ip))  # a ping, with the replier's

    net.down("alpha")
    net.down("beta")
    assert net.rules_of("alpha") == [] and net.rules_of("beta") == []
    assert "ai_sandbox" not in run(["nft", "list", "tables"]).stdout


def test_the_host_can_still_reach_an_offline_guest(sandbox_host, guests):
    # offline: nothing leaves the guest on its own, but the host's SSH into it (output + replies) keeps working.
    world = build(sandbox_host, guests, _policy("offline"))
    serve(world.guest, ("tcp:22",))
    sandbox_host.internet.ip("route", "add", str(POOL), "via", sandbox_host.uplink_ip)  # so only a rule could stop it
    assert probe(sandbox_host.host, [("tcp", str(world.a.guest_ip), 22, "")]) == [str(world.a.host_ip)]
    assert probe(sandbox_host.internet, [("tcp", str(world.a.guest_ip), 22, "")], timeout=1) == [None]


def test_a_wide_allowance_still_cannot_reach_other_sandboxes(sandbox_host, guests):
    world = build(sandbox_host, guests, _policy("open", "10.0.0.0/8", "80"))
    seen = world.attempt(["private 10/8 tcp/80", "allowed host tcp/80", "other sandbox's guest tcp/80"])
    assert seen == {
        "private 10/8 tcp/80": sandbox_host.uplink_ip,  # the allowance is evaluated before the private drops
        "allowed host tcp/80": sandbox_host.uplink_ip,
        "other sandbox's guest tcp/80": None,  # the pool guard comes before any allowance
    }


SPOOF_TARGETS = ["internet tcp/443", "gateway tcp/11434 (ollama)"]


def test_a_forged_source_address_gets_nowhere(sandbox_host, guests):
    world = build(sandbox_host, guests, _policy("open"))
    forged = "192.0.2.99"
    world.guest.ip("addr", "add", f"{forged}/32", "dev", "eth0")
    sandbox_host.host.ip("route", "add", f"{forged}/32", "dev", world.a.tap)  # so that a reply could come back
    assert all(world.attempt(SPOOF_TARGETS).values())
    assert world.attempt(SPOOF_TARGETS, source=forged) == dict.fromkeys(SPOOF_TARGETS)
    _without_our_firewall(sandbox_host)  # the control: it is the firewall that stops it
    assert all(world.attempt(SPOOF_TARGETS, source=forged).values())


def test_a_forged_mac_gets_nowhere(sandbox_host, guests):
    world = build(sandbox_host, guests, _policy("open"))
    assert all(world.attempt(SPOOF_TARGETS).values())

    def forge() -> None:
        # Both neighbour caches forget the old MAC, so the host answers the new one if anything lets it.
        world.guest.ip("link", "set", "eth0", "address", "02:00:00:00:00:99")
        world.guest.ip("neigh", "flush", "dev", "eth0")
        sandbox_host.host.ip("neigh", "flush", "dev", world.a.tap)

    forge()
    assert world.attempt(SPOOF_TARGETS) == dict.fromkeys(SPOOF_TARGETS)
    _without_our_firewall(sandbox_host)
    forge()
    assert all(world.attempt(SPOOF_TARGETS).values())


def test_only_the_sandboxs_own_tap_reaches_its_gateway_services(sandbox_host, guests):
    # The proxy on a gateway injects its owner's real keys: a host process (arriving on lo) or another sandbox
    # must not get through to it, nor to Ollama/PulseAudio there. Other ports of the host stay as they were.
    world = build(sandbox_host, guests, _policy("proxy"))
    gw = str(world.a.host_ip)
    services = [("tcp", gw, port, "") for port in policy.host_ports(_policy("proxy"))]
    control = [("tcp", gw, 8080, "")]  # not a gateway service: the host reaches its own address as ever
    assert probe(world.guest, services) == [str(world.a.guest_ip)] * len(services)  # the sandbox itself: yes
    assert probe(sandbox_host.host, services + control, timeout=1) == [None] * len(services) + [gw]
    assert probe(world.other, services, timeout=1) == [None] * len(services)  # beta, from its own TAP
    # The control: without our table both reach alpha's proxy, so the refusals above are the firewall's doing.
    _without_our_firewall(sandbox_host)
    assert None not in probe(sandbox_host.host, services)
    assert None not in probe(world.other, services)


def test_the_policy_is_one_transaction(sandbox_host, monkeypatch):
    calls = []
    real = rules.apply
    monkeypatch.setattr(rules, "apply", lambda doc, what="apply": (calls.append(what), real(doc, what)))
    p = _policy("open")
    cfg = net.plan("alpha", set(), POOL)
    net.up("alpha", cfg, policy.host_ports(p), uplink=sandbox_host.uplink, egress=policy.egress_rules(p))
    assert calls == ["install"]
    chain = run(["nft", "list", "chain", "inet", "ai_sandbox", f"sb_{net.pool.sandbox_id('alpha')}"]).stdout
    assert "ip daddr 10.99.0.20 tcp dport 5432 accept" in chain and "udp dport 53 accept" in chain
    net.down("alpha")
    assert calls == ["install", "remove"]
    assert net.rules_of("alpha") == []
