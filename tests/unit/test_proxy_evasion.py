"""Ways around the proxy's checks found in review, each closed: a name hidden by Encrypted Client Hello or by a
second ClientHello after a HelloRetryRequest, a key echoed in pieces (Range), in another transfer coding or
protocol, in a header name, in hex or `\\uXXXX` form; honeytokens encoded twice or in another letter case.

Parsers and scanners first, then the proxy on loopback (see test_proxy_harness).
"""

# ruff: noqa: F811  (pytest fixtures imported from test_proxy_harness are redefined as parameters)
from __future__ import annotations

import binascii
import functools
import hashlib
import json
import socket
import ssl
import struct
import threading
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import pytest
from test_proxy_harness import (  # noqa: F401
    HOSTS,
    SECRET,
    SECRETS,
    Rig,
    _Server,
    _server_context,
    client_context,
    make_rig,
    proxy_config,
    rig,
    upstreams,
)

from ai_sandbox.proxy import placeholder, read_log
from ai_sandbox.proxy import sni as sni_mod
from ai_sandbox.proxy.ca import load_or_create
from ai_sandbox.proxy.scrub import Hit, Scanner
from ai_sandbox.proxy.server import mapped_resolver, running

pytestmark = pytest.mark.unit

KEY = placeholder("TEST_API_KEY")
API, OTHER, PLAIN, HRR = "api.test.example", "other.test.example", "plain.test.example", "hrr.test.example"
AWS_KEY = "AKIAIOSFODNN7EXAMPLE"
AWS_SECRET = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"
HONEY = {"AWS_ACCESS_KEY_ID": AWS_KEY, "AWS_SECRET_ACCESS_KEY": AWS_SECRET, "PROD_DEPLOY_TOKEN": "dpt_" + "Zq9" * 12}
ECH, ESNI = 0xFE0D, 0xFFCE
# An ECH "outer" extension as a client sends it: type, HPKE suite, config id, encapsulated key, encrypted inner hello
ECH_BODY = b"\x00\x00\x01\x00\x01\x2a" + struct.pack(">H", 32) + b"k" * 32 + struct.pack(">H", 64) + b"i" * 64


def _last(rig: Rig) -> dict:
    return read_log(Path(rig.cfg.log))[-1]


# --- ClientHello: hidden names ---------------------------------------------------------------------------------


def _flight(obj: ssl.SSLObject, out: ssl.MemoryBIO) -> bytes:
    try:
        obj.do_handshake()
    except ssl.SSLWantReadError:
        pass
    return out.read()


@functools.cache
def _client_hello(name: str) -> bytes:
    ctx = ssl.create_default_context()
    obj = ctx.wrap_bio(ssl.MemoryBIO(), out := ssl.MemoryBIO(), server_hostname=name)
    return _flight(obj, out)


def _with_extension(hello: bytes, kind: int, body: bytes) -> bytes:
    """A one-record ClientHello with one more extension (first in the list), every length fixed up."""
    msg = hello[9:]
    pos = 34 + 1 + msg[34]  # version, random, session id
    pos += 2 + int.from_bytes(msg[pos : pos + 2], "big")  # cipher suites
    pos += 1 + msg[pos]  # compression methods
    ext = struct.pack(">HH", kind, len(body)) + body
    ext_len = int.from_bytes(msg[pos : pos + 2], "big") + len(ext)
    msg = msg[:pos] + struct.pack(">H", ext_len) + ext + msg[pos + 2 :]
    return b"\x16\x03\x01" + struct.pack(">H", len(msg) + 4) + b"\x01" + len(msg).to_bytes(3, "big") + msg


def test_the_extension_helper_makes_a_well_formed_hello():
    assert sni_mod.parse(_with_extension(_client_hello(OTHER), 0x7A7A, b"")) == OTHER  # a GREASE value passes


@pytest.mark.parametrize(("kind", "words"), [(ECH, "Encrypted Client Hello"), (ESNI, "encrypted SNI")])
def test_a_client_hello_that_hides_its_name_is_refused(kind, words):
    with pytest.raises(sni_mod.BadHello, match=words):
        sni_mod.parse(_with_extension(_client_hello(OTHER), kind, ECH_BODY))


