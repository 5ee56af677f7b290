"""HTTP/1.1 message heads and bodies, streamed: what a forward proxy needs, strict about anything ambiguous.

Ambiguity is how requests get smuggled past a proxy, so a message with both Content-Length and Transfer-Encoding,
differing lengths, folded or malformed header lines is refused rather than guessed at.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

MAX_LINE = 16 * 1024
MAX_HEADERS = 128
BUFFER = 256 * 1024
CHUNKED = -1  # body framings besides a byte count
UNTIL_CLOSE = -2

_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_TARGET = re.compile(rb"[\x21-\x7e]+")
_CTL = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
_VERSION = re.compile(rb"HTTP/1\.[01]")
_DIGITS = re.compile(r"[0-9]{1,18}")
_CHUNK_SIZE = re.compile(rb"([0-9a-fA-F]{1,15})[ \t]*(;[^\r\n]*)?")
_HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "proxy-authorization", "proxy-authenticate", "te",
               "trailer", "upgrade"}  # fmt: skip
REASONS = {200: "OK", 400: "Bad Request", 403: "Forbidden", 405: "Method Not Allowed", 431: "Header Too Large",
           501: "Not Implemented", 502: "Bad Gateway", 503: "Service Unavailable"}  # fmt: skip

Header = tuple[str, str]


class BadMessage(Exception):
    """A message we refuse; `status` is what the client gets (400 for the guest's, 502 for an upstream's)."""

    def __init__(self, reason: str, status: int = 400) -> None:
        super().__init__(reason)
        self.reason = reason
        self.status = status


@dataclass
class Head:
    """Start line (three parts) and headers of one message."""

    first: tuple[str, str, str]
    headers: list[Header]
    version: str

    def get(self, name: str) -> str | None:
        return next((v for k, v in self.headers if k.lower() == name), None)

    def values(self, name: str) -> list[str]:
        """Every comma-separated value of every `name` header."""
        return [p.strip() for k, v in self.headers if k.lower() == name for p in v.split(",") if p.strip()]

    def wants_close(self) -> bool:
        return "close" in (v.lower() for v in self.values("connection")) or self.version == "HTTP/1.0"


async def read_line(reader: asyncio.StreamReader, status: int = 400) -> bytes:
    try:
        line = await reader.readuntil(b"\n")
    except asyncio.IncompleteReadError as e:
        if not e.partial:
            raise EOFError from None
        raise BadMessage("truncated message", status) from None
    except asyncio.LimitOverrunError:
        raise BadMessage("line too long", 431 if status == 400 else status) from None
    if len(line) > MAX_LINE:
        raise BadMessage("line too long", 431 if status == 400 else status)
    return line.rstrip(b"\n").removesuffix(b"\r")


def parse_header(line: bytes, status: int = 400) -> Header:
    name, sep, value = line.partition(b":")
    if not sep or not _TOKEN.fullmatch(name):
        raise BadMessage("malformed header line", status)
    value = value.strip(b" \t")
    if _CTL.search(value):
        raise BadMessage("control character in a header", status)
    return name.decode("ascii"), value.decode("latin-1")


def parse_request_line(line: bytes) -> tuple[str, str, str]:
    parts = line.split(b" ")
    if len(parts) != 3 or not _TOKEN.fullmatch(parts[0]) or not _TARGET.fullmatch(parts[1]):
        raise BadMessage("malformed request line")
    if not _VERSION.fullmatch(parts[2]):
        raise BadMessage("unsupported HTTP version")
    method, target, version = (p.decode("ascii") for p in parts)
    return method, target, version


def parse_status_line(line: bytes) -> tuple[str, str, str]:
    parts = line.split(b" ", 2)
    if len(parts) < 2 or not _VERSION.fullmatch(parts[0]) or not re.fullmatch(rb"[1-5][0-9][0-9]", parts[1]):
        raise BadMessage("malformed status line from upstream", 502)
    reason = parts[2] if len(parts) == 3 else b""
    if _CTL.search(reason):
        raise BadMessage("malformed status line from upstream", 502)
    return parts[0].decode(), parts[1].decode(), reason.decode("latin-1")


async def read_head(reader: asyncio.StreamReader, *, request: bool) -> Head:
    """The next message head; EOFError if the stream ended cleanly before one began."""
    status = 400 if request else 502
    line = await read_line(reader, status)
    for _ in range(4):  # a few stray empty lines between messages are tolerated (RFC 9112, 2.2)
        if line:
            break
        line = await read_line(reader, status)
    first = parse_request_line(line) if request else parse_status_line(line)
    headers: list[Header] = []
    while True:
        try:
            line = await read_line(reader, status)
        except EOFError:
            raise BadMessage("truncated message", status) from None
        if not line:
            return Head(first, headers, first[2] if request else first[0])
        if line[:1] in (b" ", b"\t"):
            raise BadMessage("folded header line", status)
        if len(headers) >= MAX_HEADERS:
            raise BadMessage("too many headers", 431 if request else status)
        headers.append(parse_header(line, status))


def _content_length(head: Head, status: int) -> int | None:
    values = set(head.values("content-length"))
    if not values:
        if any(k.lower() == "content-length" for k, _ in head.headers):
            raise BadMessage("bad Content-Length", status)  # present but empty
        return None
    # str.isdigit() takes "²" and other Unicode digits, which int() then refuses: ASCII digits only.
    if len(values) > 1 or not _DIGITS.fullmatch(next(iter(values))):
        raise BadMessage("bad Content-Length", status)
    return int(values.pop())


def request_framing(head: Head) -> int:
    """Length of the request body, or CHUNKED; refuses ambiguous framing."""
    codings = [c.lower() for c in head.values("transfer-encoding")]
    length = _content_length(head, 400)
    if codings:
        if length is not None:
            raise BadMessage("both Content-Length and Transfer-Encoding")
        if codings != ["chunked"]:
            raise BadMessage("unsupported Transfer-Encoding", 501)
        return CHUNKED
    return length or 0


def response_framing(head: Head, method: str) -> int:
    status = int(head.first[1])
    if method == "HEAD" or status < 200 or status in (204, 304):
        return 0
    codings = [c.lower() for c in head.values("transfer-encoding")]
    if codings:
        return CHUNKED if codings[-1] == "chunked" else UNTIL_CLOSE
    length = _content_length(head, 502)
    return UNTIL_CLOSE if length is None else length


class Filter(Protocol):
    """What a body passes through on its way (scrub.Stream): may hold bytes back until flush()."""

    def feed(self, data: bytes) -> bytes: ...
    def flush(self) -> bytes: ...
    def text(self, value: str) -> str: ...


async def copy_exact(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int, status: int = 400, flt: Filter | None = None
) -> None:
    while n > 0:
        data = await reader.read(min(n, BUFFER))
        if not data:
            raise BadMessage("body ended early", status)
        n -= len(data)
        writer.write(flt.feed(data) if flt else data)
        await writer.drain()
    if flt:
        writer.write(flt.flush())


async def copy_until_close(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, flt: Filter | None = None
) -> None:
    while data := await reader.read(BUFFER):
        writer.write(flt.feed(data) if flt else data)
        await writer.drain()
    if flt:
        writer.write(flt.flush())


async def copy_chunked(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, status: int = 400, flt: Filter | None = None
) -> None:
    """Re-frames the body as we read it (extensions dropped), so what we forward is what we checked; with a filter,
    the chunks are what the filter lets through."""
    try:
        while True:
            match = _CHUNK_SIZE.fullmatch(await read_line(reader, status))
            if not match:
                raise BadMessage("bad chunk size", status)
            size = int(match.group(1), 16)
            if size == 0:
                break
            while size > 0:
                data = await reader.read(min(size, BUFFER))
                if not data:
                    raise BadMessage("chunked body ended early", status)
                size -= len(data)
                _chunk(writer, flt.feed(data) if flt else data)
                await writer.drain()
            if await reader.readexactly(2) != b"\r\n":
                raise BadMessage("bad chunk end", status)
        if flt:
            _chunk(writer, flt.flush())
        writer.write(b"0\r\n")
        for _ in range(MAX_HEADERS):
            line = await read_line(reader, status)
            if not line:
                writer.write(b"\r\n")
                await writer.drain()
                return
            name, value = parse_header(line, status)
            if flt:
                name, value = flt.text(name), flt.text(value)
            writer.write(f"{name}: {value}\r\n".encode("latin-1"))
        raise BadMessage("too many trailers", status)
    except (EOFError, asyncio.IncompleteReadError):
        raise BadMessage("chunked body ended early", status) from None


def _chunk(writer: asyncio.StreamWriter, data: bytes) -> None:
    if data:
        writer.write(b"%x\r\n%s\r\n" % (len(data), data))


async def copy_body(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, framing: int, status: int, flt: Filter | None = None
) -> None:
    if framing == CHUNKED:
        await copy_chunked(reader, writer, status, flt)
    elif framing == UNTIL_CLOSE:
        await copy_until_close(reader, writer, flt)
    elif framing > 0:
        await copy_exact(reader, writer, framing, status, flt)


def render(first: Iterable[str], headers: Iterable[Header]) -> bytes:
    lines = [" ".join(first).rstrip(" ")] + [f"{k}: {v}" for k, v in headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def error_response(status: int, message: str) -> bytes:
    body = f"ai-sandbox proxy: {message}\n".encode("ascii", "replace")
    headers = [("Content-Type", "text/plain"), ("Content-Length", str(len(body))), ("Connection", "close")]
    return render(("HTTP/1.1", str(status), REASONS.get(status, "Error")), headers) + body


def end_to_end(headers: Iterable[Header], keep: Iterable[str] = ()) -> list[Header]:
    """Headers without the hop-by-hop ones (and those the Connection header names), except those in `keep`."""
    headers = list(headers)
    named = {p.strip().lower() for k, v in headers if k.lower() == "connection" for p in v.split(",")}
    drop = (_HOP_BY_HOP | named) - {k.lower() for k in keep}
    return [(k, v) for k, v in headers if k.lower() not in drop]


def split_authority(authority: str, default_port: int | None) -> tuple[str, int]:
    """host and port of `host[:port]` / `[v6]:port`; BadMessage when malformed."""
    if authority.startswith("["):
        host, sep, rest = authority[1:].partition("]")
        port_text = rest[1:] if rest.startswith(":") else ("" if not rest else "x")
        valid = bool(sep) and re.fullmatch(r"[0-9A-Fa-f:.]+", host) is not None
    else:
        host, _, port_text = authority.partition(":")
        valid = re.fullmatch(r"[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*\.?", host) is not None
    if not valid or len(host) > 253:
        raise BadMessage("malformed host")
    if not port_text and default_port is not None:
        port = default_port
    elif re.fullmatch(r"[0-9]{1,5}", port_text) and 0 < int(port_text) < 65536:
        port = int(port_text)
    else:
        raise BadMessage("malformed port")
    return host.rstrip(".").lower(), port


async def _pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter, flt: Filter | None = None) -> None:
    try:
        await copy_until_close(src, dst, flt)
    finally:
        # Pass the half-close on where the transport can (TCP); TLS cannot, so the whole connection ends.
        try:
            if dst.can_write_eof() and not dst.is_closing():
                dst.write_eof()
            else:
                dst.close()
        except OSError:
            dst.close()


async def pipe(
    a_reader: asyncio.StreamReader, a_writer: asyncio.StreamWriter,
    b_reader: asyncio.StreamReader, b_writer: asyncio.StreamWriter,
    a_to_b: Filter | None = None, b_to_a: Filter | None = None,
) -> None:  # fmt: skip
    """Copy both ways until both sides are done (half-close is passed on) or either fails. A filter's own exception
    (a watched secret seen) is raised once both directions are stopped; connection errors just end the pipe."""
    tasks = [asyncio.ensure_future(_pump(a_reader, b_writer, a_to_b)),
             asyncio.ensure_future(_pump(b_reader, a_writer, b_to_a))]  # fmt: skip
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
    finally:
        for task in tasks:
            task.cancel()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        b_writer.close()
    ended = OSError | EOFError | BadMessage | asyncio.IncompleteReadError
    for result in results:
        if isinstance(result, Exception) and not isinstance(result, ended):
            raise result
