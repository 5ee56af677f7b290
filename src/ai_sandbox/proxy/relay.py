"""One request and its response, relayed between the guest and an upstream server.

Inside an intercepted tunnel every request must name the tunnel's own host, gets the credentials of that host put
in, and goes on over TLS (verified against the system's trust store) on a kept-alive upstream connection. Plain
HTTP requests go out on a fresh connection each and never get a credential: that would be a secret in clear text.
"""

from __future__ import annotations

import asyncio
import ssl
from dataclasses import dataclass
from urllib.parse import urlsplit

from ai_sandbox.proxy.broker import Broker
from ai_sandbox.proxy.log import ALLOW, DENY, RequestLog
from ai_sandbox.proxy.scrub import Hit, Scanner, Stream
from ai_sandbox.proxy.wire import (
    BUFFER,
    UNTIL_CLOSE,
    BadMessage,
    Head,
    Header,
    copy_body,
    end_to_end,
    pipe,
    read_head,
    render,
    request_framing,
    response_framing,
    split_authority,
)

CONNECT_TIMEOUT = 15.0


class Failed(Exception):
    """A request that ends here: refused by the policy (deny) or failed upstream (allow, but 502)."""

    def __init__(self, status: int, reason: str, verdict: str = DENY) -> None:
        super().__init__(reason)
        self.status, self.reason, self.verdict = status, reason, verdict


@dataclass
class Upstream:
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    reused: bool = False

    def close(self) -> None:
        self.writer.close()


@dataclass(frozen=True)
class Target:
    host: str
    port: int
    addresses: list[str]
    tls: bool  # intercepted: talk TLS upstream and put credentials in


async def open_upstream(target: Target, tls_context: ssl.SSLContext) -> Upstream:
    """A connection to the first of the target's checked addresses that answers; raises Failed."""
    tls = tls_context if target.tls else None
    last: Exception | None = None
    for address in target.addresses:
        try:
            opening = asyncio.open_connection(
                address, target.port, ssl=tls, server_hostname=target.host if tls else None, limit=BUFFER
            )
            reader, writer = await asyncio.wait_for(opening, CONNECT_TIMEOUT)
            return Upstream(reader, writer)
        except (OSError, TimeoutError) as e:
            last = e
    untrusted = isinstance(last, ssl.SSLCertVerificationError)
    raise Failed(502, "upstream certificate not trusted" if untrusted else "upstream unreachable", ALLOW)


