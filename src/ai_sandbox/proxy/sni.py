"""The server name of a TLS ClientHello, read from the first bytes of a blind tunnel before it is spliced.

A tunnel to an allowed name must not carry TLS for another name (a CDN routes by SNI). The ClientHello may be
split over several TLS records; anything that is not a well-formed ClientHello is refused, never guessed at.

A ClientHello with Encrypted Client Hello (ECH, extension 0xfe0d) or the older encrypted SNI (ESNI, 0xffce) is
refused too: the name checked would be only the outer one, while the CDN routes by the encrypted inner name, which
can be any site it serves. A GREASE ECH extension (sent by browsers that have no ECH key for the site) cannot be
told from a real one, by design, so it is refused alike.

After a HelloRetryRequest the client sends a second ClientHello; RFC 8446 4.1.2 has it keep the first one's server
name, but a hostile client need not, so that second ClientHello is checked the same way (see `retry_request` and
`second_hello`). Nothing after it is plaintext that could name a server.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")
MAX_HELLO = 64 * 1024
HANDSHAKE = 0x16
CHANGE_CIPHER_SPEC, APPLICATION_DATA = 0x14, 0x17
CLIENT_HELLO, SERVER_HELLO = 1, 2
EXT_SERVER_NAME = 0
HOST_NAME = 0
HIDDEN_NAME = {0xFE0D: "Encrypted Client Hello (ECH)", 0xFFCE: "encrypted SNI (ESNI)"}
# The `random` of a ServerHello that is a HelloRetryRequest (RFC 8446 4.1.3): SHA-256 of "HelloRetryRequest".
RETRY_RANDOM = bytes.fromhex("cf21ad74e59a6111be1d8c021e65b891c2a211167abb8c5e079e09e2c8a8339c")
_NAMES = {CLIENT_HELLO: "ClientHello", SERVER_HELLO: "ServerHello"}


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


def handshake_message(data: bytes, kind: int = CLIENT_HELLO) -> bytes:
    """The body of the first handshake message carried by the TLS records at the start of `data`, which must be of
    type `kind` (Incomplete if cut short)."""
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
            if payload[0] != kind:
                raise BadHello(f"first handshake message is not a {_NAMES[kind]}")
            size = int.from_bytes(payload[1:4], "big")
            if size + 4 > MAX_HELLO:
                raise BadHello(f"{_NAMES[kind]} too large")
            if len(payload) >= size + 4:
                return payload[4 : size + 4]
        if pos >= MAX_HELLO:
            raise BadHello(f"{_NAMES[kind]} too large")


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
        if kind in HIDDEN_NAME:
            raise BadHello(f"the ClientHello carries {HIDDEN_NAME[kind]}, which hides the server name")
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


def retry_request(data: bytes) -> bool:
    """Whether the server's first answer at the start of `data` is a HelloRetryRequest (Incomplete if cut short).
    Anything else (a ServerHello, an alert, what is not TLS) is no concern of ours: False."""
    try:
        body = handshake_message(data, SERVER_HELLO)
    except BadHello:
        return False
    return body[2:34] == RETRY_RANDOM


def second_hello(data: bytes) -> str | None:
    """SNI of the ClientHello that answers a HelloRetryRequest: the client's records after its first ClientHello
    may begin with a ChangeCipherSpec (middlebox compatibility) and early data (which the server skips)."""
    pos = 0
    while len(data) >= pos + 5 and data[pos] in (CHANGE_CIPHER_SPEC, APPLICATION_DATA):
        pos += 5 + int.from_bytes(data[pos + 3 : pos + 5], "big")
        if pos > MAX_HELLO:
            raise BadHello("too much early data before the second ClientHello")
    return parse(data[pos:])


async def read_parsed(
    reader: asyncio.StreamReader, timeout: float, parser: Callable[[bytes], T], what: str = "ClientHello"
) -> tuple[bytes, T]:
    """The bytes read (to pass on unchanged) until `parser` stops asking for more, and what it found; BadHello,
    EOFError, TimeoutError."""
    data = b""
    async with asyncio.timeout(timeout):
        while True:
            chunk = await reader.read(MAX_HELLO)
            if not chunk:
                raise EOFError(f"the connection closed before its {what}")
            data += chunk
            try:
                return data, parser(data)
            except Incomplete:
                if len(data) > MAX_HELLO:
                    raise BadHello(f"{what} too large") from None


async def read_client_hello(reader: asyncio.StreamReader, timeout: float) -> tuple[bytes, str | None]:
    """The bytes of the ClientHello as received (to pass on unchanged) and its server name; BadHello, EOFError."""
    return await read_parsed(reader, timeout, parse)