def _connect(rig: Rig, host: str, port: int) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", rig.proxy.port), timeout=5)
    s.sendall(f"CONNECT {host}:{port} HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n".encode())
    head = b""
    while b"\r\n\r\n" not in head:
        head += s.recv(1)
    assert head.startswith(b"HTTP/1.1 200")
    return s


def _rest(s: socket.socket) -> bytes:
    out = b""
    try:
        while chunk := s.recv(65536):
            out += chunk
    except OSError:
        pass
    return out


@pytest.mark.parametrize("kind", [ECH, ESNI])
def test_a_tunnel_whose_client_hello_hides_the_name_is_refused_and_logged(rig, kind):
    s = _connect(rig, OTHER, rig.up.port(OTHER))
    s.sendall(_with_extension(_client_hello(OTHER), kind, ECH_BODY))
    assert _rest(s) == b""  # no ServerHello: the ClientHello never reached the server
    s.close()
    last = _last(rig)
    assert (last["verdict"], last["host"]) == ("deny", OTHER)
    assert last["reason"].startswith("tunnel refused: the ClientHello carries") and "hides the server name" in last[
        "reason"]


# --- HelloRetryRequest: the second ClientHello -----------------------------------------------------------------


def _retry_context(tmp: Path) -> ssl.SSLContext:
    """A server that takes only P-384 for its key exchange: a client offering an X25519 key share (OpenSSL's
    default) gets a HelloRetryRequest."""
    ctx = _server_context(tmp, load_or_create(tmp / "upstream-ca", "test upstream CA"), HRR)
    ctx.set_ecdh_curve("secp384r1")
    return ctx


def test_a_hello_retry_request_and_a_second_client_hello_are_recognised(tmp_path):
    server = _retry_context(tmp_path).wrap_bio(s_in := ssl.MemoryBIO(), s_out := ssl.MemoryBIO(), server_side=True)
    ctx = client_context(tmp_path / "upstream-ca" / "ca.pem")
    client = ctx.wrap_bio(c_in := ssl.MemoryBIO(), c_out := ssl.MemoryBIO(), server_hostname=HRR)
    first = _flight(client, c_out)
    s_in.write(first)
    retry = _flight(server, s_out)
    assert sni_mod.retry_request(retry) and not sni_mod.retry_request(b"\x15\x03\x03\x00\x02\x02\x28")  # an alert
    c_in.write(retry)
    second = _flight(client, c_out)
    assert second[0] == sni_mod.CHANGE_CIPHER_SPEC and sni_mod.second_hello(second) == HRR
    for n in range(len(second)):
        with pytest.raises(sni_mod.Incomplete):
            sni_mod.second_hello(second[:n])
    s_in.write(second)
    assert not sni_mod.retry_request(_flight(server, s_out))  # a real ServerHello this time


@pytest.fixture
def retry_rig(tmp_path: Path, upstreams) -> Iterator[Rig]:  # noqa: F811
    """The usual proxy, with one more allowed upstream (127.0.0.6) that answers with a HelloRetryRequest."""
    server = _Server(HRR, "127.0.0.6", _retry_context(tmp_path))
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    port = int(server.server_address[1])
    cfg = proxy_config(tmp_path, upstreams, allow=[OTHER, f"{OTHER}:{upstreams.port(OTHER)}", f"{HRR}:{port}"],
                       allowed_networks=["127.0.0.2/31", "127.0.0.6/32"])  # fmt: skip
    hosts = {**HOSTS, HRR: ["127.0.0.6"]}
    try:
        with running(cfg, SECRETS, resolver=mapped_resolver(hosts, fallback=None)) as proxy:
            upstreams.servers[HRR] = server
            yield Rig(proxy, upstreams, cfg, client_context(upstreams.ca_file))
    finally:
        upstreams.servers.pop(HRR, None)
        server.shutdown()
        server.server_close()


def test_a_tunnel_through_a_hello_retry_request_works(retry_rig):
    s = _connect(retry_rig, HRR, retry_rig.up.port(HRR))
    with retry_rig.client_ctx.wrap_socket(s, server_hostname=HRR) as tls:
        tls.sendall(f"GET /after-retry HTTP/1.1\r\nHost: {HRR}\r\nConnection: close\r\n\r\n".encode())
        assert _rest(tls).startswith(b"HTTP/1.1 200")
    assert [x.path for x in retry_rig.up.seen(HRR)] == ["/after-retry"]
    assert _last(retry_rig)["verdict"] == "allow"


