"""A TCP port forward: each connection to the listening socket is relayed to one fixed host:port.

The guest chooses nothing but the bytes: the target is fixed by the host's settings, so a forward of Ollama's
port reaches exactly that port of the host's loopback and no other.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket

log = logging.getLogger("ai_sandbox.hostagent.forward")
CONNECT_TIMEOUT = 10.0
MAX_CONNECTIONS = 64
CHUNK = 64 * 1024


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(CHUNK):
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()  # half-close: the other direction may still be talking
    except (ConnectionError, OSError):
        writer.close()


class Forwarder:
    """Serves one forward on an already-listening socket until `aclose`."""

    def __init__(self, name: str, to_host: str, to_port: int, *, max_connections: int = MAX_CONNECTIONS) -> None:
        self.name, self.to_host, self.to_port = name, to_host, to_port
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
                await self._relay(reader, writer)
        finally:
            self._tasks.discard(task)
            writer.close()

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_r, up_w = await asyncio.wait_for(asyncio.open_connection(self.to_host, self.to_port), CONNECT_TIMEOUT)
        except (OSError, TimeoutError) as e:
            log.info("%s: cannot reach %s:%d: %s", self.name, self.to_host, self.to_port, e)
            return
        try:
            await asyncio.gather(_pipe(reader, up_w), _pipe(up_r, writer))
        finally:
            up_w.close()
            with contextlib.suppress(Exception):
                await up_w.wait_closed()

    async def aclose(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()
