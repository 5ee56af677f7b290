"""The nftables ruleset of the sandboxes: rendered as JSON by pure functions, applied in one `nft -j -f` transaction.

Layout of `table inet ai_sandbox` (the only table we own):

    forward (hook)      iifname "aisb-*" oifname "aisb-*" drop        sandboxes never reach each other
                        iifname vmap @fwd_jump  ──► sb_<id>           the sandbox's egress policy
                        iifname "aisb-*" drop                         a TAP without a policy forwards nothing
                        oifname "aisb-*" ct state established,related accept
                        oifname "aisb-*" drop                         nothing else enters a sandbox
    input (hook)        ip daddr vmap @gw_jump  ──► gw_<id>           only its own TAP reaches a sandbox's gateway services
                        iifname vmap @in_jump   ──► in_<id>           what the guest may reach on the host
                        iifname "aisb-*" drop
    postrouting (nat)   ip saddr vmap @nat_jump ──► nat_<id>          masquerade to the uplink

The hook chains hold only fixed rules and are rewritten whole on every `up` (atomically, so never duplicated);
each sandbox owns four regular chains plus one element in each map, all named from its id, so removing a
sandbox is exact. Egress modes (`policy.py`) plug in as the body of `sb_<id>`: after the fixed guards come the
mode's rules, then an explicit drop. Mode "nat" is a single accept.

Both `sb_<id>` and `in_<id>` start by dropping IPv6 and anything not sent from the guest's own MAC and IPv4
address: guest root can forge both, and nothing in the guest enforces anything. `gw_<id>` guards the other side
of the gateway: the proxy and the other services listening there act for this sandbox's owner (the proxy injects
real keys), so a host process (arriving on `lo`) or another sandbox must not reach them: only the sandbox's TAP
may. ARP is not filtered here; on a routed /30 the host resolves only the guest's own address on that TAP, so a
forged ARP has nothing to take over.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Iterable, Sequence
from ipaddress import IPv4Network
from typing import Any

from ai_sandbox.errors import CommandError, SandboxError
from ai_sandbox.net.pool import TAP_PREFIX, NetConfig, sandbox_id
from ai_sandbox.runner import run

FAMILY = "inet"
TABLE = "ai_sandbox"
FWD_MAP, IN_MAP, NAT_MAP, GW_MAP = "fwd_jump", "in_jump", "nat_jump", "gw_jump"
CHAIN_PREFIXES = ("sb_", "in_", "nat_", "gw_")
# Cloud metadata services, dropped in every mode: link-local 169.254.0.0/16 (AWS, GCP, Azure IMDS 169.254.169.254),
# Azure's wire server 168.63.129.16, Alibaba's 100.100.100.200 inside carrier-grade NAT 100.64.0.0/10.
METADATA = tuple(IPv4Network(n) for n in ("169.254.0.0/16", "100.64.0.0/10", "168.63.129.16/32"))
WILDCARD = TAP_PREFIX + "*"
DNS_PORT = 53  # a gateway port that is served on UDP too

Expr = dict[str, Any]
Rule = Sequence[Expr]
ACCEPT: Expr = {"accept": None}
DROP: Expr = {"drop": None}
ESTABLISHED: Expr = {"match": {"op": "in", "left": {"ct": {"key": "state"}}, "right": ["established", "related"]}}
NAT_EGRESS: tuple[Rule, ...] = ((ACCEPT,),)  # mode "nat": everything the guards let through


# --- expression helpers -------------------------------------------------------------------------------------------


def meta(key: str) -> Expr:
    return {"meta": {"key": key}}


def field(protocol: str, name: str) -> Expr:
    return {"payload": {"protocol": protocol, "field": name}}


def match(left: Expr, right: Any, op: str = "==") -> Expr:
    return {"match": {"op": op, "left": left, "right": right}}


def prefix(net: IPv4Network) -> Expr:
    return {"prefix": {"addr": str(net.network_address), "len": net.prefixlen}}


def jump(chain: str) -> Expr:
    return {"jump": {"target": chain}}


def chains_of(sid: str) -> tuple[str, str, str, str]:
    """Forward, input, NAT and gateway-guard chain of a sandbox id."""
    return f"sb_{sid}", f"in_{sid}", f"nat_{sid}", f"gw_{sid}"


def addr(net: IPv4Network) -> Any:
    """A single address as itself, a network as a prefix."""
    return str(net.network_address) if net.prefixlen == 32 else prefix(net)


def _obj(**fields: Any) -> dict[str, Any]:
    return {"family": FAMILY, "table": TABLE, **fields}


def _rule(chain: str, exprs: Iterable[Expr], comment: str | None = None) -> dict[str, Any]:
    body = _obj(chain=chain, expr=list(exprs))
    if comment:
        body["comment"] = comment[:127]
    return {"add": {"rule": body}}


def _delete_element(map_name: str, key: Any) -> dict[str, Any]:
    return {"delete": {"element": _obj(name=map_name, elem=[key])}}


def _chain_reset(name: str, hook: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    # add (no-op when present) + flush = the chain's content is exactly what follows, in one transaction.
    return [{"add": {"chain": _obj(name=name, **(hook or {}))}}, {"flush": {"chain": _obj(name=name)}}]


# --- rendering ----------------------------------------------------------------------------------------------------


def base_commands() -> list[dict[str, Any]]:
    """Table, maps and hook chains with their fixed rules."""
    cmds: list[dict[str, Any]] = [{"add": {"table": {"family": FAMILY, "name": TABLE}}}]
    for name, key in ((FWD_MAP, "ifname"), (IN_MAP, "ifname"), (NAT_MAP, "ipv4_addr"), (GW_MAP, "ipv4_addr")):
        cmds.append({"add": {"map": _obj(name=name, type=key, map="verdict")}})
    # policy accept: these hooks see all of the host's traffic; we only judge packets of our own interfaces.
    filt = {"type": "filter", "prio": 0, "policy": "accept"}
    cmds += _chain_reset("forward", {"hook": "forward", **filt})
    cmds += [
        _rule("forward", [match(meta("iifname"), WILDCARD), match(meta("oifname"), WILDCARD), DROP], "isolation"),
        _rule("forward", [{"vmap": {"key": meta("iifname"), "data": "@" + FWD_MAP}}]),
        _rule("forward", [match(meta("iifname"), WILDCARD), DROP], "sandbox without policy"),
        _rule("forward", [match(meta("oifname"), WILDCARD), ESTABLISHED, ACCEPT], "replies"),
        _rule("forward", [match(meta("oifname"), WILDCARD), DROP], "no way in"),
    ]
    cmds += _chain_reset("input", {"hook": "input", **filt})
    cmds += [
        # Keyed by destination: connections from the host itself come in on `lo`, never on a sandbox's TAP.
        _rule("input", [{"vmap": {"key": field("ip", "daddr"), "data": "@" + GW_MAP}}]),
        _rule("input", [{"vmap": {"key": meta("iifname"), "data": "@" + IN_MAP}}]),
        _rule("input", [match(meta("iifname"), WILDCARD), DROP], "sandbox without policy"),
    ]
    cmds += _chain_reset("postrouting", {"type": "nat", "hook": "postrouting", "prio": 100, "policy": "accept"})
    # postrouting has no input interface, so the guest's (anti-spoofed) source address picks the chain.
    cmds.append(_rule("postrouting", [{"vmap": {"key": field("ip", "saddr"), "data": "@" + NAT_MAP}}]))
    return cmds


def _not_the_guest(cfg: NetConfig) -> list[Rule]:
    """IPv6, and frames or packets not sent from the guest's own MAC and address (a guest root may forge both)."""
    return [
        [match(meta("nfproto"), "ipv4", "!="), DROP],
        [match(field("ether", "saddr"), cfg.mac, "!="), DROP],
        [match(field("ip", "saddr"), str(cfg.guest_ip), "!="), DROP],
    ]


