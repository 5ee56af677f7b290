"""Egress policy of one sandbox: which hosts, ports and addresses its proxy may reach, and the default allow-list.

Host patterns are exact names (`api.github.com`), `*.suffix` wildcards (`*.openai.com` matches any name below
`openai.com`, not `openai.com` itself) or `*` (any name). IP-literal targets pass only when the address is listed
exactly or lies in `allowed_networks`. Deny wins over allow; anything not allowed is denied. Package-registry hosts
of the default allow-list come from the host tools' own configuration at run time, never from names in this file.
"""

from __future__ import annotations

import ast
import ipaddress
import json
import logging
import os
import re
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from urllib.parse import urlsplit

from ai_sandbox import runner
from ai_sandbox.addresses import is_public
from ai_sandbox.errors import CommandError
from ai_sandbox.image.sources import APT_DIR, host_sources

log = logging.getLogger(__name__)

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

DEFAULT_PORTS = (80, 443)
AI_HOSTS = (
    "api.anthropic.com", "*.anthropic.com", "api.openai.com", "*.openai.com", "chatgpt.com",
    "generativelanguage.googleapis.com", "oauth2.googleapis.com", "cloudcode-pa.googleapis.com",
    "opencode.ai", "*.opencode.ai", "models.dev",
)  # fmt: skip
GITHUB_HOSTS = ("github.com", "api.github.com", "*.githubusercontent.com", "codeload.github.com", "uploads.github.com")


def normalize_host(host: str) -> str:
    """Lower case, no trailing dot, no IPv6 brackets."""
    return host.strip().strip("[]").rstrip(".").lower()