def _record_types(data: bytes) -> list[int]:
    types, pos = [], 0
    while pos + 5 <= len(data):
        types.append(data[pos])
        pos += 5 + int.from_bytes(data[pos + 3 : pos + 5], "big")
    return types


@pytest.mark.parametrize("second_name", [OTHER, None])
def test_a_second_client_hello_naming_another_host_is_cut(retry_rig, second_name):
    s = _connect(retry_rig, HRR, retry_rig.up.port(HRR))
    s.sendall(_client_hello(HRR))
    answer = b""
    while len(answer) < 5 or len(answer) < 5 + int.from_bytes(answer[3:5], "big"):
        answer += s.recv(4096)
    assert answer[5] == 2 and answer[11:43] == hashlib.sha256(b"HelloRetryRequest").digest()  # RFC 8446 4.1.3
    second = _client_hello(OTHER) if second_name else _with_extension(_client_hello(HRR), ECH, ECH_BODY)
    s.sendall(b"\x14\x03\x03\x00\x01\x01" + second)
    assert _record_types(answer + _rest(s)) in ([0x16], [0x16, 0x14])  # the retry request (and a CCS), then nothing
    s.close()
    reason = _last(retry_rig)["reason"]
    assert reason.startswith("tunnel cut: ")
    assert (f"{OTHER} differs from the CONNECT target" if second_name else "Encrypted Client Hello") in reason
    assert retry_rig.up.seen(HRR) == []


# --- intercepted responses: every form of a key masked, nothing that could hide one --------------------------------


def _escaped(secret: str, upper: bool) -> bytes:
    out = b"".join(b"\\u%04x" % b for b in secret.encode())
    return out.upper().replace(b"\\U", b"\\u") if upper else out


@pytest.mark.parametrize(
    "form",
    [
        binascii.hexlify(SECRET.encode()),
        binascii.hexlify(SECRET.encode()).upper(),
        b"".join(b"%%%02x" % b for b in SECRET.encode()),
        b"".join(b"%%%02X" % b for b in SECRET.encode()),
        _escaped(SECRET, upper=False),
        _escaped(SECRET, upper=True),
    ],
    ids=["hex", "HEX", "percent-every-byte", "PERCENT-every-byte", "json-u-escapes", "JSON-U-ESCAPES"],
)
def test_more_forms_of_a_key_are_masked_at_every_split_point(form):
    scanner = Scanner({"K": SECRET})
    body = b'{"echo": "' + form + b'"}'
    assert scanner.mask(body) == b'{"echo": "' + b"*" * len(form) + b'"}'
    assert scanner.longest >= len(_escaped(SECRET, False))  # the hold-back reaches across the longest form
    for cut in range(len(body) + 1):
        stream = scanner.masker()
        out = stream.feed(body[:cut]) + stream.feed(body[cut:]) + stream.flush()
        assert out == scanner.mask(body), cut


def test_range_if_range_and_te_are_not_sent_to_an_intercepted_host(rig):
    headers = {"Range": "bytes=0-9", "If-Range": '"etag"', "TE": "trailers"}
    with rig.client() as c:
        assert c.get(rig.url(API, "/ranged"), headers={**headers, "x-api-key": KEY}).status_code == 200
        assert c.get(rig.url(PLAIN, "/ranged", "http"), headers=headers).status_code == 200
    (seen,) = rig.up.seen(API)
    assert seen.header("x-api-key") == SECRET
    assert not any(seen.header(h) for h in headers)
    assert rig.up.seen(PLAIN)[0].header("Range") == "bytes=0-9"  # nothing a key could be in: left alone


@pytest.mark.parametrize(("codings", "status"), [("chunked", 200), ("gzip+chunked", 502), ("Chunked+chunked", 502)])
def test_a_transfer_coding_other_than_chunked_is_refused(rig, codings, status):
    with rig.client() as c:
        r = c.get(rig.url(API, f"/te/{codings}"))
    assert r.status_code == status
    if status == 200:
        assert r.text == "ok"
    else:
        assert b"transfer coding other than chunked" in r.content


def _intercepted(rig: Rig) -> ssl.SSLSocket:
    s = _connect(rig, API, rig.up.port(API))
    ctx = client_context(Path(rig.cfg.ca_dir) / "ca.pem")
    return ctx.wrap_socket(s, server_hostname=API)