def _guards(cfg: NetConfig) -> list[Rule]:
    """What no egress mode may allow: IPv6, spoofed sources, cloud metadata services, the sandbox pool."""
    return [
        *_not_the_guest(cfg),
        [match(field("ip", "daddr"), {"set": [addr(n) for n in METADATA]}), DROP],
        [match(field("ip", "daddr"), prefix(cfg.pool)), DROP],
    ]


def forward_rules(cfg: NetConfig, uplink: str, egress: Sequence[Rule]) -> list[Rule]:
    """Body of sb_<id>: guards, only-via-uplink, the mode's rules, drop."""
    return [*_guards(cfg), [match(meta("oifname"), uplink, "!="), DROP], *egress, [DROP]]


def input_rules(cfg: NetConfig, host_ports: Sequence[int], icmp: bool = True) -> list[Rule]:
    """Body of in_<id>: the guest reaches only its own gateway address, with ICMP (unless not `icmp`) and the
    listed TCP ports."""
    rules: list[Rule] = [
        *_not_the_guest(cfg),
        [match(field("ip", "daddr"), str(cfg.host_ip), "!="), DROP],  # another sandbox's gateway, the uplink, ...
        [ESTABLISHED, ACCEPT],
    ]
    if icmp:
        rules.append([match(meta("l4proto"), "icmp"), ACCEPT])
    if host_ports:
        rules.append([match(field("tcp", "dport"), {"set": sorted(set(host_ports))}), ACCEPT])
    if DNS_PORT in host_ports:  # the host agent's DNS server answers on UDP as well
        rules.append([match(field("udp", "dport"), DNS_PORT), ACCEPT])
    return [*rules, [DROP]]