def ip_literal(host: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(normalize_host(host))
    except ValueError:
        return None


def host_matches(pattern: str, host: str) -> bool:
    """`pattern` is an exact host, `*.suffix` (subdomains only) or `*` (any name)."""
    pattern, host = normalize_host(pattern), normalize_host(host)
    if pattern == "*":
        return True
    if pattern.startswith("*."):
        return host.endswith(pattern[1:]) and len(host) > len(pattern) - 1
    return pattern == host


def split_entry(entry: str) -> tuple[str, int | None]:
    """`host`, `*.suffix`, `[v6]`, `host:port` → (pattern, port or None)."""
    entry = entry.strip()
    if entry.startswith("["):
        host, _, rest = entry[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else ""
    elif entry.count(":") == 1:
        host, _, port = entry.partition(":")
    else:
        host, port = entry, ""
    if port and re.fullmatch(r"[0-9]{1,5}", port) and 0 < int(port) < 65536:
        return host, int(port)
    return (host, None) if not port else (entry, -1)  # a bad port matches no port at all


def first_match(patterns: Iterable[str], host: str, port: int | None = None) -> str | None:
    """The first pattern naming `host` (and, when a pattern carries a port, `port`)."""
    for p in patterns:
        pattern, want = split_entry(p)
        if host_matches(pattern, host) and (want is None or want == port):
            return p
    return None


@dataclass(frozen=True)
class Verdict:
    allowed: bool
    reason: str


@dataclass(frozen=True)
class Policy:
    """One snapshot of the rules; `PolicyFile` swaps in a new one when the policy file changes."""

    allow: tuple[str, ...] = ()
    deny: tuple[str, ...] = ()
    ports: tuple[int, ...] = DEFAULT_PORTS
    allowed_networks: tuple[IPNetwork, ...] = ()
    blocked_networks: tuple[IPNetwork, ...] = ()  # the sandbox pool: refused even when public or allowed

    def check(self, host: str, port: int, connect: bool = False) -> Verdict:
        """May a request go to host:port at all (before resolving)? A CONNECT tunnel goes to 443 only, unless an
        allow entry names the port (`host:8443`); an entry with a port allows (or denies) that port only."""
        denied = first_match(self.deny, host, port)
        if denied:
            return Verdict(False, f"deny-list: {denied}")
        named = first_match([p for p in self.allow if split_entry(p)[1] is not None], host, port)
        ip = ip_literal(host)
        if ip is not None:
            listed = (str(ip), None) in {split_entry(a) for a in self.allow}
            if not (named or listed or self._in(ip, self.allowed_networks)):
                return Verdict(False, "IP address not allowed")
            reason = "allowed address"
        else:
            bare = first_match([p for p in self.allow if split_entry(p)[1] is None], host, port)
            if not (named or bare):
                return Verdict(False, "not in allow-list")
            reason = f"allow-list: {named or bare}"
        if named is None:
            if connect and port != 443:
                return Verdict(False, f"CONNECT to port {port} not allowed (only 443, or a host:port entry)")
            if port not in self.ports:
                return Verdict(False, f"port {port} not allowed")
        return Verdict(True, reason)

    def address_ok(self, ip: IPAddress) -> bool:
        """May we connect to this resolved address? Never to blocked_networks (the sandbox pool: other sandboxes and
        the host's gateway addresses); non-public ones only inside allowed_networks (anti-DNS-rebinding)."""
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        if self._in(ip, self.blocked_networks):
            return False
        return self._in(ip, self.allowed_networks) or is_public(ip)

    @staticmethod
    def _in(ip: IPAddress, networks: Iterable[IPNetwork]) -> bool:
        return any(ip.version == n.version and ip in n for n in networks)


def parse_networks(items: Iterable[str]) -> tuple[IPNetwork, ...]:
    return tuple(ipaddress.ip_network(i, strict=False) for i in items)


def read_policy(path: Path) -> dict[str, list[str]]:
    """The allow/deny lists of a policy file ({"allow": [...], "deny": [...]}); a missing key is left out."""
    data = json.loads(path.read_text())
    if not isinstance(data, dict):
        raise ValueError(f"{path}: not a JSON object")
    out: dict[str, list[str]] = {}
    for key in ("allow", "deny"):
        if key in data:
            if not isinstance(data[key], list) or not all(isinstance(x, str) for x in data[key]):
                raise ValueError(f"{path}: {key} must be a list of strings")
            out[key] = list(data[key])
    return out


def write_policy(path: Path, allow: Sequence[str], deny: Sequence[str]) -> None:
    """Replace the policy file atomically (a running proxy picks it up at its next request)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"allow": list(allow), "deny": list(deny)}, indent=1) + "\n")
    tmp.replace(path)


@dataclass
class PolicyFile:
    """The policy in force: `base`, with allow/deny replaced by the policy file's whenever it exists and parses."""

    path: Path | None
    base: Policy
    _mtime: float | None = field(default=None, init=False)
    _current: Policy | None = field(default=None, init=False)

    def current(self) -> Policy:
        """Checked at each request: one stat() call; a broken file keeps the previous policy."""
        try:
            mtime = self.path.stat().st_mtime_ns if self.path else None
        except OSError:
            mtime = None
        if self._current is not None and mtime == self._mtime:
            return self._current
        policy = self.base
        if mtime is not None and self.path is not None:
            try:
                lists = read_policy(self.path)
                policy = replace(self.base, **{k: tuple(v) for k, v in lists.items()})
            except (OSError, ValueError) as e:
                log.warning("ignoring policy file %s: %s", self.path, e)
                policy = self._current or self.base
        self._mtime, self._current = mtime, policy
        return policy


# --- the default allow-list ------------------------------------------------------------------------------------

Run = Callable[[list[str]], str]


def _run(argv: list[str]) -> str:
    """stdout of a host tool, or "" if it is missing or fails: a missing tool contributes no hosts."""
    try:
        return runner.run(argv, check=False, timeout=20).stdout
    except CommandError:
        return ""


def url_host(url: str) -> str | None:
    """Host of an http(s) URL, else None (file://, bare paths, "direct", "off")."""
    try:
        parts = urlsplit(url.strip())
        return normalize_host(parts.hostname) if parts.scheme in ("http", "https") and parts.hostname else None
    except ValueError:
        return None


def npm_hosts(run: Run) -> list[str]:
    return [h for h in [url_host(run(["npm", "config", "get", "registry"]))] if h]


def _pip_config(run: Run) -> dict[str, list[str]]:
    values: dict[str, list[str]] = {}
    for line in run([sys.executable, "-m", "pip", "config", "list"]).splitlines():
        key, sep, raw = line.partition("=")
        if not sep:
            continue
        try:
            value = ast.literal_eval(raw.strip())
        except (ValueError, SyntaxError):
            value = raw.strip()
        values.setdefault(key.rsplit(".", 1)[-1], []).extend(str(value).split())
    return values


def pip_hosts(run: Run, env: Mapping[str, str]) -> list[str]:
    cfg = _pip_config(run)
    index = env.get("PIP_INDEX_URL", "").split() or cfg.get("index-url", [])
    extra = env.get("PIP_EXTRA_INDEX_URL", "").split() + cfg.get("extra-index-url", [])
    urls = list(index) + extra
    if not index:  # pip's built-in default index, asked of pip itself
        code = "from pip._internal.models.index import PyPI as P; print(P.simple_url, 'https://' + P.file_storage_domain)"
        urls += run([sys.executable, "-c", code]).split()
    return [h for h in map(url_host, urls) if h]


def apt_hosts(env: Mapping[str, str], apt_dir: Path = APT_DIR) -> list[str]:
    uris = [s.uri for s in host_sources(apt_dir)]
    if env.get("AI_SANDBOX_MIRROR"):
        uris.insert(0, env["AI_SANDBOX_MIRROR"])
    return [h for h in map(url_host, uris) if h]


def go_hosts(run: Run) -> list[str]:
    hosts = [url_host(u) for u in run(["go", "env", "GOPROXY"]).replace("|", ",").split(",")]
    sumdb = run(["go", "env", "GOSUMDB"]).split()
    if sumdb and sumdb[0] != "off":
        hosts.append(url_host(sumdb[1]) if len(sumdb) > 1 else normalize_host(sumdb[0].split("+", 1)[0]))
    return [h for h in hosts if h]


def default_allow(run: Run = _run, env: Mapping[str, str] | None = None, apt_dir: Path = APT_DIR) -> list[str]:
    """AI providers, GitHub, and the registries the host's npm, pip, apt and Go are configured to use.

    A tool that is missing or fails adds nothing.
    """
    env = os.environ if env is None else env
    registries = [*npm_hosts(run), *pip_hosts(run, env), *apt_hosts(env, apt_dir), *go_hosts(run)]
    found = [*AI_HOSTS, *GITHUB_HOSTS, *registries]
    return list(dict.fromkeys(found))
