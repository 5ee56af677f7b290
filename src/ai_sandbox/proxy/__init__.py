"""The per-sandbox egress proxy and credential broker: API keys never enter the guest.

    cfg = ProxyConfig(sandbox=name, listen=str(net.host_ip), allow=default_allow(), ca_dir=..., log=..., ...)
    write_config(cfg, path)                         # JSON; holds no secret
    pem = ca_cert_pem(Path(cfg.ca_dir))             # the guest trusts this CA
    runner.spawn(daemon_argv(path), log_file=..., extra_env=secrets)   # secrets only in the daemon's environment
    guest env: ANTHROPIC_API_KEY=placeholder("ANTHROPIC_API_KEY"), HTTPS_PROXY=http://<gateway>:PORT, ...
    read_log(Path(cfg.log))                         # `ai policy log`

The daemon is `python -m ai_sandbox.proxy --config FILE [--fd N]`; SIGTERM stops it. It re-reads the allow and
deny lists from `policy_file` whenever that file changes (see `write_policy`).
"""

from __future__ import annotations

import json
import os
import re
import sys
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from ai_sandbox.errors import UsageError
from ai_sandbox.proxy.broker import DEFAULT_CREDENTIALS, DEFAULT_FIELDS, placeholder, valid_field
from ai_sandbox.proxy.ca import ca_cert_pem
from ai_sandbox.proxy.log import read_log
from ai_sandbox.proxy.rules import DEFAULT_PORTS, default_allow, read_policy, write_policy

__all__ = [
    "PORT", "ProxyConfig", "placeholder", "write_config", "read_config", "daemon_argv", "ca_cert_pem", "read_log",
    "default_allow", "read_policy", "write_policy", "DEFAULT_CREDENTIALS",
]  # fmt: skip

PORT = 3128


@dataclass(kw_only=True)
class ProxyConfig:
    """Everything the proxy daemon of one sandbox needs, except the secrets (those come from its environment)."""

    sandbox: str
    listen: str  # the sandbox's gateway address
    port: int = PORT
    allow: list[str] = field(default_factory=list)
    deny: list[str] = field(default_factory=list)
    allowed_networks: list[str] = field(default_factory=list)  # non-public addresses that may be reached anyway
    credentials: dict[str, list[str]] = field(default_factory=lambda: {k: list(v) for k, v in DEFAULT_CREDENTIALS.items()})
    ca_dir: str
    log: str
    upstream_ca: str | None = None  # extra CA file trusted for upstream servers, besides the system's
    policy_file: str = ""  # allow/deny lists replacing the above while it exists; "" = policy.json beside the config
    ports: list[int] = field(default_factory=lambda: list(DEFAULT_PORTS))
    blocked_networks: list[str] = field(default_factory=list)  # e.g. the sandbox pool: refused even if public
    hosts: dict[str, list[str]] = field(default_factory=dict)  # name -> addresses, before DNS (tests, pinning)
    # where each credential goes ("header:x-api-key", "query:key"); variables not listed: Authorization only
    credential_fields: dict[str, list[str]] = field(default_factory=lambda: {k: list(v) for k, v in DEFAULT_FIELDS.items()})
    honeytokens: dict[str, str] = field(default_factory=dict)  # name -> decoy value: a request carrying one is an alert
    alerts: str = ""  # file of alert records ("" = the request log only)
    pause_pid_file: str = ""  # the VMM's pid file: SIGSTOP it on an alert ("" = do not pause)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str) -> ProxyConfig:
        """Parse and check a config; unknown keys are ignored, missing required ones are an error."""
        try:
            data = json.loads(text)
        except ValueError as e:
            raise UsageError(f"proxy config is not JSON: {e}") from None
        if not isinstance(data, dict):
            raise UsageError("proxy config must be a JSON object")
        known = {f.name for f in fields(cls)}
        try:
            cfg = cls(**{k: v for k, v in data.items() if k in known})
        except TypeError as e:
            raise UsageError(f"proxy config: {e}") from None
        cfg.validate()
        return cfg

    def validate(self) -> None:
        def strings(value: Any) -> bool:
            return isinstance(value, list) and all(isinstance(x, str) for x in value)

        checks = {
            "sandbox": isinstance(self.sandbox, str),
            "listen": isinstance(self.listen, str),
            "port": isinstance(self.port, int) and 0 <= self.port < 65536,
            "allow": strings(self.allow),
            "deny": strings(self.deny),
            "allowed_networks": strings(self.allowed_networks),
            "blocked_networks": strings(self.blocked_networks),
            "credentials": isinstance(self.credentials, dict)
            and all(re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", k) and strings(v) for k, v in self.credentials.items()),
            "hosts": isinstance(self.hosts, dict) and all(strings(v) for v in self.hosts.values()),
            "ports": isinstance(self.ports, list) and all(isinstance(p, int) and 0 < p < 65536 for p in self.ports),
            "upstream_ca": self.upstream_ca is None or isinstance(self.upstream_ca, str),
            "credential_fields": isinstance(self.credential_fields, dict)
            and all(strings(v) and all(valid_field(f) for f in v) for v in self.credential_fields.values()),
            "honeytokens": isinstance(self.honeytokens, dict)
            and all(isinstance(k, str) and isinstance(v, str) and len(v) >= 8 for k, v in self.honeytokens.items()),
            "alerts": isinstance(self.alerts, str),
            "pause_pid_file": isinstance(self.pause_pid_file, str),
        }
        bad = [name for name, ok in checks.items() if not ok]
        if bad:
            raise UsageError(f"proxy config: bad value for {', '.join(bad)}")


def write_config(cfg: ProxyConfig, path: Path) -> None:
    """Write the daemon's config (0600: it names what the sandbox may reach), atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(cfg.to_json())
    tmp.replace(path)


def read_config(path: Path) -> ProxyConfig:
    try:
        return ProxyConfig.from_json(path.read_text())
    except OSError as e:
        raise UsageError(f"cannot read proxy config {path}: {e.strerror}") from None


def daemon_argv(config_path: Path, fd: int | None = None) -> list[str]:
    """argv of the proxy daemon; with `fd`, it serves on that already-listening socket (pass it in pass_fds)."""
    argv = [sys.executable, "-m", "ai_sandbox.proxy", "--config", str(config_path)]
    return argv + (["--fd", str(fd)] if fd is not None else [])
