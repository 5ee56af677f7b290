"""HTTP/1.1 heads and bodies on the wire: parsing, framing, re-framing, and refusing anything ambiguous."""

from __future__ import annotations

import asyncio

import pytest

from ai_sandbox.proxy import wire
from ai_sandbox.proxy.wire import CHUNKED, UNTIL_CLOSE, BadMessage, Head

pytestmark = pytest.mark.unit


def _reader(data: bytes) -> asyncio.StreamReader:
    reader = asyncio.StreamReader()
    reader.feed_data(data)
    reader.feed_eof()
    return reader


def head_of(data: bytes, request: bool = True) -> Head:
    return asyncio.run(_read_head(data, request))


async def _read_head(data: bytes, request: bool) -> Head:
    return await wire.read_head(_reader(data), request=request)


class Sink:
    """Enough of a StreamWriter to collect what is written."""

    def __init__(self) -> None:
        self.data = b""

    def write(self, data: bytes) -> None:
        self.data += data

    async def drain(self) -> None:
        pass


def copied(data: bytes, framing: int) -> tuple[bytes, bytes]:
    """(what was forwarded, what is left unread)."""

    async def go() -> tuple[bytes, bytes]:
        reader, sink = _reader(data), Sink()
        await wire.copy_body(reader, sink, framing, 400)  # type: ignore[arg-type]
        return sink.data, await reader.read()

    return asyncio.run(go())


def test_a_request_head():
    head = head_of(b"GET http://a.example/x?y HTTP/1.1\r\nHost: a.example\r\nX-Two:  v1, v2 \r\nx-two: v3\r\n\r\nBODY")
    assert head.first == ("GET", "http://a.example/x?y", "HTTP/1.1")
    assert head.get("host") == "a.example"
    assert head.values("x-two") == ["v1", "v2", "v3"]
    assert not head.wants_close()


def test_bare_newlines_and_a_leading_empty_line_are_tolerated():
    assert head_of(b"\r\nGET / HTTP/1.0\nA: b\n\n").first == ("GET", "/", "HTTP/1.0")
    assert head_of(b"GET / HTTP/1.0\r\n\r\n").wants_close()


def test_a_response_head():
    head = head_of(b"HTTP/1.1 404 Not Found Here\r\nConnection: close\r\n\r\n", request=False)
    assert head.first == ("HTTP/1.1", "404", "Not Found Here") and head.wants_close()
    assert head_of(b"HTTP/1.1 204\r\n\r\n", request=False).first == ("HTTP/1.1", "204", "")


@pytest.mark.parametrize(
    "data",
    [
        b"GET\r\n\r\n", b"GET / HTTP/1.1 extra\r\n\r\n", b"G(T / HTTP/1.1\r\n\r\n", b"GET /\x00 HTTP/1.1\r\n\r\n",
        b"GET / HTTP/2\r\n\r\n", b"GET / HTTP/1.1\r\nNo colon\r\n\r\n", b"GET / HTTP/1.1\r\nBad Name: x\r\n\r\n",
        b"GET / HTTP/1.1\r\nA: b\r\n c\r\n\r\n", b"GET / HTTP/1.1\r\nA: b\x00c\r\n\r\n", b"GET / HTTP/1.1\r\nA: b",
        b"GET / HTTP/1.1\r\nA: b\rc\r\n\r\n", b"GET / HTTP/1.1\r\n" + b"A: b\r\n" * 200 + b"\r\n",
        b"GET /" + b"a" * 70000 + b" HTTP/1.1\r\n\r\n", b"\r\n" * 10,
    ],
)  # fmt: skip
def test_malformed_requests_are_bad_messages(data):
    with pytest.raises(BadMessage) as e:
        head_of(data)
    assert e.value.status in (400, 431)


def test_end_of_stream_before_a_request_is_eof():
    with pytest.raises(EOFError):
        head_of(b"")


@pytest.mark.parametrize("data", [b"HTTP/1.1 99 x\r\n\r\n", b"HTP/1.1 200 OK\r\n\r\n", b"HTTP/1.1 200 OK\r\nA\r\n\r\n"])
def test_malformed_responses_are_502(data):
    with pytest.raises(BadMessage) as e:
        head_of(data, request=False)
    assert e.value.status == 502


@pytest.mark.parametrize(
    ("headers", "framing"),
    [
        (b"", 0), (b"Content-Length: 12\r\n", 12), (b"Content-Length: 5\r\nContent-Length: 5\r\n", 5),
        (b"Transfer-Encoding: chunked\r\n", CHUNKED), (b"Transfer-Encoding: Chunked\r\n", CHUNKED),
    ],
)  # fmt: skip
def test_request_framing(headers, framing):
    assert wire.request_framing(head_of(b"POST / HTTP/1.1\r\n" + headers + b"\r\n")) == framing


