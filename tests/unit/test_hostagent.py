"""The host agent's pieces on loopback: OLLAMA_HOST parsing, the service plan, the Ollama forward (against a fake
Ollama that records what reaches it), the DNS server
(against a fake resolver on a loopback port), and the daemon itself started with inherited sockets."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import dns.message
import dns.rcode
import dns.rrset
import h11
import pytest

from ai_sandbox import daemons, hostagent, hostagent_up
from ai_sandbox.config import Settings
from ai_sandbox.errors import UsageError, VMError
from ai_sandbox.hostagent import forward, httpgate
from ai_sandbox.hostagent.dns import DnsServer, QueryLog, Resolvers
from ai_sandbox.hostagent.forward import Forwarder
from ai_sandbox.net import NetConfig, plan
from ai_sandbox.net.pool import DEFAULT_POOL
from ai_sandbox.state import Files, Instance

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(("value", "want"), [
    ("", ("http", "127.0.0.1", 11434)),
    ("127.0.0.1:11434", ("http", "127.0.0.1", 11434)),
    ("0.0.0.0", ("http", "127.0.0.1", 11434)),
    ("0.0.0.0:8080", ("http", "127.0.0.1", 8080)),
    ("http://localhost", ("http", "localhost", 80)),
    ("http://10.1.2.3:11500/", ("http", "10.1.2.3", 11500)),
    ("[::1]:11434", ("http", "::1", 11434)),
    ("gpu-box", ("http", "gpu-box", 11434)),
])
def test_ollama_host_is_read_as_ollamas_client_reads_it(value, want):
    assert hostagent.ollama_target(value) == want


def test_an_https_ollama_host_is_refused_in_one_line():
    # The forward reads each request (only inference passes) and speaks plain HTTP: TLS would be opaque to it.
    with pytest.raises(UsageError, match="only plain http"):
        hostagent.ollama_target("https://ollama.lan")


@pytest.mark.parametrize("value", ["ftp://x", "127.0.0.1:0", "127.0.0.1:99999", "host:abc", "a b"])
def test_a_bad_ollama_host_is_one_usage_error(value):
    with pytest.raises(UsageError, match="OLLAMA_HOST"):
        hostagent.ollama_target(value)


def test_resolvers_of_resolv_conf():
    text = "# x\nsearch lan\nnameserver 192.168.1.1\nnameserver 127.0.0.53\nnameserver bogus\noptions edns0\n"
    assert hostagent.resolvers_from(text) == ["192.168.1.1", "127.0.0.53"]  # loopback is fine: asked from the host
    assert hostagent.resolvers_from("") == ["127.0.0.1"]


@pytest.fixture
def netcfg() -> NetConfig:
    return plan("alpha", set(), DEFAULT_POOL)


def test_services_follow_the_gateway_ports(tmp_path, netcfg):
    inst = Instance("alpha", tmp_path)
    s = Settings(OLLAMA_HOST="127.0.0.1:11500")
    both = hostagent_up.plan(inst, netcfg, (53, 4713, 11434), s)
    assert both is not None and both.dns is not None and both.dns.listen == str(netcfg.host_ip)
    assert [(f.listen, f.port, f.to_host, f.to_port) for f in both.forwards] == [
        (str(netcfg.host_ip), 11434, "127.0.0.1", 11500)]
    proxy_mode = hostagent_up.plan(inst, netcfg, (3128, 4713, 11434), s)
    assert proxy_mode is not None and proxy_mode.dns is None and len(proxy_mode.forwards) == 1
    assert hostagent_up.plan(inst, netcfg, (), s) is None  # offline: no agent at all
    assert hostagent_up.guest_dns(netcfg, (53, 11434)) == [str(netcfg.host_ip)]
    assert hostagent_up.guest_dns(netcfg, (3128, 11434)) == []


def test_configure_writes_and_removes_the_config(tmp_path, netcfg):
    inst = Instance("alpha", tmp_path)
    inst.dir.mkdir()
    hostagent_up.configure(inst, netcfg, (53, 11434), Settings())
    cfg = hostagent.read_config(inst.path(Files.AGENT_CONFIG))
    assert cfg.forwards[0].to_port == 11434 and hostagent_up.expected(inst)
    hostagent_up.configure(inst, netcfg, (), Settings())
    assert not hostagent_up.expected(inst)


def test_guest_environment_points_ollama_at_the_gateway_past_the_proxy(netcfg):
    gw = str(netcfg.host_ip)
    env = hostagent_up.guest_environment(netcfg, (3128, 11434), Settings(OLLAMA_HOST="http://x:1"),
                                         {"NO_PROXY": "localhost", "no_proxy": "localhost"})
    assert env == {"OLLAMA_HOST": f"http://{gw}:11434", "NO_PROXY": f"localhost,{gw}", "no_proxy": f"localhost,{gw}"}
    assert hostagent_up.guest_environment(netcfg, (53, 11434), Settings(), {}) == {"OLLAMA_HOST": f"http://{gw}:11434"}
    assert hostagent_up.guest_environment(netcfg, (), Settings(), {}) == {}


# --- the Ollama forward ---------------------------------------------------------------------------------------


class FakeOllama:
    """An HTTP/1.1 server on loopback that records each request (method, target, headers, body) and answers with
    `answer(request, writer)`; by default 200 with the target in a JSON body. Counts connections."""

    def __init__(self, answer=None) -> None:
        self.seen: list[SimpleNamespace] = []
        self.connections = 0
        self.answer = answer or self._default
        self.port = 0

    async def start(self) -> FakeOllama:
        self.server = await asyncio.start_server(self._conn, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    @staticmethod
    async def _default(req: SimpleNamespace, w: asyncio.StreamWriter, r: asyncio.StreamReader) -> None:
        body = json.dumps({"target": req.target}).encode()
        w.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: close\r\n"
                b"Content-Length: %d\r\n\r\n%s" % (len(body), body))

    async def _conn(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        self.connections += 1
        conn = h11.Connection(h11.SERVER)
        req = SimpleNamespace(method="", target="", headers={}, raw_headers=[], body=b"", complete=False)
        self.seen.append(req)
        try:
            while True:
                ev = conn.next_event()
                if ev is h11.NEED_DATA:
                    conn.receive_data(await r.read(65536))
                elif isinstance(ev, h11.Request):
                    req.method, req.target = ev.method.decode(), ev.target.decode()
                    req.raw_headers = [(n.decode(), v.decode()) for n, v in ev.headers]
                    req.headers = dict(req.raw_headers)
                elif isinstance(ev, h11.Data):
                    req.body += ev.data
                elif isinstance(ev, h11.EndOfMessage):
                    req.complete = True
                    break
                else:
                    break
        except h11.RemoteProtocolError:
            pass  # the forward gave up on the request mid-way
        if req.complete:
            await self.answer(req, w, r)
            with contextlib.suppress(ConnectionError):
                await w.drain()
        w.close()

    def close(self) -> None:
        self.server.close()


async def _forward(upstream_port: int, **kw) -> tuple[Forwarder, int]:
    listen = daemons.listening_socket("tcp", "127.0.0.1", 0)
    fw = Forwarder("ollama", "127.0.0.1", upstream_port, **kw)
    await fw.start(listen)
    return fw, listen.getsockname()[1]


async def _ask(port: int, raw: bytes, timeout: float = 5) -> bytes:
    """Send raw bytes as the guest; everything that comes back until the forward closes."""
    r, w = await asyncio.open_connection("127.0.0.1", port)
    w.write(raw)
    try:
        return await asyncio.wait_for(r.read(), timeout)
    finally:
        w.close()


def _status(resp: bytes) -> int:
    return int(resp.split(b" ", 2)[1])


def _body(resp: bytes) -> bytes:
    return resp.split(b"\r\n\r\n", 1)[1]


def _run(scenario, answer=None, **kw):
    """Run `scenario(fake, port)` against a fake Ollama behind a forward; returns what it returns."""
    async def go():
        fake = await FakeOllama(answer).start()
        fw, port = await _forward(fake.port, **kw)
        try:
            return await scenario(fake, port)
        finally:
            await fw.aclose()
            fake.close()

    return asyncio.run(go())


@pytest.mark.parametrize(("method", "path"), [(m, p) for p, ms in httpgate.ROUTES.items() for m in ms])
def test_every_inference_and_read_route_reaches_the_upstream(method, path):
    body = b'{"model":"m"}' if method == "POST" else b""
    raw = (f"{method} {path} HTTP/1.1\r\nHost: 10.0.2.2:11434\r\nContent-Length: {len(body)}\r\n\r\n").encode() + body

    async def scenario(fake, port):
        resp = await _ask(port, raw)
        assert _status(resp) == 200, resp
        assert [(s.method, s.target, s.body) for s in fake.seen] == [(method, path, body)]

    _run(scenario)


def test_the_head_goes_on_with_the_upstreams_host_and_one_request_per_connection():
    raw = (b"GET /api/tags?x=1 HTTP/1.1\r\nHost: 10.0.2.2:11434\r\nConnection: keep-alive, X-Hop\r\nX-Hop: 1\r\n"
           b"Keep-Alive: timeout=5\r\nUser-Agent: ollama-python\r\nAccept: application/json\r\n\r\n")

    async def scenario(fake, port):
        resp = await _ask(port, raw)
        seen = fake.seen[0]
        assert seen.target == "/api/tags?x=1"
        assert seen.headers["host"] == f"127.0.0.1:{fake.port}"
        assert seen.headers["connection"] == "close"
        assert "keep-alive" not in seen.headers and "x-hop" not in seen.headers
        assert seen.headers["user-agent"] == "ollama-python" and seen.headers["accept"] == "application/json"
        # the answer comes back byte for byte
        assert resp.startswith(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: close\r\n")
        assert json.loads(_body(resp)) == {"target": "/api/tags?x=1"}

    _run(scenario)


def test_request_bodies_go_on_as_h11_framed_them():
    fixed = b'{"model":"m","messages":[]}'
    chunked = (b"POST /api/embed HTTP/1.1\r\nHost: g\r\nTransfer-Encoding: chunked\r\n\r\n"
               b"5\r\nhello\r\n6\r\n world\r\n0\r\nX-Trailer: t\r\n\r\n")
    # both framings given: chunked wins (RFC 9112 6.3), and only chunked goes on, so the upstream cannot disagree
    smuggle = (b"POST /api/chat HTTP/1.1\r\nHost: g\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n"
               b"4\r\nabcd\r\n0\r\n\r\n")

    async def scenario(fake, port):
        for raw in (b"POST /api/chat HTTP/1.1\r\nHost: g\r\nContent-Length: %d\r\n\r\n%s" % (len(fixed), fixed),
                    chunked, smuggle):
            assert _status(await _ask(port, raw)) == 200
        a, b, c = fake.seen
        assert a.body == fixed and a.headers["content-length"] == str(len(fixed))
        assert b.body == b"hello world" and b.headers["transfer-encoding"] == "chunked"
        assert "content-length" not in b.headers and "x-trailer" not in b.headers
        assert c.body == b"abcd" and "content-length" not in c.headers
        assert all(s.complete for s in fake.seen)

    _run(scenario)


def test_the_answer_streams_through_as_it_comes():
    go_on = asyncio.Event()

    async def answer(req, w, r):
        w.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/x-ndjson\r\nConnection: close\r\n\r\n")
        w.write(b'{"response":"a","done":false}\n')
        await w.drain()
        await go_on.wait()
        w.write(b'{"response":"b","done":true}\n')

    async def scenario(fake, port):
        r, w = await asyncio.open_connection("127.0.0.1", port)
        w.write(b'POST /api/generate HTTP/1.1\r\nHost: g\r\nContent-Length: 13\r\n\r\n{"model":"m"}')
        head = await asyncio.wait_for(r.readuntil(b"\r\n\r\n"), 5)
        assert head.startswith(b"HTTP/1.1 200 OK")
        assert json.loads(await asyncio.wait_for(r.readline(), 5)) == {"response": "a", "done": False}
        go_on.set()
        assert json.loads(await asyncio.wait_for(r.readline(), 5)) == {"response": "b", "done": True}
        assert await asyncio.wait_for(r.read(), 5) == b""
        w.close()

    _run(scenario, answer)


def test_a_guest_that_hangs_up_mid_answer_stops_the_upstream():
    upstream_saw_close = asyncio.Event()

    async def answer(req, w, r):
        w.write(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n{\"response\":\"a\"}\n")
        await w.drain()
        if await asyncio.wait_for(r.read(), 10) == b"":  # what Ollama's server notices to stop generating
            upstream_saw_close.set()

    async def scenario(fake, port):
        r, w = await asyncio.open_connection("127.0.0.1", port)
        w.write(b'POST /api/generate HTTP/1.1\r\nHost: g\r\nContent-Length: 2\r\n\r\n{}')
        await asyncio.wait_for(r.readuntil(b"}\n"), 5)
        w.close()
        await asyncio.wait_for(upstream_saw_close.wait(), 5)

    _run(scenario, answer)


REFUSED = [
    "POST /api/pull", "POST /api/push", "POST /api/create", "POST /api/copy", "DELETE /api/delete",
    "POST /api/blobs/sha256:0123", "HEAD /api/blobs/sha256:0123",
    "GET /api/pull", "DELETE /api/tags", "POST /api/tags", "GET /api/chat",  # a right path with the wrong method
    "POST /api/%70ull", "POST /api/tags/../pull", "POST //api/pull", "POST /api/pull/", "POST /API/PULL",
    "POST http://127.0.0.1:11434/api/pull", "CONNECT 127.0.0.1:22", "OPTIONS *", "GET /v1/models/../../api/ps",
]


@pytest.mark.parametrize("line", REFUSED)
def test_anything_but_inference_and_reading_is_refused_before_the_upstream(line):
    body = b'{"model":"attacker.example:8443/x/y","insecure":true}'
    raw = f"{line} HTTP/1.1\r\nHost: g\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body

    async def scenario(fake, port):
        resp = await _ask(port, raw)
        assert _status(resp) == 403, resp
        assert b"connection: close" in resp.lower()
        err = json.loads(_body(resp))["error"]
        assert "inference and reading only" in err and line.split()[0] in err
        assert fake.connections == 0

    _run(scenario)


def test_refusals_are_logged_json_encoded_and_capped(caplog):
    tricky = '/x"y\\z' + "a" * 400

    async def scenario(fake, port):
        for _ in range(4):
            assert _status(await _ask(port, f"POST {tricky} HTTP/1.1\r\nHost: g\r\n\r\n".encode())) == 403
        await asyncio.sleep(0.3)  # past the window: the next line says how many were held back
        assert _status(await _ask(port, b"POST /api/pull HTTP/1.1\r\nHost: g\r\n\r\n")) == 403

    with caplog.at_level(logging.WARNING, logger="ai_sandbox.hostagent.forward"):
        _run(scenario, log_cap=httpgate.LogCap(burst=2, window=0.25))
    lines = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
    assert len(lines) == 3
    cut = json.dumps(tricky[: httpgate.SHOWN] + "…", ensure_ascii=True)
    assert lines[0] == f'ollama: refused "POST" {cut} from 127.0.0.1'
    assert '\\"y\\\\z' in lines[0] and len(lines[0]) < 300
    assert lines[2] == 'ollama: refused "POST" "/api/pull" from 127.0.0.1 (2 more refused and not logged)'


def test_bad_and_oversized_requests_get_4xx_and_never_reach_the_upstream():
    async def scenario(fake, port):
        assert _status(await _ask(port, b"\x16\x03\x01\x02\x00garbage\r\n\r\n")) == 400  # e.g. a TLS hello
        huge = b"GET /api/tags HTTP/1.1\r\nHost: g\r\nX: " + b"a" * (70 * 1024) + b"\r\n\r\n"
        assert _status(await _ask(port, huge)) == 431
        big = b"POST /api/chat HTTP/1.1\r\nHost: g\r\nContent-Length: 1001\r\n\r\n" + b"a" * 1001
        resp = await _ask(port, big)
        assert _status(resp) == 413 and b"over 1000 bytes" in resp
        assert fake.connections == 0
        # chunked: the cap is only known to be passed on the way; the upstream gets an unfinished request, dropped
        chunks = b"".join(b"190\r\n" + b"a" * 400 + b"\r\n" for _ in range(3)) + b"0\r\n\r\n"
        resp = await _ask(port, b"POST /api/chat HTTP/1.1\r\nHost: g\r\nTransfer-Encoding: chunked\r\n\r\n" + chunks)
        assert _status(resp) == 413
        await asyncio.sleep(0.1)
        assert [s.complete for s in fake.seen] == [False]

    _run(scenario, max_body=1000)


def test_a_slow_request_head_times_out(monkeypatch):
    monkeypatch.setattr(forward, "HEAD_TIMEOUT", 0.3)

    async def scenario(fake, port):
        t0 = time.monotonic()
        resp = await _ask(port, b"GET /api/ta")
        assert _status(resp) == 408 and time.monotonic() - t0 < 3
        assert fake.connections == 0

    _run(scenario)


def test_expect_100_continue_is_answered_by_the_forward():
    async def scenario(fake, port):
        r, w = await asyncio.open_connection("127.0.0.1", port)
        w.write(b"POST /api/show HTTP/1.1\r\nHost: g\r\nContent-Length: 13\r\nExpect: 100-continue\r\n\r\n")
        assert await asyncio.wait_for(r.readuntil(b"\r\n\r\n"), 5) == b"HTTP/1.1 100 Continue\r\n\r\n"
        w.write(b'{"model":"m"}')
        assert _status(await asyncio.wait_for(r.read(), 5)) == 200
        w.close()
        assert fake.seen[0].body == b'{"model":"m"}' and "expect" not in fake.seen[0].headers

    _run(scenario)


def test_no_ollama_on_the_host_is_a_502_at_once():
    async def go() -> None:
        dead = socket.socket()
        dead.bind(("127.0.0.1", 0))
        port = dead.getsockname()[1]
        dead.close()  # nothing listens there now
        fw, lport = await _forward(port)
        t0 = time.monotonic()
        resp = await _ask(lport, b"GET /api/tags HTTP/1.1\r\nHost: g\r\n\r\n")
        assert _status(resp) == 502 and f"127.0.0.1:{port}".encode() in _body(resp)
        assert time.monotonic() - t0 < 2
        await fw.aclose()

    asyncio.run(go())


# --- DNS ------------------------------------------------------------------------------------------------------

ZONE = {"db.corp.example.": "10.20.30.40"}


class FakeResolver(asyncio.DatagramProtocol):
    """Answers A queries for ZONE on a loopback UDP port, NXDOMAIN for anything else; counts what it was asked."""

    def __init__(self) -> None:
        self.asked: list[str] = []

    def connection_made(self, transport) -> None:  # type: ignore[override]
        self.transport = transport

    def datagram_received(self, data: bytes, addr) -> None:  # type: ignore[override]
        q = dns.message.from_wire(data)
        name = q.question[0].name.to_text()
        self.asked.append(name)
        r = dns.message.make_response(q)
        if name in ZONE:
            r.answer.append(dns.rrset.from_text(name, 60, "IN", "A", ZONE[name]))
        else:
            r.set_rcode(dns.rcode.NXDOMAIN)
        self.transport.sendto(r.to_wire(), addr)


async def _fake_resolver() -> tuple[FakeResolver, int, asyncio.BaseTransport]:
    loop = asyncio.get_running_loop()
    transport, proto = await loop.create_datagram_endpoint(FakeResolver, local_addr=("127.0.0.1", 0))
    return proto, transport.get_extra_info("sockname")[1], transport


async def _udp_ask(port: int, payload: bytes, timeout: float = 5) -> bytes:
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[bytes] = loop.create_future()

    class P(asyncio.DatagramProtocol):
        def datagram_received(self, data, addr):  # type: ignore[override]
            if not fut.done():
                fut.set_result(data)

    t, _ = await loop.create_datagram_endpoint(P, remote_addr=("127.0.0.1", port))
    t.sendto(payload)
    try:
        return await asyncio.wait_for(fut, timeout)
    finally:
        t.close()


def _serve_dns(tmp_path: Path, upstream_port: int, upstreams=("127.0.0.1",), cap: int = 1 << 20):
    qlog = QueryLog(tmp_path / "dns.log", "alpha", cap)
    server = DnsServer(Resolvers(list(upstreams), "/nonexistent"), qlog, timeout=1.0, port=upstream_port)
    udp = daemons.listening_socket("udp", "127.0.0.1", 0)
    tcp = daemons.listening_socket("tcp", "127.0.0.1", 0)
    return server, udp, tcp


def _log(tmp_path: Path) -> list[dict]:
    return [json.loads(x) for x in (tmp_path / "dns.log").read_text().splitlines()]


def test_dns_answers_through_the_hosts_resolver_over_udp_and_tcp_and_logs_each_query(tmp_path):
    async def go() -> None:
        fake, fport, ft = await _fake_resolver()
        server, udp, tcp = _serve_dns(tmp_path, fport)
        uport, tport = udp.getsockname()[1], tcp.getsockname()[1]
        await server.start(udp, tcp)
        q = dns.message.make_query("db.corp.example", "A")
        r = dns.message.from_wire(await _udp_ask(uport, q.to_wire()))
        assert r.id == q.id and r.answer[0][0].to_text() == "10.20.30.40"
        r = await dns.asyncquery.tcp(dns.message.make_query("nope.corp.example", "A"), "127.0.0.1", port=tport,
                                     timeout=5)
        assert r.rcode() == dns.rcode.NXDOMAIN
        assert fake.asked == ["db.corp.example.", "nope.corp.example."]
        await server.aclose()
        ft.close()

    import dns.asyncquery  # noqa: F401 (the test's own client)

    asyncio.run(go())
    entries = _log(tmp_path)
    assert [(e["name"], e["type"], e["rcode"], e["proto"], e["sandbox"]) for e in entries] == [
        ("db.corp.example.", "A", "NOERROR", "udp", "alpha"), ("nope.corp.example.", "A", "NXDOMAIN", "tcp", "alpha")]
    assert entries[0]["upstream"] == "127.0.0.1" and entries[0]["client"] == "127.0.0.1"


def test_dns_says_servfail_at_once_when_no_resolver_answers(tmp_path):
    async def go() -> float:
        dead = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        dead.bind(("127.0.0.1", 0))
        port = dead.getsockname()[1]
        dead.close()  # ICMP port unreachable: as fast a failure as a host without a route
        server, udp, tcp = _serve_dns(tmp_path, port)
        await server.start(udp, tcp)
        q = dns.message.make_query("example.com", "A")
        t0 = time.monotonic()
        r = dns.message.from_wire(await _udp_ask(udp.getsockname()[1], q.to_wire()))
        took = time.monotonic() - t0
        assert r.rcode() == dns.rcode.SERVFAIL and r.id == q.id
        await server.aclose()
        return took

    assert asyncio.run(go()) < 0.9  # below the upstream timeout: a failure, not a wait
    assert _log(tmp_path)[0]["rcode"] == "SERVFAIL"


def test_dns_drops_garbage_and_refuses_what_is_not_one_query(tmp_path):
    async def go() -> None:
        fake, fport, ft = await _fake_resolver()
        server, udp, tcp = _serve_dns(tmp_path, fport)
        await server.start(udp, tcp)
        assert await server.answer(b"\x00\x01garbage", "x", "udp") is None
        resp = dns.message.make_response(dns.message.make_query("a.example", "A"))
        assert await server.answer(resp.to_wire(), "x", "udp") is None  # never answer a response
        upd = dns.message.make_query("a.example", "A")
        upd.set_opcode(dns.opcode.NOTIFY)
        r = dns.message.from_wire(await server.answer(upd.to_wire(), "x", "udp") or b"")
        assert r.rcode() == dns.rcode.NOTIMP
        assert fake.asked == []
        await server.aclose()
        ft.close()

    import dns.opcode  # noqa: F401

    asyncio.run(go())


def test_the_query_log_is_capped(tmp_path):
    qlog = QueryLog(tmp_path / "dns.log", "alpha", 4096)
    for i in range(200):
        qlog.record("10.0.0.2", "udp", f"n{i}.example.", "A", "NOERROR", "1.1.1.1", 1.0)
    qlog.close()
    assert (tmp_path / "dns.log").stat().st_size <= 4096
    entries = _log(tmp_path)
    assert "cap" in entries[0]["note"] and entries[-1]["name"] == "n199.example."


def test_resolvers_are_reread_when_resolv_conf_changes(tmp_path):
    conf = tmp_path / "resolv.conf"
    conf.write_text("nameserver 192.0.2.1\n")
    res = Resolvers([], str(conf))
    assert res.current() == ["192.0.2.1"]
    conf.write_text("nameserver 192.0.2.2\nnameserver 192.0.2.3\n")
    assert res.current() == ["192.0.2.2", "192.0.2.3"]
    assert Resolvers(["198.51.100.9"], str(conf)).current() == ["198.51.100.9"]


# --- the daemon -----------------------------------------------------------------------------------------------


def test_agent_daemon_serves_on_inherited_sockets_and_stops(tmp_path):
    async def fake_resolver_and_ollama():
        return await _fake_resolver(), await FakeOllama().start()

    loop = asyncio.new_event_loop()
    (fake, fport, ft), ollama = loop.run_until_complete(fake_resolver_and_ollama())
    eport = ollama.port
    cfg = hostagent.AgentConfig(
        sandbox="alpha", drop_to_uid=None,
        forwards=[hostagent.Forward(name="ollama", listen="127.0.0.1", port=1, to_host="127.0.0.1", to_port=eport)],
        dns=hostagent.Dns(listen="127.0.0.1", port=1, log=str(tmp_path / "dns.log"), upstreams=["127.0.0.1"],
                          upstream_port=fport))
    hostagent.write_config(cfg, tmp_path / "agent.json")
    socks = [daemons.listening_socket(k, "127.0.0.1", 0) for k in ("tcp", "udp", "tcp")]
    fport_tcp, dport_udp = socks[0].getsockname()[1], socks[1].getsockname()[1]
    fds = {"ollama": socks[0].fileno(), "dns-udp": socks[1].fileno(), "dns-tcp": socks[2].fileno()}
    d = daemons.Daemon("the agent", tmp_path / "agent.pid", tmp_path / "agent.log", tmp_path / "agent.json")
    d.start(hostagent.daemon_argv(tmp_path / "agent.json", fds), sockets=socks)
    try:
        assert d.running()

        async def use() -> tuple[bytes, bytes, dns.message.Message]:
            tags = await _ask(fport_tcp, b"GET /api/tags HTTP/1.1\r\nHost: g\r\n\r\n", 10)
            pull = await _ask(fport_tcp, b"POST /api/pull HTTP/1.1\r\nHost: g\r\nContent-Length: 2\r\n\r\n{}", 10)
            q = dns.message.make_query("db.corp.example", "A")
            return tags, pull, dns.message.from_wire(await _udp_ask(dport_udp, q.to_wire(), 10))

        tags, pull, ans = loop.run_until_complete(use())
        assert _status(tags) == 200 and json.loads(_body(tags)) == {"target": "/api/tags"}
        assert _status(pull) == 403 and [s.target for s in ollama.seen] == ["/api/tags"]
        assert ans.answer[0][0].to_text() == "10.20.30.40"
    finally:
        d.stop()
        ft.close()
        ollama.close()
        loop.close()
    assert not d.running() and not (tmp_path / "agent.pid").exists()
    assert "db.corp.example." in (tmp_path / "dns.log").read_text()
    assert 'refused "POST" "/api/pull"' in (tmp_path / "agent.log").read_text()
    d.stop()  # idempotent


def test_a_reused_pid_is_not_the_daemon(tmp_path):
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (tmp_path / "x.pid").write_text(f"{other.pid}\n")  # a stale pid file naming another program
        d = daemons.Daemon("the agent", tmp_path / "x.pid", tmp_path / "x.log", tmp_path / "agent.json")
        assert not d.running()
        d.stop()
        assert other.poll() is None  # not killed
    finally:
        other.kill()
        other.wait()


def test_a_daemon_that_dies_at_start_is_an_error(tmp_path):
    d = daemons.Daemon("the agent", tmp_path / "x.pid", tmp_path / "x.log")
    with pytest.raises(VMError, match="the agent exited at start"):
        d.start([sys.executable, "-c", "raise SystemExit(3)"], settle=2)
    assert not (tmp_path / "x.pid").exists()


def test_the_agent_refuses_a_bad_config(tmp_path):
    (tmp_path / "bad.json").write_text('{"sandbox": "a", "forwards": [{"name": "x"}]}')
    res = subprocess.run([sys.executable, "-m", "ai_sandbox.hostagent", "--config", str(tmp_path / "bad.json")],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 2 and "host agent config" in res.stderr
