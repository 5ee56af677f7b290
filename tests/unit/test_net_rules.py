"""The nftables documents, rendered by pure functions: a golden file plus properties of up/down.

Regenerate the golden file after an intended change: AI_SANDBOX_UPDATE_GOLDEN=1 pytest tests/unit/test_net_rules.py
(then read the diff: it is the firewall).
"""

from __future__ import annotations

import copy
import json
import os
from ipaddress import IPv4Network
from pathlib import Path
from typing import Any

import pytest

from ai_sandbox.net import plan, rules
from ai_sandbox.net.pool import DEFAULT_POOL, sandbox_id

pytestmark = pytest.mark.unit

GOLDEN = Path(__file__).with_name("test_net_rules_golden.json")
A = plan("alpha", set(), DEFAULT_POOL)
B = plan("beta", {A.subnet}, DEFAULT_POOL)


def test_rendered_up_matches_the_golden_file():
    doc = rules.render_up("alpha", A, "eth0", (3128, 22, 3128))
    text = json.dumps(doc, indent=1, sort_keys=True) + "\n"
    if os.environ.get("AI_SANDBOX_UPDATE_GOLDEN"):
        GOLDEN.write_text(text)
    assert text == GOLDEN.read_text()


class FakeNft:
    """Just enough of nft's transaction semantics to follow our documents and list the result like `nft -j`."""

    def __init__(self) -> None:
        self.table = False
        self.maps: dict[str, dict[str, Any]] = {}
        self.chains: dict[str, dict[str, Any]] = {}
        self.rules: dict[str, list[dict[str, Any]]] = {}

    def apply(self, doc: dict[str, Any] | None) -> None:
        for cmd in (doc or {}).get("nftables", []):
            ((verb, body),) = cmd.items()
            ((kind, obj),) = body.items()
            getattr(self, f"_{verb}")(kind, copy.deepcopy(obj))

    def _add(self, kind: str, obj: dict[str, Any]) -> None:
        if kind == "table":
            self.table = True
        elif kind == "map":
            self.maps.setdefault(obj["name"], {**obj, "elem": []})
        elif kind == "chain":
            self.chains.setdefault(obj["name"], obj)
            self.rules.setdefault(obj["name"], [])
        elif kind == "rule":
            assert obj["chain"] in self.chains, f"rule for missing chain {obj['chain']}"
            self.rules[obj["chain"]].append(obj)
        elif kind == "element":
            elems = self.maps[obj["name"]]["elem"]
            for key, verdict in obj["elem"]:
                assert key not in [k for k, _ in elems], f"element {key} exists (nft would fail)"
                assert verdict["jump"]["target"] in self.chains
                elems.append([key, verdict])

    def _flush(self, kind: str, obj: dict[str, Any]) -> None:
        self.rules[obj["name"]] = []

    def _delete(self, kind: str, obj: dict[str, Any]) -> None:
        if kind == "table":
            self.__init__()  # type: ignore[misc]
        elif kind == "element":
            m = self.maps[obj["name"]]
            m["elem"] = [e for e in m["elem"] if e[0] not in obj["elem"]]
        elif kind == "chain":
            assert not self.rules[obj["name"]], "nft refuses to delete a chain that still has rules"
            refs = [e for m in self.maps.values() for e in m["elem"] if e[1]["jump"]["target"] == obj["name"]]
            assert not refs, "nft refuses to delete a chain still referenced"
            del self.chains[obj["name"]], self.rules[obj["name"]]

    def listing(self) -> dict[str, Any]:
        if not self.table:
            return {"nftables": []}
        items: list[dict[str, Any]] = [{"table": {"family": "inet", "name": "ai_sandbox"}}]
        items += [{"map": m} for m in self.maps.values()]
        items += [{"chain": c} for c in self.chains.values()]
        items += [{"rule": r} for rs in self.rules.values() for r in rs]
        return {"nftables": items}


def _up(nft: FakeNft, name: str, cfg=None) -> None:
    nft.apply(rules.render_up(name, cfg or plan(name, set(), DEFAULT_POOL), "eth0", listing=nft.listing()))


def test_up_twice_changes_nothing():
    nft = FakeNft()
    _up(nft, "alpha", A)
    before = json.dumps(nft.listing(), sort_keys=True)
    _up(nft, "alpha", A)
    assert json.dumps(nft.listing(), sort_keys=True) == before


