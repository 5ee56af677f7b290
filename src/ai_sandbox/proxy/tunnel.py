"""The plaintext start of a blind tunnel, checked before the tunnel is spliced: TLS passes unread afterwards.

The guest's ClientHello must name the CONNECT host and carry no Encrypted Client Hello or ESNI (see sni.py). When
the server answers it with a HelloRetryRequest, the guest's second ClientHello is checked the same way before it
goes on: RFC 8446 4.1.2 lets a client change only a few listed fields there, and the server name is not one of
them, but a hostile client is held to that here rather than trusted. Both are also watched for honeytokens;
everything after them is encrypted and is not (a tunnel carries no credential, but can carry a honeytoken
unseen).
"""

from __future__ import annotations

import asyncio

from ai_sandbox.proxy.relay import Upstream
from ai_sandbox.proxy.rules import normalize_host
from ai_sandbox.proxy.scrub import Hit, Scanner
from ai_sandbox.proxy.sni import BadHello, read_client_hello, read_parsed, retry_request, second_hello


def check(name: str | None, host: str, hello: bytes, honey: Scanner) -> None:
    """Raises BadHello unless the ClientHello names `host`; Hit when it carries a honeytoken."""
    if name is None:
        raise BadHello("the ClientHello names no server")
    if normalize_host(name) != host:
        raise BadHello(f"TLS server name {name[:100]} differs from the CONNECT target")
    found = honey.detect(hello) if honey else None
    if found:
        raise Hit(found)


async def first_hello(reader: asyncio.StreamReader, host: str, honey: Scanner, timeout: float) -> bytes:
    """The guest's first ClientHello, checked (BadHello, Hit, EOFError, TimeoutError)."""
    hello, name = await read_client_hello(reader, timeout)
    check(name, host, hello, honey)
    return hello


async def follow_retry(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, upstream: Upstream, host: str, honey: Scanner,
    timeout: float,
) -> None:  # fmt: skip
    """Once the first ClientHello went upstream: pass on the server's first answer and, if it is a
    HelloRetryRequest, the guest's second ClientHello once checked. Raises as first_hello; a server that closes
    first is left to the pipe, which passes its close on."""
    try:
        answer, retry = await read_parsed(upstream.reader, timeout, retry_request, "ServerHello")
    except EOFError:
        return
    writer.write(answer)
    if not retry:
        return
    data, name = await read_parsed(reader, timeout, second_hello, "second ClientHello")
    check(name, host, data, honey)
    upstream.writer.write(data)
