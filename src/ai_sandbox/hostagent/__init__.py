"""The per-sandbox host agent: host-side services the guest reaches on its gateway address.

    cfg = AgentConfig(sandbox=name, forwards=[Forward(name="ollama", listen=gw, port=11434, to_host=..., to_port=...)],
                      dns=Dns(listen=gw, log=...))                   # services chosen by the sandbox's mode
    write_config(cfg, path)
    argv = daemon_argv(path, {"ollama": fd, "dns-udp": fd, "dns-tcp": fd})   # sockets bound by the parent

The daemon is `python -m ai_sandbox.hostagent --config FILE [--fd NAME=N ...]`; SIGTERM stops it. Services:
  forward  one TCP port of the gateway to one host:port (Ollama: exactly its port, nothing else of host loopback)
  dns      a DNS server on the gateway (UDP and TCP) that asks the host's resolvers from the host side, so private
           resolvers work although the guest may not reach private ranges; every query is a JSON line in `log`
It is the start of issue 12's host agent: the proxy and the share daemon are to move in here.
"""

from __future__ import annotations

import ipaddress
import json
import sys
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from ai_sandbox.errors import UsageError

OLLAMA_PORT = 11434
DNS_PORT = 53
RESOLV_CONF = "/etc/resolv.conf"


class Forward(BaseModel):
    """Connections to listen:port are relayed to to_host:to_port."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    name: str
    listen: str
    port: int = Field(gt=0, lt=65536)
    to_host: str
    to_port: int = Field(gt=0, lt=65536)


class Dns(BaseModel):
    """A DNS server on listen:port (UDP + TCP) forwarding to the host's resolvers."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    listen: str
    port: int = Field(default=DNS_PORT, gt=0, lt=65536)
    log: str
    log_max_bytes: int = Field(default=4 << 20, ge=4096)
    upstreams: list[str] = Field(default_factory=list)  # fixed resolvers; empty: those of `resolv_conf`, re-read
    resolv_conf: str = RESOLV_CONF
    upstream_port: int = Field(default=DNS_PORT, gt=0, lt=65536)
    timeout: float = Field(default=3.0, gt=0)  # per upstream and attempt


class AgentConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    sandbox: str
    forwards: list[Forward] = Field(default_factory=list)
    dns: Dns | None = None
    drop_to_uid: int | None = 65534  # after taking its sockets and log, the agent gives up root (nobody)


def write_config(cfg: AgentConfig, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(cfg.model_dump_json(indent=1) + "\n")
    tmp.chmod(0o600)
    tmp.replace(path)


def read_config(path: Path) -> AgentConfig:
    try:
        return AgentConfig.model_validate(json.loads(path.read_text()))
    except (OSError, ValueError) as e:
        raise UsageError(f"host agent config {path}: {e}") from e


def daemon_argv(config: Path, fds: dict[str, int]) -> list[str]:
    return [sys.executable, "-m", "ai_sandbox.hostagent", "--config", str(config),
            *(a for name, fd in sorted(fds.items()) for a in ("--fd", f"{name}={fd}"))]


def ollama_target(value: str) -> tuple[str, str, int]:
    """(scheme, host, port) of OLLAMA_HOST as Ollama's own client reads it; "" means 127.0.0.1:11434.

    "0.0.0.0" (a server's listen-everywhere setting) means this host. A bad value is a UsageError.
    """
    text = value.strip()
    scheme, sep, rest = text.partition("://")
    if not sep:
        scheme, rest = "http", text
    scheme = scheme.lower()
    if scheme != "http":
        # The forward reads each request to let only inference through; it speaks plain HTTP to Ollama.
        raise UsageError(f"OLLAMA_HOST={value!r}: scheme {scheme!r} is not supported, only plain http",
                         hint="point it at Ollama's own address, e.g. OLLAMA_HOST=127.0.0.1:11434")
    default_port = OLLAMA_PORT if not sep else 80
    hostport = rest.split("/", 1)[0]
    host, port = hostport, default_port
    if hostport.startswith("["):  # [v6]:port
        h, _, tail = hostport[1:].partition("]")
        host = h
        if tail.startswith(":"):
            port = _port(tail[1:], value)
    elif hostport.count(":") == 1:
        host, p = hostport.split(":")
        port = _port(p, value)
    host = host or "127.0.0.1"
    try:
        ip = ipaddress.ip_address(host)
        if ip.is_unspecified:
            host = "127.0.0.1" if ip.version == 4 else "::1"
    except ValueError:
        if not all(part.isalnum() or "-" in part or "_" in part for part in host.split(".")):
            raise UsageError(f"OLLAMA_HOST={value!r}: {host!r} is not a host name or address") from None
    return scheme, host, port


def _port(text: str, value: str) -> int:
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise UsageError(f"OLLAMA_HOST={value!r}: {text!r} is not a TCP port", hint="e.g. OLLAMA_HOST=127.0.0.1:11434")
    return int(text)


def resolvers_from(text: str) -> list[str]:
    """The nameserver addresses of a resolv.conf; none listed means 127.0.0.1, as the C library does."""
    found = []
    for line in text.splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[0] == "nameserver":
            try:
                found.append(str(ipaddress.ip_address(parts[1])))
            except ValueError:
                continue
    return found or ["127.0.0.1"]
