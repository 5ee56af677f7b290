"""The guest's DNS server on its gateway (UDP and TCP): queries are asked of the host's resolvers from the host side.

The guest's `open` ruleset drops private ranges, where home and office resolvers live; asking them from here works
on any network. Every query is one JSON line in the log (capped: past the cap it starts again, keeping the newest).
Nothing a query holds is trusted: malformed messages are dropped, anything but one plain QUERY question is
refused, and names are logged as dnspython's escaped text. When no resolver answers (an offline host), the guest
gets SERVFAIL at once rather than a timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import logging
import os
import socket
import struct
import time
from pathlib import Path
from typing import Any

import dns.asyncbackend
import dns.asyncquery
import dns.exception
import dns.flags
import dns.message
import dns.opcode
import dns.rcode
import dns.rdatatype

from ai_sandbox.hostagent import resolvers_from

log = logging.getLogger("ai_sandbox.hostagent.dns")
MAX_IN_FLIGHT = 128
MAX_TCP_CLIENTS = 32
TCP_IDLE = 10.0


class QueryLog:
    """JSON lines appended to `path`; once it grows past `max_bytes` it is emptied and starts again with a note."""

    def __init__(self, path: Path, sandbox: str, max_bytes: int) -> None:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        self._fd, self.sandbox, self.max_bytes = fd, sandbox, max_bytes

    def _write(self, entry: dict[str, Any]) -> None:
        line = json.dumps(entry, ensure_ascii=True).encode() + b"\n"
        if os.fstat(self._fd).st_size + len(line) > self.max_bytes:
            os.ftruncate(self._fd, 0)
            note = {"time": _now(), "sandbox": self.sandbox, "note": f"log emptied at its cap of {self.max_bytes} bytes"}
            os.write(self._fd, json.dumps(note).encode() + b"\n")
        os.write(self._fd, line)

    def record(self, client: str, proto: str, name: str, qtype: str, rcode: str, upstream: str, ms: float) -> None:
        self._write({"time": _now(), "sandbox": self.sandbox, "client": client, "proto": proto, "name": name[:300],
                     "type": qtype[:16], "rcode": rcode, "upstream": upstream, "ms": round(ms, 1)})

    def close(self) -> None:
        os.close(self._fd)


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds")


class Resolvers:
    """The upstream resolvers: a fixed list, or those of resolv.conf, re-read whenever that file changes."""

    def __init__(self, fixed: list[str], resolv_conf: str) -> None:
        self.fixed, self.path = list(fixed), Path(resolv_conf)
        self._seen: tuple[int, int, int] | None = None
        self._cached: list[str] = []

    def current(self) -> list[str]:
        if self.fixed:
            return self.fixed
        try:
            st = self.path.stat()
            key = (st.st_ino, st.st_mtime_ns, st.st_size)
            if key != self._seen:
                self._cached, self._seen = resolvers_from(self.path.read_text(errors="replace")[:65536]), key
        except OSError:
            self._cached, self._seen = resolvers_from(""), None
        return self._cached


class DnsServer:
    """Serves a UDP and a TCP socket; `answer` is the one path both take."""

    def __init__(self, resolvers: Resolvers, qlog: QueryLog | None, timeout: float = 3.0, port: int = 53) -> None:
        self.resolvers, self.qlog, self.timeout, self.port = resolvers, qlog, timeout, port
        self._backend = dns.asyncbackend.get_backend("asyncio")
        self._in_flight = asyncio.Semaphore(MAX_IN_FLIGHT)
        self._tcp_slots = asyncio.Semaphore(MAX_TCP_CLIENTS)
        self._tasks: set[asyncio.Task[Any]] = set()
        self._transport: asyncio.DatagramTransport | None = None
        self._tcp: asyncio.Server | None = None

    # --- the one path -------------------------------------------------------------------------------------------

    async def answer(self, wire: bytes, client: str, proto: str) -> bytes | None:
        """The reply to one query message, or None to stay silent (not a DNS query at all)."""
        t0 = time.monotonic()
        try:
            q = dns.message.from_wire(wire)
        except dns.exception.DNSException:
            return None
        if q.flags & dns.flags.QR:
            return None  # a response sent to us: never answer those (no reflection loops)
        if q.opcode() != dns.opcode.QUERY or len(q.question) != 1:
            reply, upstream = self._error(q, dns.rcode.NOTIMP if q.opcode() != dns.opcode.QUERY else dns.rcode.FORMERR), "-"
        else:
            reply, upstream = await self._ask(q, proto)
        wire_out = self._render(q, reply, proto)
        if self.qlog is not None:
            name = q.question[0].name.to_text() if q.question else ""
            qtype = dns.rdatatype.to_text(q.question[0].rdtype) if q.question else ""
            self.qlog.record(client, proto, name, qtype, dns.rcode.to_text(reply.rcode()), upstream,
                             (time.monotonic() - t0) * 1000)
        return wire_out

    async def _ask(self, q: dns.message.Message, proto: str) -> tuple[dns.message.Message, str]:
        for where in self.resolvers.current():
            try:
                return await self._ask_one(q, where), where
            except (dns.exception.DNSException, OSError, EOFError) as e:
                log.debug("resolver %s: %s", where, e)
        return self._error(q, dns.rcode.SERVFAIL), "-"

    async def _ask_one(self, q: dns.message.Message, where: str) -> dns.message.Message:
        # UDP first whatever the guest used, TCP when the answer is truncated (as a stub resolver does). The UDP
        # socket is connected, so an ICMP unreachable (no route, nothing listening) fails at once, not at timeout.
        family = socket.AF_INET6 if ":" in where else socket.AF_INET
        sock = await self._backend.make_socket(family, socket.SOCK_DGRAM, 0, None, (where, self.port))
        try:
            r, _ = await dns.asyncquery.udp_with_fallback(q, where, timeout=self.timeout, port=self.port,
                                                          udp_sock=sock, ignore_unexpected=True)
            return r
        finally:
            await sock.close()

    @staticmethod
    def _error(q: dns.message.Message, rcode: dns.rcode.Rcode) -> dns.message.Message:
        r = dns.message.make_response(q)
        r.set_rcode(rcode)
        return r

    @staticmethod
    def _render(q: dns.message.Message, r: dns.message.Message, proto: str) -> bytes:
        limit = 65535 if proto == "tcp" else (max(512, q.payload) if q.edns >= 0 else 512)
        try:
            return r.to_wire(max_size=limit)
        except dns.exception.TooBig:
            tc = dns.message.make_response(q)
            tc.flags |= dns.flags.TC  # the client asks again over TCP
            return tc.to_wire()

    # --- sockets ------------------------------------------------------------------------------------------------

    async def start(self, udp: socket.socket | None, tcp: socket.socket | None) -> None:
        loop = asyncio.get_running_loop()
        if udp is not None:
            udp.setblocking(False)
            self._transport, _ = await loop.create_datagram_endpoint(lambda: _Udp(self), sock=udp)
        if tcp is not None:
            self._tcp = await asyncio.start_server(self._tcp_client, sock=tcp)

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _udp_query(self, data: bytes, addr: tuple[Any, ...]) -> None:
        async with self._in_flight:
            reply = await self.answer(data, addr[0], "udp")
        if reply is not None and self._transport is not None and not self._transport.is_closing():
            self._transport.sendto(reply, addr)

    async def _tcp_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        peer = (writer.get_extra_info("peername") or ("?",))[0]
        try:
            if self._tcp_slots.locked():
                return
            async with self._tcp_slots:
                while True:
                    head = await asyncio.wait_for(reader.readexactly(2), TCP_IDLE)
                    data = await asyncio.wait_for(reader.readexactly(struct.unpack("!H", head)[0]), TCP_IDLE)
                    async with self._in_flight:
                        reply = await self.answer(data, peer, "tcp")
                    if reply is None:
                        return
                    writer.write(struct.pack("!H", len(reply)) + reply)
                    await writer.drain()
        except (TimeoutError, asyncio.IncompleteReadError, ConnectionError, OSError):
            pass
        finally:
            if task is not None:
                self._tasks.discard(task)
            writer.close()

    async def aclose(self) -> None:
        if self._transport is not None:
            self._transport.close()
        if self._tcp is not None:
            self._tcp.close()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._tcp is not None:
            with contextlib.suppress(Exception):
                await self._tcp.wait_closed()


class _Udp(asyncio.DatagramProtocol):
    def __init__(self, server: DnsServer) -> None:
        self.server = server

    def datagram_received(self, data: bytes, addr: tuple[Any, ...]) -> None:
        if self.server._in_flight.locked():
            return  # full: drop, the client's resolver retries
        self.server._spawn(self.server._udp_query(data, addr))

    def error_received(self, exc: Exception) -> None:
        log.debug("udp: %s", exc)
