"""Which addresses are the public internet: the one answer for the host side (nftables policy and egress proxy).

IPv4 embedded in IPv6 (NAT64, 6to4, IPv4-compatible/-mapped/-translated, Teredo) and the cloud metadata addresses
are not public. A leaf module: the network policy and the proxy both ask it, neither imports the other.
"""

from __future__ import annotations

from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_address

# Never the internet: this-network, private, carrier-grade NAT, loopback, link-local, multicast, reserved/broadcast.
BLOCKED = tuple(
    IPv4Network(n)
    for n in (
        "0.0.0.0/8",
        "10.0.0.0/8",
        "100.64.0.0/10",
        "127.0.0.0/8",
        "169.254.0.0/16",
        "172.16.0.0/12",
        "192.168.0.0/16",
        "224.0.0.0/4",
        "240.0.0.0/4",
    )
)
# IPv6 prefixes that carry an IPv4 address (the packet may end at any IPv4 host, private ones included) or are
# not routed on the internet; Python's `is_global` calls several of them global.
_V6_NOT_PUBLIC = tuple(
    IPv6Network(n)
    for n in (
        "::/96",  # IPv4-compatible (deprecated)
        "::ffff:0:0/96",  # IPv4-mapped
        "::ffff:0:0:0/96",  # IPv4-translated (SIIT)
        "64:ff9b::/96",  # NAT64 well-known prefix
        "64:ff9b:1::/48",  # NAT64 local use
        "2001::/32",  # Teredo
        "2002::/16",  # 6to4
        "fec0::/10",  # site-local (deprecated)
    )
)
_METADATA = tuple(IPv4Network(n) for n in ("169.254.0.0/16", "100.64.0.0/10", "168.63.129.16/32"))


def is_public(addr: str | IPv4Address | IPv6Address) -> bool:
    """Is `addr` an ordinary unicast address of the public internet? (No private, shared, loopback, link-local,
    multicast, reserved or documentation range, no cloud metadata address, no IPv6 form that embeds IPv4.)"""
    ip = ip_address(addr) if isinstance(addr, str) else addr
    if not ip.is_global or ip.is_multicast:
        return False
    if isinstance(ip, IPv6Address):
        return not any(ip in n for n in _V6_NOT_PUBLIC)
    return not any(ip in n for n in (*_METADATA, *BLOCKED))
