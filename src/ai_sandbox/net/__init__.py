"""The host side of a sandbox's network: a TAP with its own small subnet, NAT to the uplink, isolation.

    cfg = net.plan(name, used_subnets, net.parse_pool(settings.net_pool))   # pure; the caller persists cfg
    net.up(name, cfg, allow_host_ports=(proxy_port,))         # TAP + firewall, all or nothing
    net.down(name)                                            # idempotent: no TAP, no rule left
    net.reconcile(live_names)                                 # clears what crashed sandboxes left behind

All of it acts in the network namespace of the calling thread and needs CAP_NET_ADMIN.
"""

from __future__ import annotations

import fcntl
import logging
import os
import re
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from ipaddress import IPv4Interface
from pathlib import Path
from typing import Any

from ai_sandbox.errors import SandboxError, UsageError
from ai_sandbox.net import rules, tap
from ai_sandbox.net.pool import (
    DEFAULT_POOL,
    ID_LEN,
    POOL_ENV,
    TAP_PREFIX,
    NetConfig,
    parse_pool,
    plan,
    pool_from_env,
)
from ai_sandbox.net.pool import sandbox_id as _sandbox_id
from ai_sandbox.net.pool import tap_name as _tap_name

__all__ = [
    "DEFAULT_POOL", "POOL_ENV", "NetConfig", "parse_pool", "plan", "pool_from_env", "up", "down", "reconcile",
    "rules_of",
]  # fmt: skip

log = logging.getLogger(__name__)
LOCK_ENV = "AI_SANDBOX_NET_LOCK"
# The uplink of a host without a default route: no interface can have this name ("/" is not allowed in one), so
# the forward chain drops everything and the NAT chain matches nothing.
NO_UPLINK = "/no-uplink"
_OUR_TAP = re.compile(rf"^{re.escape(TAP_PREFIX)}[0-9a-f]{{{ID_LEN}}}$")


def _default_lock() -> Path:
    return Path("/run/lock" if Path("/run/lock").is_dir() else "/run") / "ai-sandbox-net.lock"


@contextmanager
def _locked() -> Iterator[None]:
    """Serialise our changes to TAPs and the table: `down` may delete the table only if no `up` runs meanwhile."""
    path = Path(os.environ.get(LOCK_ENV) or _default_lock())
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except OSError as e:
        raise SandboxError(
            f"cannot open the network lock {path}: {e.strerror}", hint="sandbox networking needs root"
        ) from e
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def up(
    name: str,
    cfg: NetConfig,
    allow_host_ports: tuple[int, ...] = (),
    *,
    owner_uid: int | None = None,
    uplink: str | None = None,
    egress: Sequence[rules.Rule] = rules.NAT_EGRESS,
    gateway_icmp: bool = True,
) -> str | None:
    """Create the sandbox's TAP and firewall rules; on any failure nothing of this sandbox is left.

    Returns the uplink used, or None when the host has no IPv4 default route (a laptop on a train): then the
    sandbox starts anyway, nothing is forwarded (the guest has no way out), and its gateway ports still work.

    `allow_host_ports`: TCP ports the guest may reach on its gateway address (e.g. the proxy).
    `owner_uid`: user allowed to open the TAP (an unprivileged VMM). `uplink`: default-route interface if None.
    `egress`: the rules of the egress mode after the fixed guards (default: mode "nat", allow all).
    `gateway_icmp`: may the guest ping its gateway. Only the sandbox's own TAP reaches `allow_host_ports` on
    its gateway address: not the host's own processes, not another sandbox.
    """
    if cfg.tap != _tap_name(name):
        raise UsageError(f"network config of {name!r} names TAP {cfg.tap}, expected {_tap_name(name)}")
    bad = [p for p in allow_host_ports if not 0 < p < 65536]
    if bad:
        raise UsageError(f"not TCP ports: {bad}")
    with _locked():
        found = uplink or tap.find_uplink()
        out = found or NO_UPLINK
        clash = tap.address_conflicts(cfg.subnet, ignore=cfg.tap)
        if clash:
            raise SandboxError(
                f"sandbox subnet {cfg.subnet} overlaps {', '.join(clash)}",
                hint=f"set {POOL_ENV} to an unused range, or remove stale sandboxes",
            )
        tap.enable_ip_forward()
        try:
            tap.create_tap(cfg.tap, IPv4Interface(f"{cfg.host_ip}/{cfg.prefix}"), owner_uid)
            doc = rules.render_up(name, cfg, out, allow_host_ports, egress, rules.list_table(), gateway_icmp)
            rules.apply(doc, "install")
        except BaseException:
            try:
                _teardown({_sandbox_id(name)})
            except Exception:  # the original failure is the one worth reporting
                log.exception("cleaning up the network of %s failed", name)
            raise
    return found


def down(name: str, cfg: NetConfig | None = None) -> None:
    """Remove the sandbox's TAP and every rule of it; does nothing for what is already gone.

    `cfg` is accepted for symmetry with `up`; everything is found from the name.
    """
    del cfg
    with _locked():
        _teardown({_sandbox_id(name)})


def reconcile(live: Iterable[str]) -> list[str]:
    """Remove TAPs and rules of every sandbox not named in `live`; returns the TAP names (ids) removed."""
    keep = {_sandbox_id(n) for n in live}
    with _locked():
        found = {t.removeprefix(TAP_PREFIX) for t in tap.list_taps() if _OUR_TAP.match(t)}
        found |= rules.sandbox_ids(rules.list_table())
        dead = found - keep
        _teardown(dead)
    return sorted(TAP_PREFIX + sid for sid in dead)


def rules_of(name: str) -> list[dict[str, Any]]:
    """Every nftables chain, rule and map element of the sandbox (empty once it is down)."""
    return rules.objects_of(rules.list_table(), _sandbox_id(name))


def _teardown(sids: set[str]) -> None:
    """Delete TAPs first (the guest is cut off at once), then the rules in one transaction. Caller holds the lock."""
    for sid in sorted(sids):
        tap.delete_tap(TAP_PREFIX + sid)
    doc = rules.render_down(rules.list_table(), sids)
    if doc is not None:
        rules.apply(doc, "remove")
