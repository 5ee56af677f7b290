"""Egress modes as pure data: parsing the settings, the rules of each mode (as nft would print them), host ports."""

from __future__ import annotations

import json
from ipaddress import IPv4Network, ip_address
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ai_sandbox.errors import UsageError
from ai_sandbox.net import plan, policy, rules
from ai_sandbox.net.pool import DEFAULT_POOL, sandbox_id

pytestmark = pytest.mark.unit

A = plan("alpha", set(), DEFAULT_POOL)


# --- a tiny printer for our expression vocabulary, so the expectations below read like `nft list chain` --------------


def _value(v: Any) -> str:
    if isinstance(v, dict) and "set" in v:
        return "{ " + ", ".join(_value(x) for x in v["set"]) + " }"
    if isinstance(v, dict) and "prefix" in v:
        return f"{v['prefix']['addr']}/{v['prefix']['len']}"
    return str(v)


def _expr(e: dict[str, Any]) -> str:
    if "match" in e:
        m = e["match"]
        left = m["left"]
        ((kind, key),) = left.items()
        what = f"{key['protocol']} {key['field']}" if kind == "payload" else f"{kind} {key['key']}".removeprefix("meta ")
        op = "" if m["op"] == "==" else f"{m['op']} "
        return f"{what} {op}{_value(m['right'])}"
    ((verdict, _),) = e.items()
    return verdict


def text(body: Any) -> list[str]:
    return [" ".join(_expr(e) for e in rule) for rule in body]


BLOCKED = (
    "ip daddr { 0.0.0.0/8, 10.0.0.0/8, 100.64.0.0/10, 127.0.0.0/8, 169.254.0.0/16, 172.16.0.0/12, 192.168.0.0/16, "
    "224.0.0.0/4, 240.0.0.0/4 } drop"
)
OPEN = [BLOCKED, "udp dport 53 accept", "tcp dport { 53, 80, 443 } accept"]
ALLOW = "ip daddr 10.99.0.20 tcp dport { 22, 5432 } accept"

# mode -> (egress rules with EGRESS_ALLOW_IP=10.99.0.20 EGRESS_ALLOW_TCP_PORTS=5432,22, gateway ports)
GOLDEN = {
    "nat": (["accept"], (53, 11434)),
    "open": ([ALLOW, *OPEN], (53, 4713, 11434)),
    "proxy": ([ALLOW], (3128, 4713, 11434)),
    "offline": ([], ()),
}


@pytest.mark.parametrize("mode", policy.MODES)
def test_each_mode_renders_as_expected(mode):
    p = policy.parse(mode, "10.99.0.20", "5432,22")
    egress, ports = GOLDEN[mode]
    assert text(policy.egress_rules(p)) == egress
    assert policy.host_ports(p) == ports


@pytest.mark.parametrize("mode", policy.MODES)
def test_without_an_allowance_only_the_mode_is_left(mode):
    p = policy.parse(mode, "", "")
    assert ALLOW not in text(policy.egress_rules(p))
    assert text(policy.egress_rules(p)) == [r for r in GOLDEN[mode][0] if r != ALLOW]


def test_proxy_is_the_default_and_forwards_nothing():
    p = policy.parse("", "", "")
    assert p == policy.EgressPolicy() and p.mode == "proxy"
    assert policy.egress_rules(p) == ()
    assert policy.host_ports(p) == (3128, 4713, 11434)
    assert 53 not in policy.host_ports(p)  # no DNS, not even on the gateway
    assert policy.host_ports(policy.parse("proxy", "", "", proxy_port=8888)) == (4713, 8888, 11434)


def test_the_allowance_comes_before_the_private_drops():
    body = text(policy.egress_rules(policy.parse("open", "192.168.1.0/24", "22")))
    assert body[0] == "ip daddr 192.168.1.0/24 tcp dport 22 accept"
    assert body.index(BLOCKED) == 1


def test_open_blocks_every_non_internet_range_and_allows_only_dns_and_web():
    body = text(policy.egress_rules(policy.parse("open", "", "")))
    for net in ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "100.64.0.0/10", "169.254.0.0/16", "127.0.0.0/8"):
        assert net in body[0]
    assert body[0].endswith("drop") and all(r.endswith("accept") for r in body[1:])
    assert [r for r in body if "dport" in r] == ["udp dport 53 accept", "tcp dport { 53, 80, 443 } accept"]


def test_offline_ignores_the_allowance():
    p = policy.parse("offline", "10.99.0.20", "5432")
    assert policy.egress_rules(p) == () and policy.host_ports(p) == ()
    assert "ignored" in policy.describe(p)


def _chain(doc: dict[str, Any], chain: str) -> list[list[dict[str, Any]]]:
    return [c["add"]["rule"]["expr"] for c in doc["nftables"] if c.get("add", {}).get("rule", {}).get("chain") == chain]


