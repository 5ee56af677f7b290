"""The host agent's pieces on loopback: OLLAMA_HOST parsing, the service plan, the TCP forward, the DNS server
(against a fake resolver on a loopback port), and the daemon itself started with inherited sockets."""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import dns.message
import dns.rcode
import dns.rrset
import pytest

from ai_sandbox import daemons, hostagent, hostagent_up
from ai_sandbox.config import Settings
from ai_sandbox.errors import UsageError, VMError
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
    ("https://ollama.lan", ("https", "ollama.lan", 443)),
    ("http://10.1.2.3:11500/", ("http", "10.1.2.3", 11500)),
    ("[::1]:11434", ("http", "::1", 11434)),
    ("gpu-box", ("http", "gpu-box", 11434)),
])
def test_ollama_host_is_read_as_ollamas_client_reads_it(value, want):
    assert hostagent.ollama_target(value) == want


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
    env = hostagent_up.guest_environment(netcfg, (3128, 11434), Settings(OLLAMA_HOST="https://x:1"),
                                         {"NO_PROXY": "localhost", "no_proxy": "localhost"})
    assert env == {"OLLAMA_HOST": f"https://{gw}:11434", "NO_PROXY": f"localhost,{gw}", "no_proxy": f"localhost,{gw}"}
    assert hostagent_up.guest_environment(netcfg, (53, 11434), Settings(), {}) == {"OLLAMA_HOST": f"http://{gw}:11434"}
    assert hostagent_up.guest_environment(netcfg, (), Settings(), {}) == {}


# --- the TCP forward ------------------------------------------------------------------------------------------


async def _echo_server() -> tuple[asyncio.Server, int]:
    async def echo(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        w.write(b"hello from " + str(w.get_extra_info("sockname")[1]).encode() + b": " + await r.read(100))
        await w.drain()
        w.close()

    srv = await asyncio.start_server(echo, "127.0.0.1", 0)
    return srv, srv.sockets[0].getsockname()[1]


def test_forward_relays_to_exactly_its_target():
    async def go() -> None:
        srv, port = await _echo_server()
        listen = daemons.listening_socket("tcp", "127.0.0.1", 0)
        lport = listen.getsockname()[1]
        fw = Forwarder("ollama", "127.0.0.1", port)
        await fw.start(listen)
        r, w = await asyncio.open_connection("127.0.0.1", lport)
        w.write(b"ping")
        assert await asyncio.wait_for(r.read(), 5) == f"hello from {port}: ping".encode()
        w.close()
        await fw.aclose()
        srv.close()

    asyncio.run(go())


def test_forward_to_nothing_closes_the_guests_connection():
    async def go() -> None:
        dead = socket.socket()
        dead.bind(("127.0.0.1", 0))
        port = dead.getsockname()[1]
        dead.close()  # nothing listens there now
        listen = daemons.listening_socket("tcp", "127.0.0.1", 0)
        fw = Forwarder("ollama", "127.0.0.1", port)
        await fw.start(listen)
        r, w = await asyncio.open_connection(*listen.getsockname())
        t0 = time.monotonic()
        assert await asyncio.wait_for(r.read(), 5) == b""
        assert time.monotonic() - t0 < 2
        w.close()
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
    async def fake_and_echo():
        return await _fake_resolver(), await _echo_server()

    loop = asyncio.new_event_loop()
    (fake, fport, ft), (srv, eport) = loop.run_until_complete(fake_and_echo())
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

        async def use() -> tuple[bytes, dns.message.Message]:
            r, w = await asyncio.open_connection("127.0.0.1", fport_tcp)
            w.write(b"tags")
            got = await asyncio.wait_for(r.read(), 10)
            w.close()
            q = dns.message.make_query("db.corp.example", "A")
            return got, dns.message.from_wire(await _udp_ask(dport_udp, q.to_wire(), 10))

        got, ans = loop.run_until_complete(use())
        assert got == f"hello from {eport}: tags".encode()
        assert ans.answer[0][0].to_text() == "10.20.30.40"
    finally:
        d.stop()
        ft.close()
        srv.close()
        loop.close()
    assert not d.running() and not (tmp_path / "agent.pid").exists()
    assert "db.corp.example." in (tmp_path / "dns.log").read_text()
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