def gateway_rules(cfg: NetConfig, host_ports: Sequence[int]) -> list[Rule]:
    """Body of gw_<id> (packets to the sandbox's gateway address from anywhere): its service ports refuse every
    interface but the sandbox's TAP. The rest returns to the input chain, where the guest's own traffic goes on."""
    if not host_ports:
        return []
    ports = sorted(set(host_ports))
    out: list[Rule] = [[match(meta("iifname"), cfg.tap, "!="), match(field("tcp", "dport"), {"set": ports}), DROP]]
    if DNS_PORT in ports:
        out.append([match(meta("iifname"), cfg.tap, "!="), match(field("udp", "dport"), DNS_PORT), DROP])
    return out


def sandbox_commands(
    name: str,
    cfg: NetConfig,
    uplink: str,
    host_ports: Sequence[int] = (),
    egress: Sequence[Rule] = NAT_EGRESS,
    gateway_icmp: bool = True,
) -> list[dict[str, Any]]:
    """The chains and map elements of one sandbox."""
    sb, inp, nat, gw = chains_of(sandbox_id(name))
    bodies = {
        sb: forward_rules(cfg, uplink, egress),
        inp: input_rules(cfg, host_ports, gateway_icmp),
        nat: [[match(meta("oifname"), uplink), {"masquerade": None}]],
        gw: gateway_rules(cfg, host_ports),
    }
    cmds: list[dict[str, Any]] = []
    for chain, rules in bodies.items():
        cmds += _chain_reset(chain)
        cmds += [_rule(chain, r, f"sandbox {name}" if i == 0 else None) for i, r in enumerate(rules)]
    elements = ((FWD_MAP, cfg.tap, sb), (IN_MAP, cfg.tap, inp), (NAT_MAP, str(cfg.guest_ip), nat),
                (GW_MAP, str(cfg.host_ip), gw))
    for map_name, key, target in elements:
        cmds.append({"add": {"element": _obj(name=map_name, elem=[[key, jump(target)]])}})
    return cmds


def render_up(
    name: str,
    cfg: NetConfig,
    uplink: str,
    host_ports: Sequence[int] = (),
    egress: Sequence[Rule] = NAT_EGRESS,
    listing: dict[str, Any] | None = None,
    gateway_icmp: bool = True,
) -> dict[str, Any]:
    """One transaction installing a sandbox; `listing` (the live table) lets it replace stale map elements.

    `gateway_icmp`: may the guest ping its gateway (not in mode offline)."""
    mine = {(FWD_MAP, cfg.tap), (IN_MAP, cfg.tap), (NAT_MAP, str(cfg.guest_ip)), (GW_MAP, str(cfg.host_ip))}
    stale = [_delete_element(m, key) for m, key, _ in _elements(listing or {}) if (m, key) in mine]
    body = sandbox_commands(name, cfg, uplink, host_ports, egress, gateway_icmp)
    return {"nftables": base_commands() + stale + body}