@pytest.mark.parametrize("mode", policy.MODES)
def test_in_the_ruleset_the_guards_come_first_and_a_drop_last(mode):
    p = policy.parse(mode, "10.99.0.20", "5432")
    doc = rules.render_up(
        "alpha", A, "uplink0", policy.host_ports(p), policy.egress_rules(p), gateway_icmp=policy.gateway_icmp(p)
    )
    sid = sandbox_id("alpha")
    fwd, inp = text(_chain(doc, f"sb_{sid}")), text(_chain(doc, f"in_{sid}"))
    guards = [
        "nfproto != ipv4 drop",
        f"ether saddr != {A.mac} drop",
        f"ip saddr != {A.guest_ip} drop",
    ]
    assert fwd[:3] == guards and inp[:3] == guards
    metadata = "ip daddr { 169.254.0.0/16, 100.64.0.0/10, 168.63.129.16 } drop"
    assert fwd[3:6] == [metadata, "ip daddr 10.213.0.0/16 drop", "oifname != uplink0 drop"]
    assert fwd[6:] == [*text(policy.egress_rules(p)), "drop"]
    assert inp[3] == f"ip daddr != {A.host_ip} drop"
    assert inp[-1] == "drop"
    ports = policy.host_ports(p)
    assert any("tcp dport" in r for r in inp) == bool(ports)
    # UDP only for DNS, and only where the host agent serves it (open, nat)
    assert [r for r in inp if "udp" in r] == (["udp dport 53 accept"] if 53 in ports else [])
    assert ("l4proto icmp accept" in inp) == (mode != "offline")  # offline: not even a ping to the gateway
    gw = text(_chain(doc, f"gw_{sid}"))
    want = [f"iifname != {A.tap} tcp dport {{ {', '.join(map(str, ports))} }} drop"] if ports else []
    assert gw == want + ([f"iifname != {A.tap} udp dport 53 drop"] if 53 in ports else [])


def test_the_whole_ruleset_is_one_transaction():
    p = policy.parse("open", "", "")
    doc = rules.render_up("alpha", A, "uplink0", policy.host_ports(p), policy.egress_rules(p))
    assert list(doc) == ["nftables"]
    json.dumps(doc)  # plain data, fed whole to one `nft -j -f`


@pytest.mark.parametrize(
    ("mode", "ip", "ports", "variable"),
    [
        ("wide-open", "", "", "AI_NETWORK"),
        ("open", "example.com", "22", "EGRESS_ALLOW_IP"),
        ("open", "10.1.2.3/8", "22", "EGRESS_ALLOW_IP"),  # host bits set: say what you mean
        ("open", "fd00::1", "22", "EGRESS_ALLOW_IP"),
        ("open", "169.254.169.254", "80", "EGRESS_ALLOW_IP"),
        ("open", "127.0.0.1", "80", "EGRESS_ALLOW_IP"),
        ("open", "224.0.0.1", "80", "EGRESS_ALLOW_IP"),
        ("open", "0.0.0.0/0", "22", "EGRESS_ALLOW_IP"),  # overlaps everything forbidden
        ("proxy", "0.0.0.0/0", "1", "EGRESS_ALLOW_IP"),
        ("open", "128.0.0.0/1", "22", "EGRESS_ALLOW_IP"),  # holds link-local, multicast, reserved
        ("open", "168.63.129.16", "80", "EGRESS_ALLOW_IP"),  # Azure's wire server
        ("open", "100.100.100.200", "80", "EGRESS_ALLOW_IP"),  # Alibaba's metadata service
        ("open", "100.0.0.0/8", "80", "EGRESS_ALLOW_IP"),  # overlaps carrier-grade NAT
        ("open", "10.0.0.1", "", "EGRESS_ALLOW_TCP_PORTS"),
        ("open", "10.0.0.1", "0", "EGRESS_ALLOW_TCP_PORTS"),
        ("open", "10.0.0.1", "65536", "EGRESS_ALLOW_TCP_PORTS"),
        ("open", "10.0.0.1", "22;80", "EGRESS_ALLOW_TCP_PORTS"),
        ("open", "10.0.0.1", "ssh", "EGRESS_ALLOW_TCP_PORTS"),
        ("open", "", "-1", "EGRESS_ALLOW_TCP_PORTS"),
    ],
)
def test_bad_input_is_one_line_naming_the_variable(mode, ip, ports, variable):
    with pytest.raises(UsageError) as info:
        policy.parse(mode, ip, ports)
    line = info.value.line()
    assert variable in line and line.startswith(("AI_NETWORK=", "EGRESS_ALLOW_IP=", "EGRESS_ALLOW_TCP_PORTS="))
    assert "\n" not in line


