"""The guest's forward to the host's Ollama: one HTTP request per connection, inference and read routes only.

The target is fixed by the host's settings; the guest chooses only what it asks, and that is checked. Each
connection carries one request: its head is parsed by h11 (at most MAX_HEAD bytes), its route checked against
`httpgate.ROUTES` (anything else: 403, and a capped log line), then the head is sent on rewritten (Host of the
upstream, `Connection: close`) with the body as h11 framed it (at most `max_body` bytes). The upstream's response
goes back byte for byte until the upstream closes: Ollama streams NDJSON, and nothing in it needs reading here.
A guest that hangs up mid-answer closes the upstream connection too, which stops Ollama's generation.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from dataclasses import dataclass

import h11

from ai_sandbox.hostagent import httpgate

log = logging.getLogger("ai_sandbox.hostagent.forward")
CONNECT_TIMEOUT = 10.0
HEAD_TIMEOUT = 30.0  # for the whole request head: a guest that trickles it in holds a slot no longer
BODY_IDLE = 60.0  # between pieces of a request body
LINGER = 2.0  # after an error response, read what the guest still sends, so that closing is no reset
MAX_CONNECTIONS = 64
MAX_HEAD = 64 * 1024
MAX_BODY = 64 << 20
CHUNK = 64 * 1024


@dataclass
class Reject(Exception):
    """The guest gets this status and message, and the connection ends."""

    status: int
    message: str


class Forwarder:
    """Serves one forward on an already-listening socket until `aclose`."""

    def __init__(self, name: str, to_host: str, to_port: int, *, max_connections: int = MAX_CONNECTIONS,
                 max_body: int = MAX_BODY, log_cap: httpgate.LogCap | None = None) -> None:
        self.name, self.to_host, self.to_port, self.max_body = name, to_host, to_port, max_body
        self._host = httpgate.host_header(to_host, to_port)
        self._logcap = log_cap or httpgate.LogCap()
        self._slots = asyncio.Semaphore(max_connections)
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self, sock: socket.socket) -> None:
        self._server = await asyncio.start_server(self._client, sock=sock)

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            if self._slots.locked():
                log.warning("%s: too many connections; refusing one", self.name)
                return
            async with self._slots:
                await self._serve(reader, writer)
        except (ConnectionError, OSError):
            pass  # the guest went away
        except asyncio.CancelledError:
            pass  # aclose: this connection ends here
        finally:
            self._tasks.discard(task)
            writer.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD)
        try:
            req = await asyncio.wait_for(_next(conn, reader, MAX_HEAD), HEAD_TIMEOUT)
            if req is None:
                return  # connected, sent nothing, left
            self._check(req, writer)
            up_r, up_w = await self._connect()
        except h11.RemoteProtocolError as e:
            return await _refuse(reader, writer, Reject(e.error_status_hint, f"bad request: {str(e)[:200]}"))
        except TimeoutError:
            return await _refuse(reader, writer, Reject(408, "the request head came too slowly"))
        except Reject as e:
            return await _refuse(reader, writer, e)
        try:
            await self._exchange(conn, req, reader, writer, up_r, up_w)
        finally:
            up_w.close()
            with contextlib.suppress(Exception):
                await up_w.wait_closed()

    def _check(self, req: h11.Request, writer: asyncio.StreamWriter) -> None:
        if not httpgate.allowed(req.method, req.target):
            held = self._logcap.take()
            if held is not None:
                more = f" ({held} more refused and not logged)" if held else ""
                log.warning("%s: refused %s %s from %s%s", self.name, httpgate.shown(req.method),
                            httpgate.shown(req.target), writer.get_extra_info("peername", ("?",))[0], more)
            route = (req.method + b" " + req.target.split(b"?")[0][:100]).decode("ascii", "replace")
            raise Reject(403, f"the sandbox may use the host's Ollama for inference and reading only; "
                              f"{route} is refused (pull and manage models on the host)")
        length = _content_length(req)
        if length is not None and length > self.max_body:
            raise Reject(413, f"request body over {self.max_body} bytes")

    async def _connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        try:
            return await asyncio.wait_for(asyncio.open_connection(self.to_host, self.to_port), CONNECT_TIMEOUT)
        except (OSError, TimeoutError) as e:
            log.info("%s: cannot reach %s:%d: %s", self.name, self.to_host, self.to_port, e)
            raise Reject(502, f"the host's Ollama does not answer at {self._host.decode()}") from None

    async def _exchange(self, conn: h11.Connection, req: h11.Request, reader: asyncio.StreamReader,
                        writer: asyncio.StreamWriter, up_r: asyncio.StreamReader, up_w: asyncio.StreamWriter) -> None:
        sent = [0]
        relay = asyncio.create_task(_relay(up_r, writer, sent))
        body = asyncio.create_task(self._send(conn, req, reader, writer, up_w))
        try:
            await asyncio.wait({relay, body}, return_when=asyncio.FIRST_COMPLETED)
            if not relay.done():
                try:
                    outcome = body.result()
                except Reject as e:
                    if sent[0] == 0:
                        relay.cancel()
                        return await _refuse(reader, writer, e)
                    return
                except (ConnectionError, OSError, TimeoutError, h11.RemoteProtocolError):
                    return  # the guest broke off its request; closing the upstream abandons it
                if outcome == "upstream-closed":
                    await relay  # it may have answered early (an error) and stopped reading
                # else the guest hung up before the answer was complete: stop the upstream
            elif relay.exception() is None:
                with contextlib.suppress(ConnectionError, OSError):
                    await writer.drain()
        finally:
            for t in (relay, body):
                t.cancel()
            await asyncio.gather(relay, body, return_exceptions=True)

    async def _send(self, conn: h11.Connection, req: h11.Request, reader: asyncio.StreamReader,
                    writer: asyncio.StreamWriter, up_w: asyncio.StreamWriter) -> str:
        """Send the request on; then wait for the guest to hang up. Returns why it stopped."""
        chunked = any(n == b"transfer-encoding" for n, _ in req.headers)
        length = _content_length(req)
        framing = ((b"transfer-encoding", b"chunked") if chunked else
                   (b"content-length", str(length).encode()) if length is not None else None)
        client = h11.Connection(h11.CLIENT)
        headers = httpgate.upstream_headers(list(req.headers), self._host, framing)
        try:
            up_w.write(client.send(h11.Request(method=req.method, target=req.target, headers=headers)))
            await up_w.drain()
        except (ConnectionError, OSError):
            return "upstream-closed"
        if conn.they_are_waiting_for_100_continue:
            writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        total = 0
        while True:
            event = await asyncio.wait_for(_next(conn, reader), BODY_IDLE)
            if event is None:
                return "guest-closed"
            if isinstance(event, h11.Data):
                total += len(event.data)
                if total > self.max_body:
                    raise Reject(413, f"request body over {self.max_body} bytes")
                data = client.send(event)
            elif isinstance(event, h11.EndOfMessage):
                data = client.send(h11.EndOfMessage())  # trailers stay behind
            else:
                continue
            try:
                up_w.write(data)
                await up_w.drain()
            except (ConnectionError, OSError):
                return "upstream-closed"
            if isinstance(event, h11.EndOfMessage):
                break
        # One request per connection: whatever else the guest sends is dropped; its hang-up ends the exchange.
        while await reader.read(CHUNK):
            pass
        return "guest-closed"

    async def aclose(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()


async def _next(conn: h11.Connection, reader: asyncio.StreamReader,
                limit: int | None = None) -> h11.Request | h11.Data | h11.EndOfMessage | None:
    """The next request event from the guest; None when it closed the connection. With `limit`, more bytes than
    that without a complete event are a 431 (h11's own limit lets a head that arrives in one piece through)."""
    fed = 0
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            if limit is not None and fed >= limit:
                raise h11.RemoteProtocolError(f"request head over {limit} bytes", 431)
            data = await reader.read(CHUNK)
            fed += len(data)
            conn.receive_data(data)
            continue
        if isinstance(event, h11.ConnectionClosed):
            return None
        if event is h11.PAUSED:
            raise h11.RemoteProtocolError("a second request on the same connection", 400)
        return event  # type: ignore[return-value]


def _content_length(req: h11.Request) -> int | None:
    if any(n == b"transfer-encoding" for n, _ in req.headers):
        return None
    values = [v for n, v in req.headers if n == b"content-length"]
    return int(values[0]) if values else None  # h11 has checked it is one decimal number


async def _relay(up_r: asyncio.StreamReader, writer: asyncio.StreamWriter, sent: list[int]) -> None:
    while data := await up_r.read(CHUNK):
        writer.write(data)
        sent[0] += len(data)
        await writer.drain()


async def _refuse(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, e: Reject) -> None:
    """Answer with the error, then read (and drop) what the guest still sends for a moment before closing."""
    writer.write(httpgate.error_response(e.status, e.message))
    try:
        await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()
        async with asyncio.timeout(LINGER):
            drained = 0
            while drained < MAX_BODY and (data := await reader.read(CHUNK)):
                drained += len(data)
    except (ConnectionError, OSError, TimeoutError):
        pass