def test_down_removes_exactly_one_sandbox():
    nft = FakeNft()
    _up(nft, "alpha", A)
    _up(nft, "beta", B)
    beta = rules.objects_of(nft.listing(), sandbox_id("beta"))
    nft.apply(rules.render_down(nft.listing(), {sandbox_id("alpha")}))
    assert rules.objects_of(nft.listing(), sandbox_id("alpha")) == []
    assert rules.objects_of(nft.listing(), sandbox_id("beta")) == beta
    assert rules.sandbox_ids(nft.listing()) == {sandbox_id("beta")}


def test_down_of_the_last_sandbox_removes_the_table():
    nft = FakeNft()
    _up(nft, "alpha", A)
    doc = rules.render_down(nft.listing(), {sandbox_id("alpha")})
    assert doc == {"nftables": [{"delete": {"table": {"family": "inet", "name": "ai_sandbox"}}}]}


def test_down_with_nothing_there_is_nothing_to_do():
    assert rules.render_down({"nftables": []}, {sandbox_id("alpha")}) is None
    nft = FakeNft()
    _up(nft, "beta", B)
    assert rules.render_down(nft.listing(), {sandbox_id("alpha")}) is None


def test_stale_elements_with_our_keys_are_replaced():
    # A crashed sandbox held the same guest address; its element must not block (nft: "File exists").
    nft = FakeNft()
    _up(nft, "crashed", A)
    nft.apply(rules.render_up("alpha", A, "eth0", listing=nft.listing()))
    nat = dict((k, v["jump"]["target"]) for k, v in nft.maps[rules.NAT_MAP]["elem"])
    assert nat == {str(A.guest_ip): f"nat_{sandbox_id('alpha')}"}


def test_objects_of_finds_chains_rules_and_elements():
    nft = FakeNft()
    _up(nft, "alpha", A)
    kinds = [next(iter(o)) for o in rules.objects_of(nft.listing(), sandbox_id("alpha"))]
    assert kinds.count("chain") == 4 and kinds.count("element") == 4 and kinds.count("rule") > 10


def test_elements_with_options_are_understood():
    listing = {
        "nftables": [
            {"chain": {"name": "sb_0123456789"}},
            {
                "map": {
                    "name": rules.FWD_MAP,
                    "map": "verdict",
                    "elem": [
                        [{"elem": {"val": "aisb-0123456789", "comment": "x"}}, {"jump": {"target": "sb_0123456789"}}]
                    ],
                }
            },
        ]
    }
    assert rules.objects_of(listing, "0123456789")[-1]["element"]["key"] == "aisb-0123456789"


def _chain_body(doc: dict[str, Any], chain: str) -> list[list[dict[str, Any]]]:
    return [c["add"]["rule"]["expr"] for c in doc["nftables"] if c.get("add", {}).get("rule", {}).get("chain") == chain]


def test_egress_mode_plugs_into_the_forward_chain():
    sb = f"sb_{sandbox_id('alpha')}"
    offline = _chain_body(rules.render_up("alpha", A, "eth0", egress=()), sb)
    nat = _chain_body(rules.render_up("alpha", A, "eth0"), sb)
    assert nat[:-1] == [*offline[:-1], [rules.ACCEPT]]
    assert offline[-1] == nat[-1] == [rules.DROP]  # whatever the mode, what it does not allow is dropped


def test_guards_come_before_any_egress_rule():
    sb = f"sb_{sandbox_id('alpha')}"
    allow_all = [[rules.ACCEPT]]
    body = _chain_body(rules.render_up("alpha", A, "eth0", egress=allow_all), sb)
    text = json.dumps(body[: body.index([rules.ACCEPT])])
    for must in ('"nfproto"', str(A.guest_ip), "169.254.0.0", str(DEFAULT_POOL.network_address), '"eth0"'):
        assert must in text


def test_host_ports_are_optional_and_deduplicated():
    inp = f"in_{sandbox_id('alpha')}"
    assert "dport" not in json.dumps(_chain_body(rules.render_up("alpha", A, "eth0"), inp))
    body = json.dumps(_chain_body(rules.render_up("alpha", A, "eth0", (8080, 22, 8080)), inp))
    assert '"set": [22, 8080]' in body


def test_pool_of_the_config_is_what_the_guest_may_not_reach():
    cfg = plan("alpha", set(), IPv4Network("172.29.0.0/22"))
    body = json.dumps(rules.render_up("alpha", cfg, "eth0"))
    assert '"addr": "172.29.0.0", "len": 22' in body and "10.213.0.0" not in body