def test_parse_is_forgiving_about_spacing_and_case():
    p = policy.parse(" Open ", " 10.99.0.0/16 ", " 443, 22 ,22,")
    assert p == policy.EgressPolicy(mode="open", allow_ip="10.99.0.0/16", allow_tcp_ports=(22, 443))


def test_ports_without_an_ip_allow_nothing():
    p = policy.parse("proxy", "", "22")
    assert p.allowance is None and policy.egress_rules(p) == ()


def test_a_wide_allowance_is_refused_whole_a_narrow_private_one_accepted():
    # Before, only networks *inside* a forbidden range were refused, so 0.0.0.0/0 (written by a guest) passed.
    with pytest.raises(UsageError, match=r"overlaps 0\.0\.0\.0/8"):
        policy.parse("open", "0.0.0.0/0", "22")
    with pytest.raises(UsageError, match="is loopback"):
        policy.parse("open", "127.0.0.0/8", "22")
    p = policy.parse("open", "8.0.0.0/7", "22")  # public and wide: the user's own trusted choice
    assert text(policy.egress_rules(p))[0] == "ip daddr 8.0.0.0/7 tcp dport 22 accept"


# Any IPv4 network string the parser is given: it either refuses it in one line or returns a network that touches
# nothing a sandbox may never reach.
_networks = st.builds(
    lambda a, n: str(IPv4Network((a, n), strict=False)), st.integers(0, 2**32 - 1), st.integers(0, 32)
)
_texts = st.one_of(_networks, st.text(max_size=40), st.from_regex(r"\A[0-9./:a-f ]{0,24}\Z"))


@given(_texts)
def test_the_network_parser_never_lets_a_forbidden_range_through(raw):
    try:
        p = policy.parse("open", raw, "22")
    except UsageError as e:
        assert "\n" not in e.line() and e.line().startswith("EGRESS_ALLOW_IP=")
        return
    if not p.allow_ip:
        assert not raw.strip()
        return
    net = IPv4Network(p.allow_ip)
    for bad in ("0.0.0.0/8", "127.0.0.0/8", "169.254.0.0/16", "100.64.0.0/10", "168.63.129.16/32", "224.0.0.0/4"):
        assert not net.overlaps(IPv4Network(bad)), (raw, bad)


@pytest.mark.parametrize(
    ("address", "public"),
    [
        ("8.8.8.8", True),
        ("2606:4700::1111", True),
        ("10.0.0.1", False),
        ("192.0.2.1", False),  # documentation
        ("100.64.0.1", False),
        ("100.100.100.200", False),  # Alibaba metadata
        ("168.63.129.16", False),  # Azure wire server: is_global in Python, still not for a guest
        ("169.254.169.254", False),
        ("224.0.0.1", False),
        ("64:ff9b::a00:1", False),  # NAT64 of 10.0.0.1
        ("64:ff9b::808:808", False),  # NAT64 even of a public address: the translator decides where it goes
        ("2002:a00:1::1", False),  # 6to4 of 10.0.0.1
        ("::10.0.0.1", False),  # IPv4-compatible
        ("::ffff:10.0.0.1", False),  # IPv4-mapped
        ("::ffff:8.8.8.8", False),  # mapped: callers unwrap first if they mean the IPv4 address
        ("fec0::1", False),  # site-local
        ("2001:0:a00:1::1", False),  # Teredo
        ("fd00::1", False),
        ("ff02::1", False),
        ("::1", False),
    ],
)
def test_is_public(address, public):
    assert policy.is_public(address) is public
    assert policy.is_public(ip_address(address)) is public


@given(st.integers(0, 2**32 - 1))
def test_no_ipv4_address_is_public_through_an_ipv6_wrapping(n):
    v4 = ip_address(n)
    for wrapped in (f"64:ff9b::{v4}", f"::ffff:{v4}", f"::{v4}", f"2002:{n >> 16:x}:{n & 0xFFFF:x}::1"):
        assert not policy.is_public(wrapped)
    assert policy.is_public(v4) == (v4.is_global and not v4.is_multicast and not any(
        v4 in IPv4Network(m) for m in ("100.64.0.0/10", "168.63.129.16/32", "169.254.0.0/16")
    ))


@pytest.mark.parametrize("bad", [{"mode": "vpn"}, {"proxy_port": 0}, {"gateway_ports": (70000,)}, {"allow_ip": "x"}])
def test_the_policy_refuses_impossible_values(bad):
    with pytest.raises(UsageError):
        policy.EgressPolicy(**bad)


def test_bad_proxy_port():
    with pytest.raises(UsageError, match="proxy port"):
        policy.parse("proxy", proxy_port=70000)


@pytest.mark.parametrize("mode", policy.MODES)
def test_describe_is_one_line(mode):
    line = policy.describe(policy.parse(mode, "10.99.0.20", "5432"))
    assert line.startswith(mode + ":") and "\n" not in line
