"""Egress proxy: latency and throughput through the proxy daemon vs direct, against a local server on loopback.

Usage (no root): python benchmarks/proxy.py [--requests 200] [--mib 50]
Three processes: a local upstream (HTTPS + plain HTTP on 127.0.0.2, a throwaway CA), the real proxy daemon
(`python -m ai_sandbox.proxy`), and this client. Modes: direct; tunnel (CONNECT, blind); intercept (CONNECT to a
credential host: TLS terminated, key put in, TLS again); plain HTTP direct vs through the proxy. Prints JSON with
medians and the ratios proxied/direct. Nothing leaves 127.0.0.0/8; names resolve through the proxy's host map.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
from cryptography.hazmat.primitives import serialization

from ai_sandbox.proxy import ProxyConfig, ca_cert_pem, daemon_argv, placeholder, write_config
from ai_sandbox.proxy.ca import issue_leaf, load_or_create, new_authority

UPSTREAM_IP = "127.0.0.2"
INTERCEPT, TUNNEL = "api.bench.example", "tunnel.bench.example"
BLOCK = b"x" * (1 << 20)


# --- the upstream (its own process) ----------------------------------------------------------------------------


async def _answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while head := await reader.readuntil(b"\r\n\r\n"):
            path = head.split(b" ", 2)[1].decode()
            size = int(path.rsplit("/", 1)[1]) if path.startswith("/bytes/") else 2
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % size)
            while size > 0:
                writer.write(BLOCK[: min(size, len(BLOCK))])
                size -= len(BLOCK)
                await writer.drain()
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError, asyncio.LimitOverrunError):
        pass
    finally:
        writer.close()


async def _serve_upstream(workdir: Path) -> None:
    ports = {}
    for name in (INTERCEPT, TUNNEL, "plain"):
        ctx = None
        if name != "plain":
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.load_cert_chain(workdir / f"{name}.pem")
        server = await asyncio.start_server(_answer, UPSTREAM_IP, 0, ssl=ctx)
        ports[name] = server.sockets[0].getsockname()[1]
    print(json.dumps(ports), flush=True)
    await asyncio.Event().wait()


def _write_upstream_certs(workdir: Path) -> Path:
    ca = load_or_create(workdir / "upstream-ca", "benchmark upstream CA")
    for name in (INTERCEPT, TUNNEL):
        key = new_authority("k").key
        pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())  # fmt: skip
        (workdir / f"{name}.pem").write_bytes(pem + issue_leaf(ca, name, key).public_bytes(serialization.Encoding.PEM))
    return workdir / "upstream-ca" / "ca.pem"


# --- the client ------------------------------------------------------------------------------------------------


def _client(ctx: ssl.SSLContext, proxy: str | None) -> httpx.Client:
    return httpx.Client(proxy=proxy, verify=ctx, trust_env=False, timeout=60)


def _get(client: httpx.Client, url: str, sni: str | None) -> httpx.Response:
    ext = {"sni_hostname": sni} if sni else None
    return client.get(url, headers={"x-api-key": placeholder("BENCH_KEY")}, extensions=ext)


def latency_ms(ctx: ssl.SSLContext, proxy: str | None, url: str, sni: str | None, n: int, fresh: bool) -> float:
    """Median time to the first byte: on one kept-alive connection, or on a fresh connection each time."""
    times = []
    client = _client(ctx, proxy)
    try:
        for _ in range(n):
            if fresh:
                client.close()
                client = _client(ctx, proxy)
            t0 = time.perf_counter()
            ext = {"sni_hostname": sni} if sni else None
            with client.stream("GET", url, extensions=ext) as r:
                body = r.iter_raw(1)
                next(body, None)
                times.append(time.perf_counter() - t0)
                for _ in body:
                    pass
    finally:
        client.close()
    return statistics.median(times) * 1000


def throughput_mib_s(ctx: ssl.SSLContext, proxy: str | None, url: str, sni: str | None, mib: int) -> float:
    with _client(ctx, proxy) as client:
        _get(client, url.replace("/bytes/", "/bytes/1"), sni)  # connection and TLS set up outside the clock
        t0 = time.perf_counter()
        got = 0
        ext = {"sni_hostname": sni} if sni else None
        with client.stream("GET", url, extensions=ext) as r:
            for chunk in r.iter_raw(1 << 20):
                got += len(chunk)
        elapsed = time.perf_counter() - t0
    assert got == mib << 20, got
    return mib / elapsed


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--mib", type=int, default=50)
    ap.add_argument("--upstream", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.upstream:
        return asyncio.run(_serve_upstream(args.upstream))
    with tempfile.TemporaryDirectory(prefix="ai-bench-proxy-") as tmp:
        print(json.dumps(_run(Path(tmp), args.requests, args.mib), indent=1))


def _run(work: Path, n: int, mib: int) -> dict[str, object]:
    upstream_ca = _write_upstream_certs(work)
    upstream = subprocess.Popen([sys.executable, __file__, "--upstream", str(work)], stdout=subprocess.PIPE)
    daemon = None
    try:
        ports = json.loads(upstream.stdout.readline())  # type: ignore[union-attr]
        cfg = ProxyConfig(
            sandbox="bench", listen="127.0.0.1", port=0,
            allow=[INTERCEPT, TUNNEL, "plain.bench.example", f"{INTERCEPT}:{ports[INTERCEPT]}", f"{TUNNEL}:{ports[TUNNEL]}"],
            allowed_networks=["127.0.0.0/8"], ports=sorted(ports.values()), credentials={"BENCH_KEY": [INTERCEPT]},
            ca_dir=str(work / "ca"), log=str(work / "proxy.log"), upstream_ca=str(upstream_ca),
            hosts={h: [UPSTREAM_IP] for h in (INTERCEPT, TUNNEL, "plain.bench.example")},
        )  # fmt: skip
        listener = socket.create_server(("127.0.0.1", 0))
        cfg.port = listener.getsockname()[1]
        write_config(cfg, work / "proxy.json")
        ctx = ssl.create_default_context(cadata=ca_cert_pem(work / "ca"))
        ctx.load_verify_locations(str(upstream_ca))
        daemon = subprocess.Popen(daemon_argv(work / "proxy.json", fd=listener.fileno()), pass_fds=[listener.fileno()],
                                  env={**os.environ, "BENCH_KEY": "bench-secret"}, stderr=subprocess.DEVNULL)  # fmt: skip
        listener.close()
        proxy = f"http://127.0.0.1:{cfg.port}"
        modes = {
            "direct": (None, f"https://{UPSTREAM_IP}:{ports[TUNNEL]}", TUNNEL),
            "tunnel": (proxy, f"https://{TUNNEL}:{ports[TUNNEL]}", None),
            "intercept": (proxy, f"https://{INTERCEPT}:{ports[INTERCEPT]}", None),
            "plain_direct": (None, f"http://{UPSTREAM_IP}:{ports['plain']}", None),
            "plain_proxy": (proxy, f"http://plain.bench.example:{ports['plain']}", None),
        }
        result: dict[str, object] = {"machine": f"{platform.machine()} {os.cpu_count()} CPUs", "requests": n, "mib": mib}
        for mode, (via, base, sni) in modes.items():
            result[f"{mode}_ttfb_keepalive_ms"] = round(latency_ms(ctx, via, base + "/small", sni, n, fresh=False), 3)
            result[f"{mode}_ttfb_fresh_ms"] = round(latency_ms(ctx, via, base + "/small", sni, max(n // 4, 5), True), 3)
            best = max(throughput_mib_s(ctx, via, base + f"/bytes/{mib << 20}", sni, mib) for _ in range(3))
            result[f"{mode}_mib_s"] = round(best, 1)  # best of three: the least disturbed by other load
        for mode, ref in (("tunnel", "direct"), ("intercept", "direct"), ("plain_proxy", "plain_direct")):
            for metric in ("ttfb_keepalive_ms", "ttfb_fresh_ms", "mib_s"):
                a, b = result[f"{mode}_{metric}"], result[f"{ref}_{metric}"]
                result[f"ratio_{mode}_{metric}"] = round(a / b, 2) if b else None  # type: ignore[operator]
        return result
    finally:
        for proc in (daemon, upstream):
            if proc is not None:
                proc.terminate()
                proc.wait(10)


if __name__ == "__main__":
    main()
