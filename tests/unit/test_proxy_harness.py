"""Loopback stand-ins for the proxy tests: fake upstream servers (HTTPS with a test CA, plain HTTP) and a proxy.

Every address is in 127.0.0.0/8 and every name resolves through the proxy's host map (no fallback to DNS):

    api.test.example    127.0.0.2  HTTPS, owns the credential TEST_API_KEY (and the Basic-auth one, GIT_TOKEN)
    other.test.example  127.0.0.3  HTTPS, allowed, owns no credential
    plain.test.example  127.0.0.4  plain HTTP, allowed
    blocked.test.example           on the deny-list
    rebind.test.example 127.0.0.2  allowed by name, but only public addresses are allowed (anti-rebinding)

The other test_proxy_* modules import from here; the few tests below check the stand-ins themselves.
"""

from __future__ import annotations

import hashlib
import json
import socket
import ssl
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest
from cryptography.hazmat.primitives import serialization

from ai_sandbox.proxy import ProxyConfig, placeholder
from ai_sandbox.proxy.ca import issue_leaf, load_or_create, new_authority
from ai_sandbox.proxy.server import ProxyServer, mapped_resolver, running

pytestmark = pytest.mark.unit

SECRET = "sk-test-REAL-5ecret-value"
GIT_SECRET = "ghp_REALgitTOKEN"
SECRETS = {"TEST_API_KEY": SECRET, "GIT_TOKEN": GIT_SECRET}
HOSTS = {
    "api.test.example": ["127.0.0.2"],
    "other.test.example": ["127.0.0.3"],
    "plain.test.example": ["127.0.0.4"],
    "rebind.test.example": ["127.0.0.2"],
}


@dataclass
class Seen:
    method: str
    path: str
    headers: list[tuple[str, str]]
    body: bytes

    def header(self, name: str) -> str | None:
        return next((v for k, v in self.headers if k.lower() == name.lower()), None)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        pass

    def _body(self) -> bytes:
        if (self.headers.get("Transfer-Encoding") or "").lower() == "chunked":
            out = b""
            while size := int(self.rfile.readline().split(b";")[0], 16):
                out += self.rfile.read(size)
                self.rfile.readline()
            while self.rfile.readline().strip():
                pass
            return out
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _send(self, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _handle(self) -> None:
        body = self._body()
        self.server.seen.append(Seen(self.command, self.path, list(self.headers.items()), body))
        if self.path.startswith("/big/"):
            return self._big(int(self.path.split("/")[2]))
        if self.path == "/chunked":
            self.send_response(200)
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for part in (b"hello ", b"chunked ", b"world"):
                self.wfile.write(b"%x\r\n%s\r\n" % (len(part), part))
            self.wfile.write(b"0\r\n\r\n")
            return
        if self.path.startswith("/split/"):  # echo of the request, sent chunked in pieces of n bytes
            n = int(self.path.split("/")[2].split("?")[0])
            echo = json.dumps({"path": self.path, "headers": dict(self.headers)}).encode()
            self.send_response(200)
            self.send_header("Transfer-Encoding", "chunked")
            self.send_header("X-Echo", self.headers.get("x-api-key") or "")
            self.end_headers()
            for i in range(0, len(echo), n):
                self.wfile.write(b"%x\r\n%s\r\n" % (len(echo[i : i + n]), echo[i : i + n]))
                self.wfile.flush()
            self.wfile.write(b"0\r\n\r\n")
            return
        if self.path.startswith("/header-name/"):  # a header named after the request's x-api-key, and a trailer too
            name = (self.headers.get("x-api-key") or "none") + self.path.removeprefix("/header-name/")
            self.send_response(200)
            self.send_header("Transfer-Encoding", "chunked")
            self.send_header(name, "1")
            self.end_headers()
            self.wfile.write(b"2\r\nok\r\n0\r\n" + name.encode() + b": 2\r\n\r\n")
            return
        if self.path.startswith("/te/"):  # a body in the transfer codings the path names (only chunked is applied)
            self.send_response(200)
            self.send_header("Transfer-Encoding", self.path.removeprefix("/te/").replace("+", ", "))
            self.end_headers()
            self.wfile.write(b"2\r\nok\r\n0\r\n\r\n")
            return
        if self.path == "/gzip":
            return self._send(200, b"\x1f\x8b compressed", {"Content-Encoding": "gzip"})
        if self.path == "/until-close":
            self.send_response(200)
            self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(b"the end is the close")
            self.close_connection = True
            return
        if self.path.startswith("/upgrade"):  # /upgrade: to WebSocket; /upgrade/P: to protocol P
            self.send_response(101)
            self.send_header("Connection", "Upgrade")
            self.send_header("Upgrade", self.path.removeprefix("/upgrade").lstrip("/") or "websocket")
            self.end_headers()
            self.wfile.flush()
            while line := self.rfile.readline():
                self.wfile.write(b"echo: " + line)
                self.wfile.flush()
            self.close_connection = True
            return
        info = {"server": self.server.name, "method": self.command, "path": self.path, "headers": dict(self.headers),
                "body_sha256": hashlib.sha256(body).hexdigest(), "body_len": len(body)}  # fmt: skip
        self._send(200, json.dumps(info).encode(), {"Content-Type": "application/json"})

    def _big(self, n: int) -> None:
        self.send_response(200)
        self.send_header("Content-Length", str(n))
        self.end_headers()
        block = b"x" * 65536
        while n > 0:
            self.wfile.write(block[: min(n, len(block))])
            n -= len(block)

    do_GET = do_POST = do_PUT = do_HEAD = do_DELETE = _handle


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, name: str, address: str, tls: ssl.SSLContext | None) -> None:
        super().__init__((address, 0), _Handler)
        self.name = name
        self.seen: list[Seen] = []
        if tls is not None:
            self.socket = tls.wrap_socket(self.socket, server_side=True, do_handshake_on_connect=False)

    def handle_error(self, request: object, client_address: object) -> None:
        pass  # garbage tunnelled by the fuzz tests is expected to fail here