@pytest.mark.parametrize(
    ("headers", "status"),
    [
        (b"Content-Length: 5\r\nContent-Length: 6\r\n", 400), (b"Content-Length: -1\r\n", 400),
        (b"Content-Length: 1e3\r\n", 400), (b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n", 400),
        (b"Transfer-Encoding: gzip, chunked\r\n", 501),
        (b"Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n", 501),
    ],
)  # fmt: skip
def test_ambiguous_request_framing_is_refused(headers, status):
    with pytest.raises(BadMessage) as e:
        wire.request_framing(head_of(b"POST / HTTP/1.1\r\n" + headers + b"\r\n"))
    assert e.value.status == status


@pytest.mark.parametrize(
    ("status_line", "headers", "method", "framing"),
    [
        (b"200 OK", b"Content-Length: 3\r\n", "GET", 3), (b"200 OK", b"Content-Length: 3\r\n", "HEAD", 0),
        (b"204 No Content", b"", "GET", 0), (b"304 Not Modified", b"Content-Length: 9\r\n", "GET", 0),
        (b"200 OK", b"", "GET", UNTIL_CLOSE), (b"200 OK", b"Transfer-Encoding: gzip, chunked\r\n", "GET", CHUNKED),
        (b"200 OK", b"Transfer-Encoding: gzip\r\n", "GET", UNTIL_CLOSE), (b"100 Continue", b"", "POST", 0),
    ],
)  # fmt: skip
def test_response_framing(status_line, headers, method, framing):
    head = head_of(b"HTTP/1.1 " + status_line + b"\r\n" + headers + b"\r\n", request=False)
    assert wire.response_framing(head, method) == framing


def test_bodies_are_copied_exactly_and_the_rest_is_left():
    assert copied(b"hello world", 5) == (b"hello", b" world")
    assert copied(b"abc", UNTIL_CLOSE) == (b"abc", b"")
    chunked = b"5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nTrailer-A: x\r\n\r\nNEXT"
    assert copied(chunked, CHUNKED) == (b"5\r\nhello\r\n6\r\n world\r\n0\r\nTrailer-A: x\r\n\r\n", b"NEXT")


@pytest.mark.parametrize(
    ("data", "framing"),
    [(b"abc", 5), (b"zz\r\nhello\r\n", CHUNKED), (b"5\r\nhelloXX0\r\n\r\n", CHUNKED), (b"5\r\nhello\r\n", CHUNKED),
     (b"0\r\nbad trailer\r\n\r\n", CHUNKED), (b"-5\r\n", CHUNKED)],
)  # fmt: skip
def test_broken_bodies_are_bad_messages(data, framing):
    with pytest.raises(BadMessage):
        copied(data, framing)


@pytest.mark.parametrize(
    ("authority", "default", "expected"),
    [
        ("api.example.com:443", None, ("api.example.com", 443)), ("API.Example.com.", 80, ("api.example.com", 80)),
        ("[::1]:8443", None, ("::1", 8443)), ("[2001:db8::1]", 443, ("2001:db8::1", 443)),
        ("127.0.0.1:80", None, ("127.0.0.1", 80)),
    ],
)  # fmt: skip
def test_authorities(authority, default, expected):
    assert wire.split_authority(authority, default) == expected


@pytest.mark.parametrize(
    "authority",
    ["api.example.com", "h:0", "h:65536", "h:-1", "h:80:80", "user@h:80", "[::1", "::1:443", "a..b:1", ":443", "h:1x",
     "a b:1", "[zz]:1"],
)  # fmt: skip
def test_bad_authorities(authority):
    with pytest.raises(BadMessage):
        wire.split_authority(authority, None)


def test_hop_by_hop_headers_are_dropped():
    headers = [("Connection", "keep-alive, X-Private"), ("X-Private", "1"), ("Keep-Alive", "5"), ("TE", "trailers"),
               ("Proxy-Authorization", "Basic eA=="), ("Upgrade", "websocket"), ("Accept", "*/*")]  # fmt: skip
    assert wire.end_to_end(headers) == [("Accept", "*/*")]
    assert wire.end_to_end(headers, ("connection", "upgrade")) == [
        ("Connection", "keep-alive, X-Private"), ("Upgrade", "websocket"), ("Accept", "*/*"),
    ]  # fmt: skip


def test_error_responses_close_the_connection():
    data = wire.error_response(403, "deny-list: x")
    assert data.startswith(b"HTTP/1.1 403 Forbidden\r\n") and b"Connection: close\r\n" in data
    head = head_of(data, request=False)
    assert int(head.get("content-length") or 0) == len(data.split(b"\r\n\r\n", 1)[1])
