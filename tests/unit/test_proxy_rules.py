"""Policy matching and the default allow-list, derived from the host tools' configuration (faked here)."""

from __future__ import annotations

import ipaddress
import os
import time
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ai_sandbox.proxy import rules
from ai_sandbox.proxy.rules import Policy, PolicyFile, default_allow, host_matches, parse_networks

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(
    ("pattern", "host", "expected"),
    [
        ("api.github.com", "api.github.com", True),
        ("api.github.com", "API.GitHub.com.", True),
        ("api.github.com", "github.com", False),
        ("api.github.com", "evilapi.github.com", False),
        ("*.openai.com", "api.openai.com", True),
        ("*.openai.com", "a.b.openai.com", True),
        ("*.openai.com", "openai.com", False),
        ("*.openai.com", "notopenai.com", False),
        ("*.openai.com", "openai.com.evil.example", False),
        ("*", "anything.example", True),
    ],
)
def test_host_patterns(pattern, host, expected):
    assert host_matches(pattern, host) is expected


def _policy(**kw) -> Policy:
    base = {"allow": ("*.example.com", "api.example.org"), "deny": ("bad.example.com",)}
    return Policy(**(base | kw))


@pytest.mark.parametrize(
    ("host", "port", "allowed", "reason"),
    [
        ("www.example.com", 443, True, "allow-list: *.example.com"),
        ("api.example.org", 80, True, "allow-list: api.example.org"),
        ("bad.example.com", 443, False, "deny-list: bad.example.com"),
        ("other.example.org", 443, False, "not in allow-list"),
        ("www.example.com", 8443, False, "port 8443 not allowed"),
        ("93.184.216.34", 443, False, "IP address not allowed"),
        ("::1", 443, False, "IP address not allowed"),
    ],
)
def test_policy_check(host, port, allowed, reason):
    assert _policy().check(host, port) == rules.Verdict(allowed, reason)


def test_deny_wins_over_allow():
    policy = _policy(allow=("*",), deny=("*.example.com",))
    assert not policy.check("x.example.com", 443).allowed
    assert policy.check("x.example.net", 443).allowed


def test_ip_literals_need_an_exact_entry_or_an_allowed_network():
    assert _policy(allow=("198.51.100.7",)).check("198.51.100.7", 443).allowed
    assert not _policy(allow=("*",)).check("198.51.100.7", 443).allowed
    assert _policy(allowed_networks=parse_networks(["198.51.100.0/24"])).check("198.51.100.9", 80).allowed


@pytest.mark.parametrize(
    ("address", "ok"),
    [
        ("8.8.8.8", True), ("2606:4700::1", True), ("10.0.0.1", False), ("127.0.0.1", False), ("169.254.169.254", False),
        ("192.168.1.1", False), ("100.64.0.1", False), ("0.0.0.0", False), ("224.0.0.1", False), ("::1", False),
        ("fe80::1", False), ("fd00::1", False), ("::ffff:127.0.0.1", False), ("203.0.113.5", False),
    ],
)  # fmt: skip
def test_only_public_addresses_by_default(address, ok):
    assert _policy().address_ok(ipaddress.ip_address(address)) is ok


def test_allowed_and_blocked_networks():
    policy = _policy(allowed_networks=parse_networks(["203.0.113.0/24", "::ffff:0:0/96"]),
                     blocked_networks=parse_networks(["8.8.8.0/24"]))  # fmt: skip
    assert policy.address_ok(ipaddress.ip_address("203.0.113.5"))
    assert policy.address_ok(ipaddress.ip_address("::ffff:203.0.113.5"))  # mapped: judged as the IPv4 address
    assert not policy.address_ok(ipaddress.ip_address("8.8.8.8"))  # e.g. a sandbox pool in public space
    pool = _policy(allowed_networks=parse_networks(["10.0.0.0/8"]), blocked_networks=parse_networks(["10.213.0.0/16"]))
    assert pool.address_ok(ipaddress.ip_address("10.1.2.3"))
    assert not pool.address_ok(ipaddress.ip_address("10.213.0.1"))  # blocked wins over allowed


@given(st.from_regex(r"[a-z0-9-]{1,10}(\.[a-z0-9-]{1,10}){0,3}", fullmatch=True))
def test_a_wildcard_never_matches_outside_its_suffix(label):
    assert host_matches("*.example.com", f"{label}.example.com")
    assert not host_matches("*.example.com", f"{label}.example.com.evil")
    assert not host_matches("*.example.com", f"{label}example.com")


def test_policy_file_replaces_the_lists_and_survives_a_broken_file(tmp_path):
    path = tmp_path / "policy.json"
    pf = PolicyFile(path, _policy())
    assert pf.current().allow == ("*.example.com", "api.example.org")
    rules.write_policy(path, ["only.example.net"], [])
    assert pf.current().allow == ("only.example.net",) and pf.current().deny == ()
    path.write_text('{"allow": ["a.example"], "deny": "not a list"}')
    os.utime(path, ns=(time.time_ns(), time.time_ns() + 10**9))
    assert pf.current().allow == ("only.example.net",)
    path.write_text('{"deny": ["x.example.com"]}')
    os.utime(path, ns=(time.time_ns(), time.time_ns() + 2 * 10**9))
    assert pf.current().allow == ("*.example.com", "api.example.org")  # allow not in the file: the config's
    assert pf.current().deny == ("x.example.com",)
    path.unlink()
    assert pf.current() == _policy()


