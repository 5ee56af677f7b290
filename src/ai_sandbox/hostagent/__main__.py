"""The host agent of one sandbox: `python -m ai_sandbox.hostagent --config FILE [--fd NAME=N ...]`.

Sockets come bound from the parent (`--fd ollama=5 --fd dns-udp=6 --fd dns-tcp=7`); a service without one binds
its own (tests). Once its sockets and log are open, a root agent drops to the configured uid: it parses what the
guest sends and needs no privilege for that. SIGTERM or SIGINT stops it with exit status 0.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import socket
import sys
from pathlib import Path

from ai_sandbox import privileges
from ai_sandbox.errors import SandboxError
from ai_sandbox.hostagent import AgentConfig, read_config
from ai_sandbox.hostagent.dns import DnsServer, QueryLog, Resolvers
from ai_sandbox.hostagent.forward import Forwarder

log = logging.getLogger("ai_sandbox.hostagent")


def _fd(text: str) -> tuple[str, int]:
    name, sep, num = text.partition("=")
    if not sep or not num.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r} is not NAME=FD")
    return name, int(num)


def _args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m ai_sandbox.hostagent", description=__doc__.splitlines()[0])
    ap.add_argument("--config", required=True, type=Path)
    ap.add_argument("--fd", type=_fd, action="append", default=[], help="NAME=FD: an inherited, bound socket")
    ap.add_argument("--debug", action="store_true")
    return ap.parse_args(argv)


def _socket(fds: dict[str, int], name: str, kind: int, host: str, port: int) -> socket.socket:
    if name in fds:
        return socket.socket(fileno=fds[name])
    s = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, kind)
    if kind == socket.SOCK_STREAM:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((host, port))
    if kind == socket.SOCK_STREAM:
        s.listen(128)
    return s


async def serve(cfg: AgentConfig, fds: dict[str, int]) -> None:
    """Run the configured services until SIGTERM/SIGINT."""
    forwards = [(f, _socket(fds, f.name, socket.SOCK_STREAM, f.listen, f.port)) for f in cfg.forwards]
    dns_server = qlog = None
    if cfg.dns is not None:
        d = cfg.dns
        udp = _socket(fds, "dns-udp", socket.SOCK_DGRAM, d.listen, d.port)
        tcp = _socket(fds, "dns-tcp", socket.SOCK_STREAM, d.listen, d.port)
        qlog = QueryLog(Path(d.log), cfg.sandbox, d.log_max_bytes)
        dns_server = DnsServer(Resolvers(d.upstreams, d.resolv_conf), qlog, d.timeout, d.upstream_port)
    if cfg.drop_to_uid is not None:
        privileges.drop_to(cfg.drop_to_uid, cfg.drop_to_uid, packages=("dns", "h11"))

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    running: list[Forwarder | DnsServer] = []
    try:
        for f, sock in forwards:
            fw = Forwarder(f.name, f.to_host, f.to_port)
            await fw.start(sock)
            running.append(fw)
            log.info("forward %s: %s:%d -> %s:%d", f.name, f.listen, f.port, f.to_host, f.to_port)
        if dns_server is not None and cfg.dns is not None:
            await dns_server.start(udp, tcp)
            running.append(dns_server)
            log.info("dns on %s:%d", cfg.dns.listen, cfg.dns.port)
        print("ai-sandbox-hostagent: ready", flush=True)
        await stop.wait()
    finally:
        for service in reversed(running):
            await service.aclose()
        if qlog is not None:
            qlog.close()
    log.info("host agent of %s stopped", cfg.sandbox)


def main(argv: list[str] | None = None) -> int:
    args = _args(argv)
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")  # fmt: skip
    try:
        asyncio.run(serve(read_config(args.config), dict(args.fd)))
    except SandboxError as e:
        print(f"ai-sandbox hostagent: {e.line()}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"ai-sandbox hostagent: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
