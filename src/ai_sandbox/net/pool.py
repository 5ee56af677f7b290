"""Addresses of a sandbox, as pure functions: names, MAC, and the lowest free subnet of the pool.

Nothing here reads the host: the caller persists each sandbox's subnet and passes the used ones back in, so the
allocation is reproducible and testable.
"""

from __future__ import annotations

import hashlib
import ipaddress
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network
from typing import Any

from ai_sandbox.errors import SandboxError, UsageError

POOL_ENV = "AI_SANDBOX_NET_POOL"
DEFAULT_POOL = IPv4Network("10.213.0.0/16")
# /30 = network, gateway (host end of the TAP), guest, broadcast: the smallest subnet a point-to-point link needs.
DEFAULT_PREFIX = 30
TAP_PREFIX = "aisb-"
# 10 hex digits keep "aisb-" + id within IFNAMSIZ-1 = 15 characters; 40 bits make collisions negligible.
ID_LEN = 10


@dataclass(frozen=True)
class NetConfig:
    """Everything about one sandbox's link that the VMM, the guest's config drive and the firewall need."""

    tap: str
    subnet: IPv4Network
    host_ip: IPv4Address
    guest_ip: IPv4Address
    prefix: int
    mac: str
    pool: IPv4Network = DEFAULT_POOL  # the firewall drops guest traffic to any address of the pool

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form, for the sandbox's state file."""
        return {
            "tap": self.tap,
            "subnet": str(self.subnet),
            "host_ip": str(self.host_ip),
            "guest_ip": str(self.guest_ip),
            "prefix": self.prefix,
            "mac": self.mac,
            "pool": str(self.pool),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> NetConfig:
        return cls(
            tap=str(data["tap"]),
            subnet=IPv4Network(data["subnet"]),
            host_ip=IPv4Address(data["host_ip"]),
            guest_ip=IPv4Address(data["guest_ip"]),
            prefix=int(data["prefix"]),
            mac=str(data["mac"]),
            pool=IPv4Network(data.get("pool", str(DEFAULT_POOL))),
        )


def sandbox_id(name: str) -> str:
    """Short stable id of a sandbox name; names every device, chain and map element of that sandbox."""
    if not name:
        raise UsageError("a sandbox name cannot be empty")
    return hashlib.sha256(name.encode()).hexdigest()[:ID_LEN]


def tap_name(name: str) -> str:
    """TAP device name: `aisb-<id>`, 15 characters, so it fits the kernel's interface-name limit."""
    return TAP_PREFIX + sandbox_id(name)


def mac_for(name: str) -> str:
    """Guest MAC: stable across restarts (the guest keeps its interface name), locally administered, unicast."""
    digest = hashlib.sha256(b"mac:" + name.encode()).digest()
    first = (digest[0] & 0xFC) | 0x02  # bit 1 = locally administered, bit 0 clear = unicast
    return ":".join(f"{b:02x}" for b in (first, *digest[1:6]))


def parse_pool(text: str, prefix: int = DEFAULT_PREFIX) -> IPv4Network:
    """Validate the pool setting: an IPv4 network with room for at least one sandbox subnet."""
    try:
        pool = IPv4Network(text.strip(), strict=True)
    except ValueError as e:
        raise UsageError(
            f"{POOL_ENV}={text!r} is not an IPv4 network: {e}", hint="use CIDR notation, e.g. 10.213.0.0/16"
        ) from e
    if pool.prefixlen > prefix:
        raise UsageError(f"{POOL_ENV}={text} is smaller than one /{prefix} sandbox subnet", hint="use /24 or larger")
    return pool


def pool_from_env(env: Mapping[str, str] | None = None) -> IPv4Network:
    """The configured pool: $AI_SANDBOX_NET_POOL, else 10.213.0.0/16."""
    value = (os.environ if env is None else env).get(POOL_ENV, "")
    return parse_pool(value) if value.strip() else DEFAULT_POOL


def allocate(
    used: Iterable[IPv4Network], pool: IPv4Network = DEFAULT_POOL, prefix: int = DEFAULT_PREFIX
) -> IPv4Network:
    """Lowest subnet of size /prefix inside `pool` that overlaps none of `used` (which may have any sizes)."""
    if prefix < pool.prefixlen or prefix > 30:
        raise UsageError(f"cannot cut /{prefix} subnets out of {pool}")
    size = 1 << (32 - prefix)
    start, end = int(pool.network_address), int(pool.broadcast_address)
    # Walk the used ranges in order, jumping the candidate past each one it hits: O(n log n), not O(pool).
    candidate = start
    for lo, hi in sorted((int(u.network_address), int(u.broadcast_address)) for u in used):
        if hi < candidate:
            continue
        if lo > candidate + size - 1:
            break
        candidate = (hi // size + 1) * size
    if candidate + size - 1 > end:
        raise SandboxError(
            f"no free /{prefix} subnet left in {pool}",
            hint=f"remove stopped sandboxes or set {POOL_ENV} to a larger range",
        )
    return IPv4Network((candidate, prefix))


def plan(name: str, used: Iterable[IPv4Network], pool: IPv4Network = DEFAULT_POOL) -> NetConfig:
    """Addresses and names for a new sandbox; the caller persists the result."""
    subnet = allocate(used, pool)
    hosts = list(ipaddress.ip_network(subnet).hosts())
    return NetConfig(
        tap=tap_name(name),
        subnet=subnet,
        host_ip=hosts[0],
        guest_ip=hosts[1],
        prefix=subnet.prefixlen,
        mac=mac_for(name),
        pool=pool,
    )