class Relay:
    """`keys` masks the real credentials in what comes back on intercepted connections; `honey` watches what the
    guest sends for the sandbox's honeytokens (raises scrub.Hit)."""

    def __init__(
        self, broker: Broker, log: RequestLog, tls_context: ssl.SSLContext, keys: Scanner | None = None,
        honey: Scanner | None = None,
    ) -> None:  # fmt: skip
        self.broker, self.log, self.tls_context = broker, log, tls_context
        self.keys = keys if keys is not None else Scanner(broker.secrets())
        self.honey = honey if honey is not None else Scanner({})

    async def forward(
        self, head: Head, path: str, headers: list[Header], target: Target, upstream: Upstream | None,
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, why: str = "intercepted",
    ) -> tuple[Upstream | None, bool]:  # fmt: skip
        """One request and its response; returns the upstream connection to reuse (if any) and whether to go on."""
        method, framing = head.first[0], request_framing(head)
        upgrade = target.tls and "upgrade" in (v.lower() for v in head.values("connection"))
        if upgrade and not _websocket(head):
            raise Failed(400, "only an upgrade to WebSocket is allowed")
        headers = end_to_end(headers, ("connection", "upgrade") if upgrade else ())
        if any(k.lower() == "expect" and v.lower() == "100-continue" for k, v in headers):
            # The guest waits for this before sending its body; we stream the body as it comes either way.
            headers = [(k, v) for k, v in headers if k.lower() != "expect"]
            writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        used: list[str] = []
        if target.tls:
            # A compressed response could not be masked: ask for none (and refuse one that comes anyway, below).
            # A range of a response could split an echoed key in two, each part too short to be recognised.
            headers = [h for h in headers if h[0].lower() not in _DROPPED_WHEN_INTERCEPTED]
            headers.append(("Accept-Encoding", "identity"))
            headers, path, used = self.broker.apply(headers, path, target.host)
        else:
            headers.append(("Connection", "close"))
        request = render((method, path, "HTTP/1.1"), headers)
        upstream, response = await self._exchange(request, reader, framing, target, upstream)
        try:
            framing_up = response_framing(response, method)
            if target.tls:
                _checkable(response, upgrade)
        except (BadMessage, Failed):
            upstream.close()
            raise
        mask = self.keys.masker() if target.tls and self.keys else None
        status = int(response.first[1])
        upgraded = upgrade and status == 101
        keep_up = target.tls and not upgraded and framing_up != UNTIL_CLOSE and not response.wants_close()
        keep = not upgraded and framing_up != UNTIL_CLOSE and not head.wants_close()
        out = end_to_end(response.headers, ("connection", "upgrade") if upgraded else ())
        if mask is not None:
            out = [(mask.text(k), mask.text(v)) for k, v in out]
        if not keep and not upgraded:
            out.append(("Connection", "close"))
        if status == 101 and not upgraded:
            upstream.close()
            raise Failed(502, "upstream switched protocols unasked", ALLOW)
        reason_phrase = mask.text(response.first[2]) if mask is not None else response.first[2]
        writer.write(render(("HTTP/1.1", response.first[1], reason_phrase), out))
        reason = why + (f"; credential {', '.join(used)}" if used else "")
        self.log.record(method, target.host, target.port, ALLOW, reason, status)
        try:
            await copy_body(upstream.reader, writer, framing_up, 502, mask)
            if upgraded:
                await pipe(reader, writer, upstream.reader, upstream.writer, self._watch(), self.keys.masker())
        except (BadMessage, OSError, asyncio.IncompleteReadError):
            keep = keep_up = False
        except Hit as e:
            upstream.close()
            e.answered = True
            raise
        if not keep_up:
            upstream.close()
        return (upstream if keep_up else None), keep

    async def _exchange(
        self, request: bytes, reader: asyncio.StreamReader, framing: int, target: Target, upstream: Upstream | None
    ) -> tuple[Upstream, Head]:
        """Send the request (and stream its body), read the final response head (1xx are dropped).

        A kept-alive upstream connection that turns out closed is reopened once, for requests without a body.
        """
        for attempt in (1, 2):
            if upstream is None:
                upstream = await open_upstream(target, self.tls_context)
            try:
                upstream.writer.write(request)
                await copy_body(reader, upstream.writer, framing, 400, self._watch())
                response = await read_head(upstream.reader, request=False)
                while int(response.first[1]) < 200 and response.first[1] != "101":
                    response = await read_head(upstream.reader, request=False)
                upstream.reused = True
                return upstream, response
            except (EOFError, ConnectionError) as e:
                upstream.close()
                if attempt == 1 and upstream.reused and framing == 0:
                    upstream = None
                    continue
                raise Failed(502, "upstream closed the connection", ALLOW) from e
            except (BadMessage, Hit):
                upstream.close()
                raise
        raise AssertionError("unreachable")

    def _watch(self) -> Stream | None:
        return self.honey.watcher() if self.honey else None


_DROPPED_WHEN_INTERCEPTED = ("accept-encoding", "sec-websocket-extensions", "range", "if-range", "te")


def _websocket(head: Head) -> bool:
    return [v.lower() for v in head.values("upgrade")] == ["websocket"]


def _checkable(response: Head, upgrade: bool) -> None:
    """Refuses (502) an intercepted response whose body could hide a key from masking: compressed, in a transfer
    coding other than plain chunked, or switched to another protocol than the WebSocket that was asked for."""
    if any(c.lower() != "identity" for c in response.values("content-encoding")):
        raise Failed(502, "upstream sent a compressed response, which cannot be checked for keys", ALLOW)
    codings = [c.lower() for c in response.values("transfer-encoding")]
    if codings and codings != ["chunked"]:
        raise Failed(502, "upstream sent a transfer coding other than chunked, which cannot be checked", ALLOW)
    if upgrade and response.first[1] == "101" and not _websocket(response):
        raise Failed(502, "upstream switched to another protocol than WebSocket", ALLOW)


def inner_target(head: Head, target: Target) -> str:
    """The origin-form path of a request inside an intercepted tunnel; refuses any other host than the tunnel's."""
    raw = head.first[1]
    authorities = [v for k, v in head.headers if k.lower() == "host"]
    path = raw
    if not raw.startswith("/") and raw != "*":
        url = urlsplit(raw)
        if url.scheme.lower() != "https" or not url.netloc:
            raise BadMessage("malformed request target")
        authorities.append(url.netloc)
        path = (url.path or "/") + (f"?{url.query}" if url.query else "")
    if not authorities or len([k for k, _ in head.headers if k.lower() == "host"]) > 1:
        raise BadMessage("exactly one Host header expected")
    for authority in authorities:
        if split_authority(authority, 443) != (target.host, target.port):
            raise Failed(403, "Host differs from the CONNECT target")
    return path
