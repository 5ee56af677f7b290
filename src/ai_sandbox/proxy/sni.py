"""The server name of a TLS ClientHello, read from the first bytes of a blind tunnel before it is spliced.

A tunnel to an allowed name must not carry TLS for another name (a CDN routes by SNI). The ClientHello may be
split over several TLS records; anything that is not a well-formed ClientHello is refused, never guessed at.
"""

from __future__ import annotations

import asyncio

MAX_HELLO = 64 * 1024
HANDSHAKE = 0x16
CLIENT_HELLO = 1
EXT_SERVER_NAME = 0
HOST_NAME = 0


class Incomplete(Exception):
    """More bytes are needed."""


class BadHello(Exception):
    """Not a well-formed TLS ClientHello."""


class _Reader:
    def __init__(self, data: bytes) -> None:
        self.data, self.pos = data, 0

    def take(self, n: int) -> bytes:
        if self.pos + n > len(self.data):
            raise BadHello("ClientHello field runs past its end")
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def num(self, n: int) -> int:
        return int.from_bytes(self.take(n), "big")

    def vector(self, length_bytes: int) -> bytes:
        return self.take(self.num(length_bytes))

    def done(self) -> bool:
        return self.pos == len(self.data)


def handshake_message(data: bytes) -> bytes:
    """The first handshake message carried by the TLS records at the start of `data` (Incomplete if cut short)."""
    payload = b""
    pos = 0
    while True:
        if len(data) < pos + 5:
            raise Incomplete
        if data[pos] != HANDSHAKE or data[pos + 1] != 3:
            raise BadHello("not a TLS handshake record")
        length = int.from_bytes(data[pos + 3 : pos + 5], "big")
        if length == 0 or length > 16384 + 2048:
            raise BadHello("bad TLS record length")
        if len(data) < pos + 5 + length:
            raise Incomplete
        payload += data[pos + 5 : pos + 5 + length]
        pos += 5 + length
        if len(payload) >= 4:
            if payload[0] != CLIENT_HELLO:
                raise BadHello("first handshake message is not a ClientHello")
            size = int.from_bytes(payload[1:4], "big")
            if size + 4 > MAX_HELLO:
                raise BadHello("ClientHello too large")
            if len(payload) >= size + 4:
                return payload[4 : size + 4]
        if pos >= MAX_HELLO:
            raise BadHello("ClientHello too large")


def server_name(hello: bytes) -> str | None:
    """The host_name of the server_name extension of a ClientHello body; None when there is none."""
    r = _Reader(hello)
    r.take(2 + 32)  # legacy version, random
    r.vector(1)  # session id
    suites = r.vector(2)
    if not suites or len(suites) % 2:
        raise BadHello("bad cipher suites")
    r.vector(1)  # compression methods
    if r.done():
        return None
    ext = _Reader(r.vector(2))
    if not r.done():
        raise BadHello("bytes after the extensions")
    name: str | None = None
    seen: set[int] = set()
    while not ext.done():
        kind, body = ext.num(2), ext.vector(2)
        if kind in seen:
            raise BadHello("repeated extension")
        seen.add(kind)
        if kind == EXT_SERVER_NAME:
            name = _host_name(body)
    return name


def _host_name(body: bytes) -> str:
    r = _Reader(body)
    names = _Reader(r.vector(2))
    if not r.done() or names.done():
        raise BadHello("bad server_name extension")
    found: list[bytes] = []
    while not names.done():
        kind, value = names.num(1), names.vector(2)
        if kind == HOST_NAME:
            found.append(value)
    if len(found) != 1 or not found[0] or not all(0x21 <= b < 0x7F for b in found[0]):
        raise BadHello("bad server name")
    return found[0].decode("ascii")


def parse(data: bytes) -> str | None:
    """SNI of the ClientHello at the start of `data`; Incomplete or BadHello."""
    return server_name(handshake_message(data))


async def read_client_hello(reader: asyncio.StreamReader, timeout: float) -> tuple[bytes, str | None]:
    """The bytes of the ClientHello as received (to pass on unchanged) and its server name; BadHello, EOFError."""
    data = b""
    async with asyncio.timeout(timeout):
        while True:
            chunk = await reader.read(MAX_HELLO)
            if not chunk:
                raise EOFError("the client closed before its ClientHello")
            data += chunk
            try:
                return data, parse(data)
            except Incomplete:
                if len(data) > MAX_HELLO:
                    raise BadHello("ClientHello too large") from None
