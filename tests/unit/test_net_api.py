"""The public net API refuses bad input before it touches the host."""

from __future__ import annotations

import dataclasses

import pytest

from ai_sandbox import net
from ai_sandbox.errors import UsageError

pytestmark = pytest.mark.unit


def test_public_api_is_small():
    assert set(net.__all__) == {
        "DEFAULT_POOL",
        "POOL_ENV",
        "NetConfig",
        "parse_pool",
        "plan",
        "pool_from_env",
        "up",
        "down",
        "reconcile",
        "rules_of",
    }


def test_up_refuses_a_config_of_another_sandbox():
    cfg = net.plan("alpha", set(), net.DEFAULT_POOL)
    with pytest.raises(UsageError, match="expected aisb-"):
        net.up("beta", cfg)


def test_up_refuses_a_renamed_tap():
    cfg = dataclasses.replace(net.plan("alpha", set(), net.DEFAULT_POOL), tap="eth0")
    with pytest.raises(UsageError):
        net.up("alpha", cfg)


@pytest.mark.parametrize("port", [0, -1, 65536])
def test_up_refuses_impossible_ports(port):
    with pytest.raises(UsageError, match="not TCP ports"):
        net.up("alpha", net.plan("alpha", set(), net.DEFAULT_POOL), (port,))
