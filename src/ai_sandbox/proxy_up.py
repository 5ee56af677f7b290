"""The egress proxy of one sandbox as the lifecycle sees it: config, CA, daemon start/stop, guest settings.

Secrets reach the daemon only through its environment (never argv, never a file); the guest gets placeholders.
"""

from __future__ import annotations

import os
import re
import socket
import time

from ai_sandbox import proxy, runner
from ai_sandbox.config import Settings
from ai_sandbox.errors import UsageError, VMError
from ai_sandbox.net import NetConfig
from ai_sandbox.proxy import honey
from ai_sandbox.state import Files, Instance
from ai_sandbox.vmm import process

GUEST_CA = "/usr/local/share/ca-certificates/ai-sandbox-proxy.crt"
BUNDLE = "/etc/ssl/certs/ca-certificates.crt"
# Deployment hooks (also what the tests use): pin names to addresses, trust an extra upstream CA, and let the
# proxy reach non-public networks (documentation ranges count as non-public).
HOSTS_ENV = "AI_SANDBOX_PROXY_HOSTS"  # "name=addr,name=addr"
UPSTREAM_CA_ENV = "AI_SANDBOX_PROXY_UPSTREAM_CA"
ALLOWED_NETS_ENV = "AI_SANDBOX_PROXY_ALLOWED_NETWORKS"  # "203.0.113.0/24,..."
PAUSE_ENV = "AI_SANDBOX_HONEYTOKEN_PAUSE"  # "1": a honeytoken alert pauses the VM
HONEYTOKENS = "honeytokens.json"  # in the instance dir, 0600, made at the first start
ALERTS = "proxy-alerts.jsonl"


def _hosts() -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for item in filter(None, os.environ.get(HOSTS_ENV, "").split(",")):
        name, _, addr = item.partition("=")
        out.setdefault(name.strip(), []).append(addr.strip())
    return out


def configure(inst: Instance, cfg: NetConfig, settings: Settings) -> str:
    """Write the proxy config; returns the CA certificate (PEM) the guest must trust."""
    ca_dir = inst.path(Files.PROXY_CA)
    pause = os.environ.get(PAUSE_ENV, "") == "1"
    pcfg = proxy.ProxyConfig(
        sandbox=inst.name, listen=str(cfg.host_ip), port=proxy.PORT, allow=proxy.default_allow(),
        allowed_networks=[n for n in os.environ.get(ALLOWED_NETS_ENV, "").split(",") if n],
        ca_dir=str(ca_dir), log=str(inst.path(Files.PROXY_LOG)), upstream_ca=os.environ.get(UPSTREAM_CA_ENV) or None,
        blocked_networks=[str(cfg.pool)], hosts=_hosts(), honeytokens=honeytokens(inst),
        alerts=str(inst.path(ALERTS)), pause_pid_file=str(inst.path(Files.PID)) if pause else "",
    )
    proxy.write_config(pcfg, inst.path(Files.PROXY_CONFIG))
    return proxy.ca_cert_pem(ca_dir)


def start(inst: Instance, cfg: NetConfig, settings: Settings) -> None:
    """Bind the proxy's socket on the gateway (no start-up race) and hand it to the daemon."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        # Only connections that arrive on the sandbox's own TAP: not the host's processes (they come in on lo),
        # not other sandboxes. Needs CAP_NET_RAW; without it the firewall rule on the port is the only guard.
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, cfg.tap.encode())
        except PermissionError:
            pass
        sock.bind((str(cfg.host_ip), proxy.PORT))
        sock.listen(128)
        log = inst.path(Files.PROXY_DAEMON_LOG)
        proc = runner.spawn(proxy.daemon_argv(inst.path(Files.PROXY_CONFIG), fd=sock.fileno()), log_file=log,
                            extra_env=settings.secrets(), pass_fds=[sock.fileno()])
    finally:
        sock.close()
    inst.path(Files.PROXY_PID).write_text(f"{proc.pid}\n")
    time.sleep(0.2)
    if proc.poll() is not None:
        raise VMError("the egress proxy exited at start", log=str(log))


def honeytokens(inst: Instance) -> dict[str, str]:
    """The sandbox's decoy credentials (made once, kept in the instance dir)."""
    try:
        return honey.ensure(inst.path(HONEYTOKENS))
    except (OSError, ValueError) as e:
        raise VMError(f"cannot read the honeytokens of {inst.name}: {e}") from None