@dataclass
class Upstreams:
    """The fake internet of a test; `ca_file` is the test CA its HTTPS servers' certificates chain to."""

    ca_file: Path
    servers: dict[str, _Server] = field(default_factory=dict)

    def port(self, name: str) -> int:
        return int(self.servers[name].server_address[1])

    def seen(self, name: str) -> list[Seen]:
        return self.servers[name].seen

    @property
    def ports(self) -> list[int]:
        return sorted({self.port(n) for n in self.servers})


def _server_context(tmp: Path, ca: object, host: str) -> ssl.SSLContext:
    key = new_authority("throwaway").key
    cert = issue_leaf(ca, host, key)  # type: ignore[arg-type]
    pem = tmp / f"{host}.pem"
    pem.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
        + cert.public_bytes(serialization.Encoding.PEM)
    )
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(pem)
    ctx.set_alpn_protocols(["http/1.1"])
    return ctx


@pytest.fixture
def upstreams(tmp_path: Path) -> Iterator[Upstreams]:
    ca = load_or_create(tmp_path / "upstream-ca", "test upstream CA")
    up = Upstreams(tmp_path / "upstream-ca" / "ca.pem")
    plan = [("api.test.example", True), ("other.test.example", True), ("plain.test.example", False)]
    for name, tls in plan:
        ctx = _server_context(tmp_path, ca, name) if tls else None
        server = _Server(name, HOSTS[name][0], ctx)
        threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
        up.servers[name] = server
    yield up
    for server in up.servers.values():
        server.shutdown()
        server.server_close()


