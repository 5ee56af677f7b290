"""What the guest may ask of the host's Ollama, and the plain HTTP pieces the forward needs around that.

Ollama's API can do far more than answer prompts: `/api/pull` and `/api/push` make the host's Ollama connect to any
registry the request names (an open door out of a proxy-mode sandbox), `/api/create` and `/api/blobs` write to the
host's disk, `/api/delete` removes the user's models. The guest gets inference and reading, nothing else.

Routes are compared with the request target as sent, before any decoding: `/api/%70ull` or `/api/tags/../pull`
match nothing here, whatever the server behind would make of them.
"""

from __future__ import annotations

import json
import time
from http import HTTPStatus

READ = ("GET", "HEAD")
ROUTES: dict[str, tuple[str, ...]] = {
    "/": READ,  # "Ollama is running": clients' health check
    "/api/tags": READ,
    "/api/ps": READ,
    "/api/version": READ,
    "/api/show": ("POST",),
    "/api/generate": ("POST",),
    "/api/chat": ("POST",),
    "/api/embed": ("POST",),
    "/api/embeddings": ("POST",),
    "/v1/chat/completions": ("POST",),
    "/v1/completions": ("POST",),
    "/v1/embeddings": ("POST",),
    "/v1/models": READ,
}
# Not passed on: hop-by-hop headers (RFC 9110 7.6.1), the framing (set again from what h11 read), Host (the
# upstream's own, or Ollama refuses a foreign one) and Expect (the forward answers 100-continue itself).
DROPPED = frozenset({b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer", b"transfer-encoding",
                     b"upgrade", b"content-length", b"host", b"expect", b"proxy-authorization"})
SHOWN = 200  # characters of guest text in a log line


def allowed(method: bytes, target: bytes) -> bool:
    """May the guest send this request line? The path must be one of ROUTES exactly; a query string may follow."""
    path = target.split(b"?", 1)[0].decode("ascii", "replace")
    return method.decode("ascii", "replace") in ROUTES.get(path, ())


def host_header(host: str, port: int) -> bytes:
    return (f"[{host}]:{port}" if ":" in host else f"{host}:{port}").encode("ascii")


def upstream_headers(headers: list[tuple[bytes, bytes]], host: bytes, framing: tuple[bytes, bytes] | None,
                     ) -> list[tuple[bytes, bytes]]:
    """The guest's headers as sent on: hop-by-hop ones (and any its Connection header names) dropped, Host set to
    the upstream, one connection per request, the body framed as `framing` says (None: no body)."""
    named = {t.strip().lower() for name, value in headers if name.lower() == b"connection" for t in value.split(b",")}
    out = [(n, v) for n, v in headers if n.lower() not in DROPPED and n.lower() not in named]
    out = [(b"host", host), *out, (b"connection", b"close")]
    if framing is not None:
        out.append(framing)
    return out


def error_response(status: int, message: str) -> bytes:
    """A complete response with a one-line JSON body {"error": message}, as Ollama words its own errors."""
    body = json.dumps({"error": message}).encode() + b"\n"
    head = (f"HTTP/1.1 {status} {HTTPStatus(status).phrase}\r\ncontent-type: application/json; charset=utf-8\r\n"
            f"content-length: {len(body)}\r\nconnection: close\r\n\r\n")
    return head.encode("ascii") + body


def shown(text: bytes | str) -> str:
    """Guest text for a log line: cut to SHOWN characters and JSON-encoded (quotes, escapes, ASCII only)."""
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    cut = text[:SHOWN] + ("…" if len(text) > SHOWN else "")
    return json.dumps(cut, ensure_ascii=True)


class LogCap:
    """At most `burst` lines per `window` seconds; what was held back is counted into the next line let through."""

    def __init__(self, burst: int = 20, window: float = 60.0) -> None:
        self.burst, self.window = burst, window
        self._start, self._used, self.held = 0.0, 0, 0

    def take(self) -> int | None:
        """None: stay silent; else how many lines were held back before this one."""
        now = time.monotonic()
        if now - self._start >= self.window:
            self._start, self._used = now, 0
        if self._used >= self.burst:
            self.held += 1
            return None
        self._used += 1
        held, self.held = self.held, 0
        return held