# --- default allow-list --------------------------------------------------------------------------------------


class FakeTools:
    """Answers the commands default_allow asks, like the host's tools would; records what was asked."""

    def __init__(self, answers: dict[str, str]) -> None:
        self.answers = answers
        self.asked: list[list[str]] = []

    def __call__(self, argv: list[str]) -> str:
        self.asked.append(argv)
        line = " ".join(argv)
        return next((answer for pattern, answer in self.answers.items() if pattern in line), "")


APT_ONE_LINE = (
    "deb http://mirror.example.net/debian bookworm main\n"
    "deb [arch=amd64] https://sec.example.net/ds bookworm-security main\n"
)
APT_DEB822 = (
    "Types: deb\nURIs: https://deb822.example.net/debian\nSuites: bookworm\nComponents: main\n\n"
    "Types: deb-src\nURIs: http://src-only.example.net/\nSuites: x\n"
)


@pytest.fixture
def apt_dir(tmp_path: Path) -> Path:
    (tmp_path / "sources.list.d").mkdir()
    (tmp_path / "sources.list").write_text(APT_ONE_LINE)
    (tmp_path / "sources.list.d" / "x.sources").write_text(APT_DEB822)
    return tmp_path


def test_default_allow_derives_registries_from_the_tools(apt_dir):
    tools = FakeTools({
        "npm config get registry": "https://npm.example.net/registry/\n",
        "pip config list": "global.index-url='https://pypi.example.net/simple'\n"
                           "global.extra-index-url='https://extra.example.net/simple\\nfile:///opt/wheels'\n"
                           ":env:.find-links='/opt/wheels'\n",
        "go env GOPROXY": "https://goproxy.example.net,https://alt.example.net|direct\n",
        "go env GOSUMDB": "sum.example.net\n",
    })  # fmt: skip
    hosts = default_allow(run=tools, env={}, apt_dir=apt_dir)
    assert hosts[: len(rules.AI_HOSTS) + len(rules.GITHUB_HOSTS)] == [*rules.AI_HOSTS, *rules.GITHUB_HOSTS]
    assert hosts[len(rules.AI_HOSTS) + len(rules.GITHUB_HOSTS):] == [
        "npm.example.net", "pypi.example.net", "extra.example.net", "mirror.example.net", "sec.example.net",
        "deb822.example.net", "goproxy.example.net", "alt.example.net", "sum.example.net",
    ]  # fmt: skip
    # An index-url is configured, so pip's built-in default index is not asked for.
    assert not any("-c" in argv for argv in tools.asked)


def test_without_an_index_url_pip_is_asked_for_its_own_default(apt_dir):
    tools = FakeTools({"from pip._internal": "https://pip-default.example.net/simple https://files.example.net\n"})
    hosts = default_allow(run=tools, env={"PIP_EXTRA_INDEX_URL": "https://env-extra.example.net/s"}, apt_dir=apt_dir)
    assert {"pip-default.example.net", "files.example.net", "env-extra.example.net"} <= set(hosts)


def test_environment_overrides_and_missing_tools(apt_dir):
    env = {"PIP_INDEX_URL": "http://envindex.example.net:8080/simple", "AI_SANDBOX_MIRROR": "http://local.example.net/d"}
    hosts = default_allow(run=lambda argv: "", env=env, apt_dir=apt_dir)  # no npm, no go: nothing from them
    assert "envindex.example.net" in hosts and "local.example.net" in hosts
    assert len(hosts) == len(set(hosts))
    go_off = FakeTools({"GOPROXY": "off\n", "GOSUMDB": "off\n"})
    assert rules.go_hosts(go_off) == []
    assert rules.go_hosts(FakeTools({"GOSUMDB": "sum.example.net+abc123 https://sumproxy.example.net\n"})) == [
        "sumproxy.example.net"
    ]


def test_default_allow_writes_no_registry_name_itself(apt_dir, tmp_path):
    empty = tmp_path / "empty-apt"
    empty.mkdir()
    assert default_allow(run=lambda argv: "", env={}, apt_dir=empty) == [*rules.AI_HOSTS, *rules.GITHUB_HOSTS]


def test_the_real_runner_tolerates_missing_tools(monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")
    assert rules._run(["npm", "config", "get", "registry"]) == ""


@pytest.mark.unit
@pytest.mark.parametrize("address", ["64:ff9b::a00:1", "2002:a00:1::1", "::ffff:10.0.0.1", "168.63.129.16",
                                     "100.100.100.200", "fec0::1"])
def test_the_proxy_never_connects_to_ipv4_wrapped_in_ipv6_or_a_metadata_address(address):
    assert not Policy(allow=["example.com"]).address_ok(ipaddress.ip_address(address))