def guest_files(inst: Instance, settings: Settings) -> list[dict[str, object]]:
    """Files the config drive writes in the guest: the decoy AWS credentials of the guest user."""
    tokens = honeytokens(inst)
    return [{"path": ".aws/credentials", "in_home": True, "content": honey.aws_credentials(tokens), "mode": 0o600}]


def alerts(inst: Instance) -> tuple[int, bool]:
    """Honeytoken alerts of the sandbox so far, and whether one of them paused the VM."""
    count, paused = 0, False
    try:
        fd = os.open(inst.path(ALERTS), os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except OSError:
        return 0, False
    with os.fdopen(fd, "rb") as fh:
        for line in fh.read(1 << 20).splitlines():
            count += 1
            paused = paused or b'"paused": true' in line
    return count, paused


def stop(inst: Instance) -> None:
    pid = process.read_pid(inst.path(Files.PROXY_PID))
    if pid is not None and process.alive(pid):
        process.kill(pid, timeout=5)
    process.remove(inst.path(Files.PROXY_PID))


def running(inst: Instance) -> bool:
    return process.alive_from(inst.path(Files.PROXY_PID))


def guest_environment(cfg: NetConfig, settings: Settings, tokens: dict[str, str] | None = None) -> dict[str, str]:
    """Proxy settings every tool understands, the CA bundle, placeholders instead of the keys, and the decoy."""
    url = f"http://{cfg.host_ip}:{proxy.PORT}"
    env = {name: url for name in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy")}
    env |= {"NO_PROXY": "localhost,127.0.0.1,::1", "no_proxy": "localhost,127.0.0.1,::1", "NODE_USE_ENV_PROXY": "1",
            "NODE_EXTRA_CA_CERTS": GUEST_CA, "SSL_CERT_FILE": BUNDLE, "REQUESTS_CA_BUNDLE": BUNDLE,
            "GIT_SSL_CAINFO": BUNDLE}
    secrets = settings.secrets()
    env |= {name: proxy.placeholder(name) for name in secrets}
    if tokens is not None:
        env[honey.ENV_TOKEN] = tokens[honey.ENV_TOKEN]
    if "GITHUB_TOKEN" in secrets:
        env["GH_TOKEN"] = proxy.placeholder("GITHUB_TOKEN")
    return env


def apt_proxy(cfg: NetConfig) -> str:
    # sudo drops the environment, so apt gets its proxy from its own configuration.
    url = f"http://{cfg.host_ip}:{proxy.PORT}"
    return f'Acquire::http::Proxy "{url}";\nAcquire::https::Proxy "{url}";\n'


_HOST = re.compile(r"^(\*\.)?[a-z0-9]([a-z0-9-]*[a-z0-9])?(\.[a-z0-9]([a-z0-9-]*[a-z0-9])?)*(:[0-9]{1,5})?$")


def lists(inst: Instance) -> tuple[list[str], list[str]]:
    """The allow and deny lists in force for the sandbox (its policy file, else its config's defaults)."""
    path = inst.path(Files.PROXY_CONFIG)
    if not path.exists():
        raise UsageError(f"sandbox {inst.name} has no egress proxy", hint="it runs in --network proxy mode only")
    pcfg = proxy.read_config(path)
    pol = inst.path(Files.POLICY)
    data = proxy.read_policy(pol) if pol.exists() else {}
    return list(data.get("allow", pcfg.allow)), list(data.get("deny", pcfg.deny))


def change(inst: Instance, host: str, verdict: str) -> tuple[list[str], list[str]]:
    """Allow or deny `host` (or `*.suffix`); the running proxy picks it up at its next request."""
    host = host.strip().lower()
    if not _HOST.match(host):
        raise UsageError(f"{host!r} is not a host name or *.domain pattern (optionally :port)")
    allow, deny = lists(inst)
    allow = [h for h in allow if h != host] + ([host] if verdict == "allow" else [])
    deny = [h for h in deny if h != host] + ([host] if verdict == "deny" else [])
    proxy.write_policy(inst.path(Files.POLICY), allow, deny)
    return allow, deny
