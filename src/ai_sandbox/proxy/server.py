"""The egress proxy of one sandbox: an HTTP/1.1 forward proxy with a domain policy and a credential broker.

    GET http://host/…   policy → resolve → forward over plain TCP (placeholders stay: never a secret in clear text)
    CONNECT host:port   policy (443 only, unless an allow entry names the port) → resolve → blind tunnel, once the
                        ClientHello's server name is the CONNECT host; or, when the host has a credential, TLS is
                        terminated with a leaf of the sandbox CA, each request is checked (Host = CONNECT target),
                        gets its credential in its own field and goes on over TLS verified against the system's trust
                        store; what comes back has the real keys masked

Every request head (and body, where the proxy sees it) is watched for the sandbox's honeytokens: a hit is refused,
logged as an alert and, if configured, pauses the VM.

The proxy resolves names itself and connects only to the addresses it checked, so a name that resolves to a
private, loopback or link-local address (DNS rebinding) is refused unless `allowed_networks` names it.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import socket
import ssl
import threading
from collections.abc import Awaitable, Callable, Iterator, Mapping
from pathlib import Path
from urllib.parse import urlsplit

from ai_sandbox.proxy import ProxyConfig, tunnel
from ai_sandbox.proxy.broker import Broker
from ai_sandbox.proxy.ca import LeafCache, load_or_create, sni_of
from ai_sandbox.proxy.honey import Pauser
from ai_sandbox.proxy.log import ALLOW, DENY, RequestLog
from ai_sandbox.proxy.relay import CONNECT_TIMEOUT, Failed, Relay, Target, Upstream, inner_target, open_upstream
from ai_sandbox.proxy.rules import Policy, PolicyFile, ip_literal, normalize_host, parse_networks
from ai_sandbox.proxy.scrub import Hit, Scanner
from ai_sandbox.proxy.sni import BadHello
from ai_sandbox.proxy.wire import BadMessage, Head, error_response, pipe, read_head, request_framing, split_authority

log = logging.getLogger(__name__)

Resolver = Callable[[str, int], Awaitable[list[str]]]
PLAIN_METHODS = {"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"}
IDLE_TIMEOUT = 120.0
TLS_TIMEOUT = 30.0
MAX_CONNECTIONS = 512
LINGER_SECONDS = 2.0
LINGER_BYTES = 1 << 20


async def system_resolver(host: str, port: int) -> list[str]:
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


def mapped_resolver(hosts: Mapping[str, list[str]], fallback: Resolver | None = system_resolver) -> Resolver:
    """Names in `hosts` resolve to the listed addresses; others go to `fallback` (None: they fail)."""
    table = {normalize_host(k): list(v) for k, v in hosts.items()}

    async def resolve(host: str, port: int) -> list[str]:
        if host in table:
            return table[host]
        if fallback is None:
            raise OSError(f"unknown host {host}")
        return await fallback(host, port)

    return resolve


def upstream_context(extra_ca: str | None) -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    if extra_ca:
        ctx.load_verify_locations(extra_ca)
    ctx.set_alpn_protocols(["http/1.1"])
    return ctx


def policy_of(cfg: ProxyConfig) -> PolicyFile:
    base = Policy(tuple(cfg.allow), tuple(cfg.deny), tuple(cfg.ports), parse_networks(cfg.allowed_networks),
                  parse_networks(cfg.blocked_networks))  # fmt: skip
    return PolicyFile(Path(cfg.policy_file) if cfg.policy_file else None, base)


async def _next_head(reader: asyncio.StreamReader):
    """The next request head on a kept-alive connection, or None once the client is gone or idle too long."""
    try:
        return await asyncio.wait_for(read_head(reader, request=True), IDLE_TIMEOUT)
    except (EOFError, TimeoutError):
        return None

class ProxyServer:
    def __init__(
        self, cfg: ProxyConfig, secrets: Mapping[str, str], *, resolver: Resolver | None = None,
        policy: PolicyFile | None = None,
    ) -> None:  # fmt: skip
        self.cfg = cfg
        self.policy = policy or policy_of(cfg)
        self.broker = Broker(cfg.credentials, secrets, cfg.credential_fields)
        self.leaves = LeafCache(load_or_create(Path(cfg.ca_dir)))
        self.log = RequestLog(Path(cfg.log), cfg.sandbox, alerts=Path(cfg.alerts) if cfg.alerts else None)
        self.resolver = resolver or mapped_resolver(cfg.hosts)
        self.upstream_tls = upstream_context(cfg.upstream_ca)
        self.honey = Scanner(dict(cfg.honeytokens))
        self.pauser = Pauser(Path(cfg.pause_pid_file) if cfg.pause_pid_file else None)
        self.relay = Relay(self.broker, self.log, self.upstream_tls, Scanner(self.broker.secrets()), self.honey)
        self.max_connections = MAX_CONNECTIONS
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self, sock: socket.socket | None = None) -> None:
        """Listen on cfg.listen:cfg.port, or on an already-listening socket."""
        if sock is not None:
            self._server = await asyncio.start_server(self._client, sock=sock)
        else:
            self._server = await asyncio.start_server(self._client, self.cfg.listen, self.cfg.port)

    @property
    def port(self) -> int:
        assert self._server is not None
        return int(self._server.sockets[0].getsockname()[1])

    async def aclose(self) -> None:
        """Stop listening, end every connection, close the log."""
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()
        self.log.close()

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        if len(self._tasks) >= self.max_connections:  # a guest must not exhaust the host's file descriptors
            self.log.record("", "", 0, DENY, "too many connections", 503)
            writer.write(error_response(503, "too many connections"))
            writer.close()
            return
        self._tasks.add(task)
        try:
            await self._session(reader, writer)
            await _linger(reader, writer)
        except asyncio.CancelledError:
            pass  # shutting down: a task that ends cancelled makes asyncio's stream callback log a traceback
        except (OSError, EOFError, BadMessage, TimeoutError, asyncio.IncompleteReadError) as e:
            log.debug("connection ended: %r", e)
        except Exception:
            log.exception("proxy connection failed")
        finally:
            self._tasks.discard(task)
            writer.close()

    def _refuse(self, writer: asyncio.StreamWriter, method: str, host: str, port: int, e: Failed | BadMessage) -> None:
        verdict = e.verdict if isinstance(e, Failed) else DENY
        self.log.record(method, host, port, verdict, e.reason, e.status)
        writer.write(error_response(e.status, e.reason))

    def _watch(self, head: Head) -> None:
        """Raises Hit when the request line or a header (name or value) carries a honeytoken."""
        if self.honey:
            for text in (head.first[1], *(p for h in head.headers for p in h)):
                name = self.honey.detect_text(text)
                if name:
                    raise Hit(name)

    def _alert(self, writer: asyncio.StreamWriter, method: str, host: str, port: int, hit: Hit) -> None:
        """A honeytoken on its way out: refused, an alert logged, the VM paused if so configured."""
        paused = self.pauser.pause()
        reason = f"honeytoken {hit.name} sent" + ("; VM paused" if paused else "")
        log.warning("sandbox %s: %s to %s:%d", self.cfg.sandbox, reason, host, port)
        self.log.alert(method, host, port, reason, paused)
        if not hit.answered:
            writer.write(error_response(403, "refused"))

    async def _session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            try:
                head = await _next_head(reader)
            except BadMessage as e:
                return self._refuse(writer, "", "", 0, e)
            if head is None:
                return
            if head.first[0] == "CONNECT":
                return await self._connect(head, reader, writer)
            if not await self._plain(head, reader, writer):
                return
            await writer.drain()

    async def _admit(self, host: str, port: int, tls: bool = False) -> tuple[Target, str]:
        """Policy, then resolution, then the addresses' check; raises Failed. `tls`: a CONNECT tunnel."""
        policy = self.policy.current()
        verdict = policy.check(host, port, connect=tls)
        if not verdict.allowed:
            raise Failed(403, verdict.reason)
        literal = ip_literal(host)
        if literal is not None:
            addresses = [str(literal)]
        else:
            try:
                addresses = await asyncio.wait_for(self.resolver(host, port), CONNECT_TIMEOUT)
            except (OSError, TimeoutError, UnicodeError):
                raise Failed(502, "cannot resolve the host", ALLOW) from None
        good = [a for a in addresses if policy.address_ok(ipaddress.ip_address(a))]
        if not good:
            raise Failed(403, "resolves to a non-public address")
        return Target(host, port, good, tls and self.broker.intercepts(host)), verdict.reason

    async def _connect(self, head: Head, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            host, port = split_authority(head.first[1], None)
        except BadMessage as e:
            return self._refuse(writer, "CONNECT", head.first[1], 0, e)
        try:
            self._watch(head)
        except Hit as hit:
            return self._alert(writer, "CONNECT", host, port, hit)
        try:
            target, why = await self._admit(host, port, tls=True)
            upstream = await open_upstream(target, self.upstream_tls)
        except Failed as e:
            return self._refuse(writer, "CONNECT", host, port, e)
        conn: list[Upstream | None] = [upstream]  # the current upstream connection, closed whatever happens
        try:
            writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
            await writer.drain()
            if not target.tls:
                return await self._tunnel(target, why, upstream, reader, writer)
            self.log.record("CONNECT", host, port, ALLOW, f"intercept; {why}", 200)
            await self._intercept(target, conn, reader, writer)
        finally:
            if conn[0] is not None:
                conn[0].close()

    async def _tunnel(
        self, target: Target, why: str, upstream: Upstream, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        """A blind tunnel, once the guest's ClientHello (and its second one, after a HelloRetryRequest) names the
        CONNECT host and hides no other name (see tunnel.py)."""
        stage = "refused"
        try:
            hello = await tunnel.first_hello(reader, target.host, self.honey, TLS_TIMEOUT)
            self.log.record("CONNECT", target.host, target.port, ALLOW, f"tunnel; {why}", 200)
            upstream.writer.write(hello)
            stage = "cut"
            await tunnel.follow_retry(reader, writer, upstream, target.host, self.honey, TLS_TIMEOUT)
        except (BadHello, EOFError, TimeoutError) as e:
            reason = str(e) or "no TLS handshake in time"  # EOFError and BadHello say what was missing or wrong
            self.log.record("CONNECT", target.host, target.port, DENY, f"tunnel {stage}: {reason}", 0)
            return
        except Hit as hit:
            hit.answered = True
            return self._alert(writer, "CONNECT", target.host, target.port, hit)
        await pipe(reader, writer, upstream.reader, upstream.writer)

    async def _intercept(
        self, target: Target, conn: list[Upstream | None], reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        await writer.start_tls(self.leaves.context(target.host), ssl_handshake_timeout=TLS_TIMEOUT)
        sni = sni_of(writer.get_extra_info("ssl_object"))
        if sni is not None and normalize_host(sni) != target.host:
            self.log.record("TLS", target.host, target.port, DENY, "TLS server name differs from the CONNECT target", 0)
            return
        while True:
            try:
                head = await _next_head(reader)
            except BadMessage as e:
                return self._refuse(writer, "", target.host, target.port, e)
            if head is None:
                return
            method = head.first[0]
            try:
                self._watch(head)
                path = inner_target(head, target)
                upstream, conn[0] = conn[0], None
                conn[0], keep = await self.relay.forward(head, path, list(head.headers), target, upstream, reader, writer)
            except (Failed, BadMessage) as e:
                return self._refuse(writer, method, target.host, target.port, e)
            except Hit as hit:
                return self._alert(writer, method, target.host, target.port, hit)
            if not keep:
                return
            await writer.drain()

    async def _plain(self, head: Head, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        method, raw = head.first[0], head.first[1]
        host, port = "", 0
        try:
            if method not in PLAIN_METHODS:
                raise Failed(405, f"method {method} not allowed")
            url = urlsplit(raw)
            if url.scheme.lower() != "http" or not url.netloc:
                raise Failed(400, "not a proxy request: expected an absolute http:// URL or CONNECT")
            host, port = split_authority(url.netloc, 80)
            self._watch(head)
            request_framing(head)  # ambiguous framing is refused before anything else
            target, why = await self._admit(host, port)
            path = (url.path or "/") + (f"?{url.query}" if url.query else "")
            headers = [("Host", url.netloc)] + [h for h in head.headers if h[0].lower() != "host"]
            _, keep = await self.relay.forward(head, path, headers, target, None, reader, writer, why)
            return keep
        except (Failed, BadMessage, ValueError) as e:
            error = e if isinstance(e, Failed | BadMessage) else BadMessage("malformed URL")
            self._refuse(writer, method, host or raw[:255], port, error)
            return False
        except Hit as hit:
            self._alert(writer, method, host, port, hit)
            return False


async def _linger(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Close gently: what we sent (a refusal, often) is lost to a reset if unread input is left when we close."""
    await writer.drain()
    if writer.can_write_eof():
        writer.write_eof()
    budget = LINGER_BYTES
    with contextlib.suppress(TimeoutError, OSError):
        async with asyncio.timeout(LINGER_SECONDS):
            while budget > 0 and (data := await reader.read(65536)):
                budget -= len(data)


@contextlib.contextmanager
def running(
    cfg: ProxyConfig, secrets: Mapping[str, str], resolver: Resolver | None = None
) -> Iterator[ProxyServer]:
    """A proxy serving on its own event-loop thread (tests, benchmarks); port 0 picks a free port."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="ai-sandbox-proxy", daemon=True)
    thread.start()
    server = ProxyServer(cfg, secrets, resolver=resolver)
    try:
        asyncio.run_coroutine_threadsafe(server.start(), loop).result(10)
        yield server
    finally:
        asyncio.run_coroutine_threadsafe(server.aclose(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()
