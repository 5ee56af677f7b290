"""Egress modes: what a guest may send through the host, as pure functions over `rules` expressions.

    p = policy.parse(settings.network, settings.egress_allow_ip, settings.egress_allow_tcp_ports)
    net.up(name, cfg, policy.host_ports(p), egress=policy.egress_rules(p))

    nat      everything the fixed guards let through (the lifecycle tests' mode)
    open     the seed's rules: DNS, HTTP and HTTPS to the internet; private, link-local, loopback, multicast and
             reserved ranges dropped; on the gateway only Ollama and PulseAudio
    proxy    (default) nothing is forwarded but EGRESS_ALLOW_IP, DNS included; the gateway offers the host proxy,
             Ollama, PulseAudio
    offline  nothing forwarded, no gateway port, no ping to the gateway (the host's own SSH into the guest works)

EGRESS_ALLOW_IP with EGRESS_ALLOW_TCP_PORTS opens those TCP ports to that IP or CIDR in `open` (ahead of the
private-range drops, so it may be private) and in `proxy` (the seed's one way to reach e.g. a LAN database, which
an HTTP proxy cannot carry); `offline` ignores it. It comes only from settings the guest cannot write (`config`),
and a network overlapping any range a sandbox may never reach is refused whole (so 0.0.0.0/0 is). The fixed guards
of `rules` come first in every mode, so no policy reaches another sandbox, a cloud metadata service, IPv6 or
anything with a forged source.

`is_public` is the one answer to "is this address on the public internet" for the host side (the proxy asks it
before it connects): IPv4 embedded in IPv6 (NAT64, 6to4, IPv4-compatible/-mapped/-translated, Teredo) and the cloud
metadata addresses are not public.
"""

from __future__ import annotations

from dataclasses import dataclass
from ipaddress import IPv4Network
from typing import Any

from ai_sandbox.addresses import BLOCKED, is_public  # noqa: F401  (re-exported: the policy's own answer)
from ai_sandbox.errors import UsageError
from ai_sandbox.net import rules
from ai_sandbox.net.rules import ACCEPT, DROP, Rule, field, match, prefix

MODES = ("nat", "open", "proxy", "offline")
DEFAULT_MODE = "proxy"
MODE_ENV, ALLOW_IP_ENV, ALLOW_PORTS_ENV = "AI_NETWORK", "EGRESS_ALLOW_IP", "EGRESS_ALLOW_TCP_PORTS"
PROXY_PORT = 3128
OLLAMA_PORT, PULSEAUDIO_PORT = 11434, 4713
DNS_PORT = 53  # on the gateway in open/nat: the host agent's DNS server
GATEWAY_PORTS = (OLLAMA_PORT, PULSEAUDIO_PORT)
WEB_PORTS = (53, 80, 443)  # TCP: DNS (large answers), HTTP, HTTPS; DNS over UDP has its own rule

# What EGRESS_ALLOW_IP may not overlap: nothing a guest could usefully reach there, and the metadata services.
_UNALLOWABLE = {
    "this-network": IPv4Network("0.0.0.0/8"),
    "loopback": IPv4Network("127.0.0.0/8"),
    "link-local (home of the metadata service)": IPv4Network("169.254.0.0/16"),
    "carrier-grade NAT (home of a metadata service)": IPv4Network("100.64.0.0/10"),
    "a cloud metadata service": IPv4Network("168.63.129.16/32"),
    "multicast": IPv4Network("224.0.0.0/4"),
    "reserved": IPv4Network("240.0.0.0/4"),
}


@dataclass(frozen=True)
class EgressPolicy:
    """One sandbox's egress mode and its parameters (build it with `parse`)."""

    mode: str = DEFAULT_MODE
    proxy_port: int = PROXY_PORT
    gateway_ports: tuple[int, ...] = GATEWAY_PORTS
    allow_ip: str = ""  # IPv4 address or CIDR, "" for none
    allow_tcp_ports: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise UsageError(f"{self.mode!r} is not a network mode", hint=f"use one of {', '.join(MODES)}")
        bad = [p for p in (self.proxy_port, *self.gateway_ports, *self.allow_tcp_ports) if not 0 < p < 65536]
        if bad:
            raise UsageError(f"not TCP ports: {bad}")
        if self.allow_ip:
            _allow_network(self.allow_ip)

    @property
    def allowance(self) -> tuple[IPv4Network, tuple[int, ...]] | None:
        """EGRESS_ALLOW_IP and its ports when this mode honours them."""
        if self.mode not in ("open", "proxy") or not self.allow_ip or not self.allow_tcp_ports:
            return None
        return _allow_network(self.allow_ip), self.allow_tcp_ports