@pytest.mark.parametrize(("asked", "path", "status"), [("h2c", "/upgrade/h2c", b"400"), ("websocket", "/upgrade/h2c",
                                                       b"502"), ("WebSocket", "/upgrade", b"101")])  # fmt: skip
def test_only_a_websocket_upgrade_is_allowed(rig, asked, path, status):
    host = f"{API}:{rig.up.port(API)}"
    with _intercepted(rig) as tls:
        tls.sendall(f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: Upgrade, HTTP2-Settings\r\n"
                    f"Upgrade: {asked}\r\nHTTP2-Settings: AAMAAABkAAQCAAAAAAIAAAAA\r\n\r\n".encode())  # fmt: skip
        head = b""
        while b"\r\n\r\n" not in head and (chunk := tls.recv(1)):
            head += chunk
    assert head.startswith(b"HTTP/1.1 " + status), head
    assert len(rig.up.seen(API)) == (0 if status == b"400" else 1)


def test_a_key_in_a_response_header_name_or_trailer_name_is_masked(rig):
    host = f"{API}:{rig.up.port(API)}"
    with _intercepted(rig) as tls:
        tls.sendall(f"GET /header-name/-x HTTP/1.1\r\nHost: {host}\r\nx-api-key: {KEY}\r\nConnection: close\r\n\r\n"
                    .encode())  # fmt: skip
        answer = _rest(tls)
    assert rig.up.seen(API)[0].header("x-api-key") == SECRET
    assert answer.startswith(b"HTTP/1.1 200") and SECRET.encode() not in answer
    assert answer.count(b"*" * len(SECRET) + b"-x: ") == 2  # the header and the trailer


# --- honeytokens: normalised before matching -------------------------------------------------------------------


@pytest.mark.parametrize(
    "sent",
    [
        quote(quote(AWS_SECRET, safe=""), safe=""),  # percent-encoded twice: %252F
        quote(quote(AWS_SECRET, safe=""), safe="").lower(),
        AWS_KEY.lower(),
        binascii.hexlify(AWS_KEY.encode()).decode().upper(),
        "".join(f"%{b:02x}" for b in AWS_KEY.encode()),
        quote("".join(f"%{b:02X}" for b in AWS_KEY.encode()), safe=""),
    ],
    ids=["twice-encoded", "twice-encoded-lower-hex", "lower-case", "HEX", "every-byte", "every-byte-twice"],
)
def test_a_honeytoken_is_found_after_decoding_and_case_folding(sent):
    scanner = Scanner(HONEY)
    data = f"GET /x?a=1&d={sent}&z=2".encode()
    name = "AWS_SECRET_ACCESS_KEY" if "252" in sent else "AWS_ACCESS_KEY_ID"
    assert scanner.detect(data) == name and scanner.detect_text(data.decode()) == name
    half = len(data) // 2
    stream = scanner.watcher()  # split across two pieces of a body
    with pytest.raises(Hit):
        stream.feed(data[:half])
        stream.feed(data[half:])
    assert scanner.detect(b"/x?d=%2541%254B%2549%2541IOSFODNN7EXAMPL&e=1") is None  # one letter short


@pytest.fixture
def honey_rig(make_rig, tmp_path):
    return make_rig(honeytokens=HONEY, alerts=str(tmp_path / "alerts.jsonl"))


@pytest.mark.parametrize(
    ("path", "headers"),
    [
        (f"/c?d={quote(quote(AWS_SECRET, safe=''), safe='')}", {}),
        ("/c", {"X-Note": HONEY["PROD_DEPLOY_TOKEN"].upper()}),
        ("/c", {f"X-{AWS_KEY}": "1"}),  # in a header name
    ],
    ids=["double-encoded-query", "upper-case-header", "header-name"],
)
@pytest.mark.parametrize("scheme", ["http", "https"])
def test_the_proxy_refuses_a_disguised_honeytoken(honey_rig, path, headers, scheme):
    host = PLAIN if scheme == "http" else API
    with honey_rig.client() as c:
        r = c.get(honey_rig.url(host, path, scheme), headers=headers)
    assert r.status_code == 403 and honey_rig.up.seen(host) == []
    alerts = [json.loads(x) for x in Path(honey_rig.cfg.alerts).read_text().splitlines()]
    assert len(alerts) == 1 and alerts[0]["host"] == host
