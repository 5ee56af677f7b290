"""The host agent of one sandbox as the lifecycle sees it: which services, config, start/stop, guest settings.

The services follow the sandbox's gateway ports (`net.policy.host_ports`): Ollama's port there is forwarded to
where OLLAMA_HOST says the host's Ollama listens; DNS there is served from the host side (modes open and nat).
"""

from __future__ import annotations

from ai_sandbox import daemons, hostagent
from ai_sandbox.config import Settings
from ai_sandbox.hostagent import DNS_PORT, OLLAMA_PORT, AgentConfig, Dns, Forward
from ai_sandbox.net import NetConfig
from ai_sandbox.state import Files, Instance
from ai_sandbox.vmm import process

WHAT = "the host agent (Ollama forward, DNS)"


def _daemon(inst: Instance) -> daemons.Daemon:
    return daemons.Daemon(WHAT, inst.path(Files.AGENT_PID), inst.path(Files.AGENT_LOG), inst.path(Files.AGENT_CONFIG))


def check(settings: Settings) -> None:
    """Raise the one-line UsageError a bad OLLAMA_HOST deserves, before anything is made."""
    hostagent.ollama_target(settings.ollama_host)


def plan(inst: Instance, cfg: NetConfig, host_ports: tuple[int, ...], settings: Settings) -> AgentConfig | None:
    """The services this sandbox gets; None when it needs no agent (mode offline). Bad OLLAMA_HOST: UsageError."""
    gw = str(cfg.host_ip)
    forwards = []
    if OLLAMA_PORT in host_ports:
        _, host, port = hostagent.ollama_target(settings.ollama_host)
        forwards.append(Forward(name="ollama", listen=gw, port=OLLAMA_PORT, to_host=host, to_port=port))
    dns = Dns(listen=gw, log=str(inst.path(Files.DNS_LOG))) if DNS_PORT in host_ports else None
    if not forwards and dns is None:
        return None
    return AgentConfig(sandbox=inst.name, forwards=forwards, dns=dns)


def configure(inst: Instance, cfg: NetConfig, host_ports: tuple[int, ...], settings: Settings) -> AgentConfig | None:
    """Write the agent's config for this start (or remove a stale one); returns it."""
    agent = plan(inst, cfg, host_ports, settings)
    if agent is None:
        process.remove(inst.path(Files.AGENT_CONFIG))
    else:
        hostagent.write_config(agent, inst.path(Files.AGENT_CONFIG))
    return agent


def start(inst: Instance) -> None:
    """Bind the agent's sockets on the gateway (no start-up race) and hand them over; nothing to do without config."""
    path = inst.path(Files.AGENT_CONFIG)
    if not path.exists():
        return
    agent = hostagent.read_config(path)
    socks, fds = [], {}
    try:
        for f in agent.forwards:
            socks.append(daemons.listening_socket("tcp", f.listen, f.port))
            fds[f.name] = socks[-1].fileno()
        if agent.dns is not None:
            for kind in ("udp", "tcp"):
                socks.append(daemons.listening_socket(kind, agent.dns.listen, agent.dns.port))
                fds[f"dns-{kind}"] = socks[-1].fileno()
    except BaseException:
        for s in socks:
            s.close()
        raise
    _daemon(inst).start(hostagent.daemon_argv(path, fds), sockets=socks)


def stop(inst: Instance) -> None:
    _daemon(inst).stop()


def expected(inst: Instance) -> bool:
    """Should an agent run for this sandbox (it had services at its last start)?"""
    return inst.path(Files.AGENT_CONFIG).exists()


def running(inst: Instance) -> bool:
    return _daemon(inst).running()


def guest_environment(cfg: NetConfig, host_ports: tuple[int, ...], settings: Settings,
                      env: dict[str, str]) -> dict[str, str]:
    """OLLAMA_HOST at the gateway where it is forwarded, and the gateway added to the NO_PROXY of `env` (the
    guest's environment so far): Ollama is reached directly, not through the egress proxy."""
    if OLLAMA_PORT not in host_ports:
        return {}
    scheme, _, _ = hostagent.ollama_target(settings.ollama_host)
    gw = str(cfg.host_ip)
    out = {"OLLAMA_HOST": f"{scheme}://{gw}:{OLLAMA_PORT}"}
    for name in ("NO_PROXY", "no_proxy"):
        if name in env and gw not in env[name].split(","):
            out[name] = f"{env[name]},{gw}"
    return out


def guest_dns(cfg: NetConfig, host_ports: tuple[int, ...]) -> list[str]:
    """The guest's name servers: its gateway where the agent serves DNS, else none."""
    return [str(cfg.host_ip)] if DNS_PORT in host_ports else []