def proxy_config(tmp_path: Path, up: Upstreams, **changes: object) -> ProxyConfig:
    values: dict = dict(
        sandbox="test", listen="127.0.0.1", port=0,
        # The test servers listen on free ports, not 443: a tunnel to them needs an entry naming the port.
        allow=["api.test.example", "other.test.example", "plain.test.example", "rebind.test.example",
               *(f"{n}:{up.port(n)}" for n in up.servers), f"rebind.test.example:{up.port('api.test.example')}"],
        deny=["blocked.test.example"], allowed_networks=["127.0.0.2/31", "127.0.0.4/32"],
        credentials={"TEST_API_KEY": ["api.test.example"], "GIT_TOKEN": ["api.test.example"],
                     "UNUSED_KEY": ["other.test.example"]},
        credential_fields={"TEST_API_KEY": ["header:x-api-key", "header:authorization", "header:x-goog-api-key",
                                            "query:key"], "GIT_TOKEN": ["header:authorization"]},
        ca_dir=str(tmp_path / "sandbox-ca"), log=str(tmp_path / "proxy.log"), upstream_ca=str(up.ca_file),
        ports=up.ports,
    )  # fmt: skip
    values.update(changes)
    return ProxyConfig(**values)


@dataclass
class Rig:
    """A running proxy in front of the fake upstreams, and clients that go through it."""

    proxy: ProxyServer
    up: Upstreams
    cfg: ProxyConfig
    client_ctx: ssl.SSLContext

    @property
    def proxy_url(self) -> str:
        return f"http://127.0.0.1:{self.proxy.port}"

    def url(self, name: str, path: str = "/", scheme: str = "https") -> str:
        return f"{scheme}://{name}:{self.up.port(name) if name in self.up.servers else 443}{path}"

    def client(self, **kw: object) -> httpx.Client:
        return httpx.Client(proxy=self.proxy_url, verify=self.client_ctx, trust_env=False, timeout=10, **kw)  # type: ignore[arg-type]

    def log_text(self) -> str:
        return Path(self.cfg.log).read_text() if Path(self.cfg.log).exists() else ""

    def raw(self, data: bytes, timeout: float = 5.0) -> bytes:
        """Send bytes to the proxy as they are, half-close, and read everything it answers."""
        with socket.create_connection(("127.0.0.1", self.proxy.port), timeout=timeout) as s:
            s.sendall(data)
            s.shutdown(socket.SHUT_WR)
            chunks = []
            while chunk := s.recv(65536):
                chunks.append(chunk)
            return b"".join(chunks)


def client_context(*ca_files: Path) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(ca_files[0]))
    for extra in ca_files[1:]:
        ctx.load_verify_locations(str(extra))
    return ctx


@pytest.fixture
def make_rig(tmp_path: Path, upstreams: Upstreams) -> Iterator[Callable[..., Rig]]:
    """make_rig(**config changes) -> Rig; every proxy made is stopped after the test."""
    stack: list = []

    def make(**changes: object) -> Rig:
        cfg = proxy_config(tmp_path, upstreams, **changes)
        cm = running(cfg, SECRETS, resolver=mapped_resolver(HOSTS, fallback=None))
        proxy = cm.__enter__()
        stack.append(cm)
        ctx = client_context(Path(cfg.ca_dir) / "ca.pem", upstreams.ca_file)
        return Rig(proxy, upstreams, cfg, ctx)

    yield make
    for cm in reversed(stack):
        cm.__exit__(None, None, None)


@pytest.fixture
def rig(make_rig: Callable[..., Rig]) -> Rig:
    return make_rig()


# --- the stand-ins themselves --------------------------------------------------------------------------------


def test_upstream_answers_directly_with_its_test_certificate(upstreams):
    ctx = client_context(upstreams.ca_file)
    transport = httpx.HTTPTransport(verify=ctx)
    with httpx.Client(transport=transport, trust_env=False) as c:
        # The name is checked against the certificate; the address comes from the URL's extension.
        r = c.get(f"https://127.0.0.2:{upstreams.port('api.test.example')}/x",
                  extensions={"sni_hostname": "api.test.example"})  # fmt: skip
    assert r.json()["server"] == "api.test.example"


def test_placeholders_are_what_the_guest_sees():
    assert placeholder("TEST_API_KEY") == "ai-sandbox-placeholder-TEST_API_KEY"
    assert SECRET not in placeholder("TEST_API_KEY")