def render_down(listing: dict[str, Any], sids: set[str]) -> dict[str, Any] | None:
    """One transaction removing the sandboxes `sids`; the whole table once no sandbox is left. None: nothing to do."""
    if not any("table" in item for item in _items(listing)):
        return None
    if not sandbox_ids(listing) - sids:
        return {"nftables": [{"delete": {"table": {"family": FAMILY, "name": TABLE}}}]}
    cmds: list[dict[str, Any]] = []
    for sid in sorted(sids):
        mine = set(chains_of(sid))
        cmds += [_delete_element(m, key) for m, key, target in _elements(listing) if target in mine]
        for chain in sorted(mine & _chain_names(listing)):
            cmds += [{"flush": {"chain": _obj(name=chain)}}, {"delete": {"chain": _obj(name=chain)}}]
    return {"nftables": cmds} if cmds else None


# --- reading a listing (`nft -j list table inet ai_sandbox`) ------------------------------------------------------


def _items(listing: dict[str, Any]) -> list[dict[str, Any]]:
    return list(listing.get("nftables", []))


def _chain_names(listing: dict[str, Any]) -> set[str]:
    return {item["chain"]["name"] for item in _items(listing) if "chain" in item}


def _elements(listing: dict[str, Any]) -> list[tuple[str, Any, str]]:
    """(map, key, jump target) of every element of our verdict maps."""
    found = []
    for item in _items(listing):
        m = item.get("map")
        if not m or m.get("map") != "verdict":
            continue
        for key, verdict in m.get("elem", []):
            if isinstance(key, dict) and "elem" in key:  # an element with options (comment, timeout)
                key = key["elem"]["val"]
            target = (verdict.get("jump") or verdict.get("goto") or {}).get("target", "")
            found.append((m["name"], key, target))
    return found


def sandbox_ids(listing: dict[str, Any]) -> set[str]:
    """Ids of the sandboxes that have at least one chain in the table."""
    return {n.split("_", 1)[1] for n in _chain_names(listing) if n.startswith(CHAIN_PREFIXES)}


def objects_of(listing: dict[str, Any], sid: str) -> list[dict[str, Any]]:
    """Every chain, rule and map element that belongs to sandbox `sid`."""
    mine = set(chains_of(sid))
    objs = [
        item
        for item in _items(listing)
        if item.get("chain", {}).get("name") in mine or item.get("rule", {}).get("chain") in mine
    ]
    objs += [{"element": {"map": m, "key": key, "target": t}} for m, key, t in _elements(listing) if t in mine]
    return objs


# --- talking to nft -----------------------------------------------------------------------------------------------


def list_table() -> dict[str, Any]:
    """The live table as nft JSON; an empty listing when it does not exist."""
    result = run(["nft", "-j", "list", "table", FAMILY, TABLE], check=False)
    if result.returncode != 0:
        if "No such file or directory" in result.stderr:
            return {"nftables": []}
        raise _failure("read", CommandError(result.argv, result.returncode, result.stderr))
    return json.loads(result.stdout)


def apply(doc: dict[str, Any], what: str = "apply") -> None:
    """Apply a rendered document as one atomic transaction: all of it or nothing."""
    # A file rather than stdin: runner.run() cannot pass `input` at the moment (it also sets stdin).
    with tempfile.NamedTemporaryFile("w", prefix="aisb-nft-", suffix=".json") as fh:
        json.dump(doc, fh)
        fh.flush()
        try:
            run(["nft", "-j", "-f", fh.name])
        except CommandError as e:
            raise _failure(what, e) from e


def _failure(what: str, e: CommandError) -> SandboxError:
    return SandboxError(
        f"could not {what} the sandbox firewall rules: {e.message}",
        hint="this needs root (CAP_NET_ADMIN) and nftables (the nf_tables kernel module)",
    )
