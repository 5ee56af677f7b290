"""Subnet allocation, names and MACs: pure functions, no host access."""

from __future__ import annotations

import json
import re
from ipaddress import IPv4Address, IPv4Network

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ai_sandbox.errors import SandboxError, UsageError
from ai_sandbox.net import NetConfig, plan, pool_from_env
from ai_sandbox.net.pool import DEFAULT_POOL, allocate, mac_for, parse_pool, sandbox_id, tap_name

pytestmark = pytest.mark.unit

N = IPv4Network


def test_first_sandbox_gets_the_first_subnet():
    assert allocate(set()) == N("10.213.0.0/30")


def test_next_free_subnet_follows_the_used_ones():
    assert allocate({N("10.213.0.0/30"), N("10.213.0.4/30")}) == N("10.213.0.8/30")


def test_a_gap_is_reused_before_the_end():
    assert allocate({N("10.213.0.4/30"), N("10.213.0.8/30")}) == N("10.213.0.0/30")


def test_used_ranges_of_any_size_are_skipped():
    assert allocate({N("10.213.0.0/24"), N("10.213.1.0/31")}) == N("10.213.1.4/30")


def test_used_ranges_outside_the_pool_do_not_matter():
    assert allocate({N("192.168.0.0/16"), N("10.0.0.0/16")}) == N("10.213.0.0/30")


def test_a_used_range_covering_the_pool_exhausts_it():
    with pytest.raises(SandboxError, match="no free /30"):
        allocate({N("10.0.0.0/8")})


def test_exhausted_pool_says_what_to_do():
    pool = N("10.9.0.0/29")
    with pytest.raises(SandboxError) as err:
        allocate({N("10.9.0.0/30"), N("10.9.0.4/30")}, pool)
    assert "AI_SANDBOX_NET_POOL" in (err.value.hint or "")


def test_larger_subnets_can_be_cut():
    assert allocate({N("10.213.0.0/30")}, prefix=29) == N("10.213.0.8/29")


def _brute_force(used: set[IPv4Network], pool: IPv4Network, prefix: int) -> IPv4Network | None:
    return next((c for c in pool.subnets(new_prefix=prefix) if not any(c.overlaps(u) for u in used)), None)


subnets_near_pool = st.builds(
    lambda addr, length: IPv4Network((addr, length), strict=False),
    st.integers(int(IPv4Address("10.212.255.0")), int(IPv4Address("10.213.1.255"))),
    st.integers(22, 32),
)


@given(used=st.sets(subnets_near_pool, max_size=12), prefix=st.sampled_from([29, 30]))
def test_allocation_is_the_lowest_non_overlapping_subnet(used, prefix):
    pool = N("10.213.0.0/24")
    expected = _brute_force(used, pool, prefix)
    if expected is None:
        with pytest.raises(SandboxError):
            allocate(used, pool, prefix)
    else:
        assert allocate(used, pool, prefix) == expected


def test_plan_gives_gateway_and_guest_addresses():
    cfg = plan("alpha", {N("10.213.0.0/30")}, DEFAULT_POOL)
    assert cfg.subnet == N("10.213.0.4/30")
    assert (cfg.host_ip, cfg.guest_ip, cfg.prefix) == (IPv4Address("10.213.0.5"), IPv4Address("10.213.0.6"), 30)
    assert cfg.tap == tap_name("alpha") and cfg.mac == mac_for("alpha") and cfg.pool == DEFAULT_POOL


def test_net_config_round_trips_through_json():
    cfg = plan("alpha", set(), N("172.30.0.0/20"))
    assert NetConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


names = st.text(min_size=1, max_size=80)


@given(names)
def test_tap_name_fits_the_kernel_limit_and_is_stable(name):
    tap = tap_name(name)
    assert re.fullmatch(r"aisb-[0-9a-f]{10}", tap) and len(tap) <= 15
    assert tap == tap_name(name) and tap[5:] == sandbox_id(name)


def test_different_names_get_different_taps():
    taps = {tap_name(f"sandbox-{i}") for i in range(2000)}
    assert len(taps) == 2000


@given(names)
def test_mac_is_stable_unicast_and_locally_administered(name):
    mac = mac_for(name)
    assert re.fullmatch(r"([0-9a-f]{2}:){5}[0-9a-f]{2}", mac) and mac == mac_for(name)
    first = int(mac[:2], 16)
    assert first & 0x02 and not first & 0x01


def test_empty_name_is_refused():
    with pytest.raises(UsageError):
        tap_name("")


def test_pool_setting_default_and_override():
    assert pool_from_env({}) == DEFAULT_POOL
    assert pool_from_env({"AI_SANDBOX_NET_POOL": " 172.31.0.0/16 "}) == N("172.31.0.0/16")


@pytest.mark.parametrize("text", ["nonsense", "10.213.0.1/16", "fd00::/64", "10.213.0.0/31"])
def test_bad_pool_settings_are_usage_errors(text):
    with pytest.raises(UsageError, match="AI_SANDBOX_NET_POOL"):
        parse_pool(text)


def test_parse_pool_accepts_a_network():
    assert parse_pool("10.99.0.0/24") == N("10.99.0.0/24")
