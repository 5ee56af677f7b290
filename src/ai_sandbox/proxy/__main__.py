"""The proxy daemon of one sandbox: `python -m ai_sandbox.proxy --config FILE [--fd N]`.

Secrets come from this process's environment (the variables named in the config's credential map), never from
argv or a file; they are taken out of the environment once read. SIGTERM or SIGINT stops it with exit status 0.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import socket
import sys
from pathlib import Path

from ai_sandbox.errors import SandboxError
from ai_sandbox.proxy import ProxyConfig, read_config
from ai_sandbox.proxy.broker import load_secrets
from ai_sandbox.proxy.server import ProxyServer

log = logging.getLogger("ai_sandbox.proxy")


def _args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m ai_sandbox.proxy", description=__doc__.splitlines()[0])
    ap.add_argument("--config", required=True, type=Path, help="the JSON config (see ai_sandbox.proxy.ProxyConfig)")
    ap.add_argument("--fd", type=int, help="serve on this inherited, already-listening socket")
    ap.add_argument("--debug", action="store_true")
    return ap.parse_args(argv)


def take_secrets(cfg: ProxyConfig) -> dict[str, str]:
    secrets = load_secrets(cfg.credentials, os.environ)
    for var in cfg.credentials:
        os.environ.pop(var, None)
    return dict(secrets)


async def serve(cfg: ProxyConfig, secrets: dict[str, str], sock: socket.socket | None = None) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    server = ProxyServer(cfg, secrets)
    await server.start(sock)
    log.info("proxy of %s listening on %s:%d", cfg.sandbox, cfg.listen, server.port)
    try:
        await stop.wait()
    finally:
        await server.aclose()
    log.info("proxy of %s stopped", cfg.sandbox)


def main(argv: list[str] | None = None) -> int:
    args = _args(argv)
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")  # fmt: skip
    try:
        cfg = read_config(args.config)
        if not cfg.policy_file:
            cfg.policy_file = str(args.config.with_name("policy.json"))
        secrets = take_secrets(cfg)
        sock = socket.socket(fileno=args.fd) if args.fd is not None else None
        asyncio.run(serve(cfg, secrets, sock))
    except SandboxError as e:
        print(f"ai-sandbox proxy: {e.line()}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"ai-sandbox proxy: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