def parse(mode: str, allow_ip: str = "", allow_ports: str = "", *, proxy_port: int = PROXY_PORT) -> EgressPolicy:
    """Policy from the settings' strings (AI_NETWORK, EGRESS_ALLOW_IP, EGRESS_ALLOW_TCP_PORTS); "" mode = proxy."""
    name = mode.strip().lower() or DEFAULT_MODE
    if name not in MODES:
        raise UsageError(f"{MODE_ENV}={mode!r} is not a network mode", hint=f"use one of {', '.join(MODES)}")
    ip = allow_ip.strip()
    if ip:
        ip = str(_allow_network(ip))
    ports = _ports(allow_ports)
    if ip and not ports:
        raise UsageError(
            f"{ALLOW_IP_ENV}={allow_ip} is set but {ALLOW_PORTS_ENV} is empty",
            hint=f"list the TCP ports to allow, e.g. {ALLOW_PORTS_ENV}=22,5432, or unset {ALLOW_IP_ENV}",
        )
    if not 0 < proxy_port < 65536:
        raise UsageError(f"proxy port {proxy_port} is not a TCP port")
    return EgressPolicy(mode=name, proxy_port=proxy_port, allow_ip=ip, allow_tcp_ports=ports)


def _allow_network(text: str) -> IPv4Network:
    try:
        net = IPv4Network(text.strip(), strict=True)
    except ValueError as e:
        hint = "sandboxes have no IPv6" if ":" in text else "e.g. 192.168.1.50 or 10.20.0.0/16"
        raise UsageError(f"{ALLOW_IP_ENV}={text!r} is not an IPv4 address or network: {e}", hint=hint) from e
    for what, bad in _UNALLOWABLE.items():
        if net.overlaps(bad):
            inside = "is" if net.subnet_of(bad) else f"overlaps {bad},"
            raise UsageError(
                f"{ALLOW_IP_ENV}={text} {inside} {what}, which a sandbox may never reach",
                hint="name only the host or network the sandbox needs, e.g. 192.168.1.50",
            )
    return net


def _ports(text: str) -> tuple[int, ...]:
    ports = set()
    for item in (x.strip() for x in text.split(",")):
        if not item:
            continue
        if not item.isdigit() or not 0 < int(item) < 65536:
            raise UsageError(f"{ALLOW_PORTS_ENV}={text!r}: {item!r} is not a TCP port", hint="e.g. 22,5432")
        ports.add(int(item))
    return tuple(sorted(ports))


def _ports_expr(ports: tuple[int, ...]) -> Any:
    unique = sorted(set(ports))
    return unique[0] if len(unique) == 1 else {"set": unique}


def egress_rules(p: EgressPolicy) -> tuple[Rule, ...]:
    """The mode's rules for the sandbox's forward chain, after the fixed guards; whatever they do not accept drops."""
    if p.mode == "nat":
        return rules.NAT_EGRESS
    out: list[Rule] = []
    if p.allowance:
        net, ports = p.allowance
        out.append((match(field("ip", "daddr"), rules.addr(net)), match(field("tcp", "dport"), _ports_expr(ports)), ACCEPT))
    if p.mode == "open":
        out += [
            (match(field("ip", "daddr"), {"set": [prefix(n) for n in BLOCKED]}), DROP),
            (match(field("udp", "dport"), 53), ACCEPT),
            (match(field("tcp", "dport"), {"set": list(WEB_PORTS)}), ACCEPT),
        ]
    return tuple(out)


def host_ports(p: EgressPolicy) -> tuple[int, ...]:
    """TCP ports the guest may reach on its gateway address: `allow_host_ports` of `net.up`. DNS_PORT among them
    means DNS over UDP too: the host agent serves DNS there in modes open and nat (it asks the host's resolvers)."""
    ports = {"nat": (DNS_PORT, OLLAMA_PORT), "open": (DNS_PORT, *p.gateway_ports),
             "proxy": (p.proxy_port, *p.gateway_ports), "offline": ()}[p.mode]
    return tuple(sorted(set(ports)))


def gateway_icmp(p: EgressPolicy) -> bool:
    """May the guest ping its gateway? Not offline: that mode answers nothing on the host side."""
    return p.mode != "offline"


def describe(p: EgressPolicy) -> str:
    """One line for people: what the guest can reach."""
    gw = ", ".join(map(str, host_ports(p))) or "none"
    text = {
        "nat": "everything but other sandboxes, link-local/metadata and IPv6",
        "open": "DNS, HTTP and HTTPS to the internet; no private ranges",
        "proxy": f"only the host proxy (port {p.proxy_port}); nothing else forwarded, no DNS",
        "offline": "nothing",
    }[p.mode]
    line = f"{p.mode}: {text}; gateway ports: {gw}"
    if p.allowance:
        line += f"; {ALLOW_IP_ENV} {p.allow_ip} on TCP {', '.join(map(str, p.allow_tcp_ports))}"
    elif p.allow_ip and p.mode == "offline":
        line += f"; {ALLOW_IP_ENV} ignored (offline)"
    return line
