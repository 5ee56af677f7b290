"""The proxy for real on loopback: policy, tunnels, TLS interception with credentials, plain HTTP, the log.

No root needed: the proxy listens on 127.0.0.1, the fake upstreams on 127.0.0.2-4 (see test_proxy_harness).
"""

# ruff: noqa: F811  (pytest fixtures imported from test_proxy_harness are redefined as parameters)
from __future__ import annotations

import base64
import hashlib
import json
import socket
import ssl
import time
from pathlib import Path

import httpx
import pytest
from test_proxy_harness import GIT_SECRET, SECRET, Rig, client_context, make_rig, rig, upstreams  # noqa: F401

from ai_sandbox.proxy import placeholder, read_log, write_policy

pytestmark = pytest.mark.unit

KEY = placeholder("TEST_API_KEY")
API = "api.test.example"
OTHER = "other.test.example"
PLAIN = "plain.test.example"


def _last(rig: Rig) -> dict:
    return read_log(Path(rig.cfg.log))[-1]


# --- credentials -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("header", "value", "expected"),
    [
        ("x-api-key", KEY, SECRET),
        ("Authorization", f"Bearer {KEY}", f"Bearer {SECRET}"),
        ("Authorization", f"token {KEY}", f"token {SECRET}"),
        ("x-goog-api-key", KEY, SECRET),
        ("X-Custom", f"a={KEY}; b={KEY}", f"a={KEY}; b={KEY}"),  # not a field of the credential: left alone
    ],
)
def test_the_credential_host_receives_the_real_key(rig, header, value, expected):
    with rig.client() as c:
        r = c.get(rig.url(API, "/v1/messages"), headers={header: value})
    assert r.status_code == 200
    (seen,) = rig.up.seen(API)
    assert seen.header(header) == expected
    assert _last(rig)["reason"] == ("intercepted; credential TEST_API_KEY" if expected != value else "intercepted")


def test_the_query_key_is_replaced(rig):
    with rig.client() as c:
        assert c.get(rig.url(API, f"/v1beta/models?key={KEY}&alt=sse")).status_code == 200
    assert rig.up.seen(API)[0].path == f"/v1beta/models?key={SECRET}&alt=sse"


def test_basic_auth_is_decoded_replaced_and_encoded_again(rig):
    with rig.client() as c:
        r = c.get(rig.url(API, "/repo.git/info/refs"), auth=("x-access-token", placeholder("GIT_TOKEN")))
    assert r.status_code == 200
    value = rig.up.seen(API)[0].header("Authorization")
    assert value.startswith("Basic ")
    assert base64.b64decode(value.split()[1]).decode() == f"x-access-token:{GIT_SECRET}"


def test_a_host_the_key_does_not_belong_to_gets_the_placeholder_only(rig):
    with rig.client() as c:
        r = c.get(rig.url(OTHER, f"/v1?key={KEY}"), headers={"x-api-key": KEY, "Authorization": f"Bearer {KEY}"})
    assert r.status_code == 200
    (seen,) = rig.up.seen(OTHER)
    assert seen.header("x-api-key") == KEY and seen.header("Authorization") == f"Bearer {KEY}"
    assert seen.path == f"/v1?key={KEY}"
    assert SECRET not in json.dumps(r.json())


def test_plain_http_never_carries_a_secret_even_to_the_credential_host(make_rig):
    rig = make_rig(credentials={"TEST_API_KEY": ["plain.test.example"]})
    with rig.client() as c:
        assert c.get(rig.url(PLAIN, "/x", "http"), headers={"x-api-key": KEY}).status_code == 200
    assert rig.up.seen(PLAIN)[0].header("x-api-key") == KEY


def test_intercepted_hosts_show_the_sandbox_ca_and_others_their_own_certificate(rig):
    sandbox_only = client_context(Path(rig.cfg.ca_dir) / "ca.pem")
    upstream_only = client_context(rig.up.ca_file)
    with httpx.Client(proxy=rig.proxy_url, verify=sandbox_only, trust_env=False) as c:
        assert c.get(rig.url(API)).status_code == 200
        with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
            c.get(rig.url(OTHER))  # a blind tunnel: the guest talks TLS with the real server
    with httpx.Client(proxy=rig.proxy_url, verify=upstream_only, trust_env=False) as c:
        assert c.get(rig.url(OTHER)).status_code == 200
        with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
            c.get(rig.url(API))


def test_an_untrusted_upstream_certificate_fails_the_connect(make_rig):
    rig = make_rig(upstream_ca=None)
    with rig.client() as c, pytest.raises(httpx.ProxyError, match="502"):
        c.get(rig.url(API, "/"), headers={"x-api-key": KEY})
    assert rig.up.seen(API) == []
    assert _last(rig) | {"time": None} == {
        "time": None, "sandbox": "test", "method": "CONNECT", "host": API, "port": rig.up.port(API),
        "verdict": "allow", "reason": "upstream certificate not trusted", "status": 502,
    }  # fmt: skip


# --- the tunnel is for its own host only -------------------------------------------------------------------


def _tls_through_proxy(rig: Rig, connect_to: str, sni: str) -> ssl.SSLSocket:
    raw = socket.create_connection(("127.0.0.1", rig.proxy.port), timeout=5)
    port = rig.up.port(connect_to)
    raw.sendall(f"CONNECT {connect_to}:{port} HTTP/1.1\r\nHost: {connect_to}:{port}\r\n\r\n".encode())
    assert raw.recv(4096).startswith(b"HTTP/1.1 200")
    ctx = client_context(Path(rig.cfg.ca_dir) / "ca.pem")
    ctx.check_hostname = False
    return ctx.wrap_socket(raw, server_hostname=sni)


def _read_all(sock: socket.socket) -> bytes:
    out = b""
    try:
        while chunk := sock.recv(65536):
            out += chunk
    except (ssl.SSLError, OSError):
        pass
    return out


def test_a_request_for_another_host_inside_an_intercepted_tunnel_is_refused(rig):
    with _tls_through_proxy(rig, API, API) as tls:
        tls.sendall(f"GET /steal HTTP/1.1\r\nHost: {OTHER}:{rig.up.port(OTHER)}\r\nx-api-key: {KEY}\r\n\r\n".encode())
        answer = _read_all(tls)
    assert answer.startswith(b"HTTP/1.1 403")
    assert rig.up.seen(API) == [] and rig.up.seen(OTHER) == []
    entry = _last(rig)
    assert (entry["verdict"], entry["status"], entry["reason"]) == ("deny", 403, "Host differs from the CONNECT target")


def test_an_absolute_url_for_another_host_inside_the_tunnel_is_refused(rig):
    with _tls_through_proxy(rig, API, API) as tls:
        port = rig.up.port(API)
        tls.sendall(f"GET https://{OTHER}:{port}/ HTTP/1.1\r\nHost: {API}:{port}\r\n\r\n".encode())
        assert _read_all(tls).startswith(b"HTTP/1.1 403")
    assert rig.up.seen(API) == []


def test_a_tls_server_name_other_than_the_connect_target_ends_the_tunnel(rig):
    with _tls_through_proxy(rig, API, OTHER) as tls:
        tls.sendall(f"GET / HTTP/1.1\r\nHost: {API}:{rig.up.port(API)}\r\n\r\n".encode())
        assert _read_all(tls) == b""
    assert rig.up.seen(API) == []
    assert _last(rig)["reason"] == "TLS server name differs from the CONNECT target"


def test_a_request_without_host_inside_the_tunnel_is_a_bad_request(rig):
    with _tls_through_proxy(rig, API, API) as tls:
        tls.sendall(b"GET / HTTP/1.1\r\n\r\n")
        assert _read_all(tls).startswith(b"HTTP/1.1 400")


# --- policy ------------------------------------------------------------------------------------------------


def test_connect_to_a_denied_host_is_403_and_logged(rig):
    answer = rig.raw(b"CONNECT blocked.test.example:443 HTTP/1.1\r\nHost: blocked.test.example:443\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 403")
    assert _last(rig) | {"time": None} == {
        "time": None, "sandbox": "test", "method": "CONNECT", "host": "blocked.test.example", "port": 443,
        "verdict": "deny", "reason": "deny-list: blocked.test.example", "status": 403,
    }  # fmt: skip


@pytest.mark.parametrize(
    ("target", "reason"),
    [
        ("unknown.test.example:{port}", "not in allow-list"),
        ("api.test.example:22", "CONNECT to port 22 not allowed (only 443, or a host:port entry)"),
        ("api.test.example:80", "CONNECT to port 80 not allowed (only 443, or a host:port entry)"),
        ("127.0.0.2:{port}", "IP address not allowed"),
        ("203.0.113.7:{port}", "IP address not allowed"),
    ],
)
def test_connect_refusals(make_rig, target, reason):
    rig = make_rig(allowed_networks=[])
    target = target.format(port=rig.up.port(API))
    assert rig.raw(f"CONNECT {target} HTTP/1.1\r\n\r\n".encode()).startswith(b"HTTP/1.1 403")
    assert (_last(rig)["verdict"], _last(rig)["reason"]) == ("deny", reason)


def test_a_name_that_resolves_to_a_private_address_is_refused(make_rig):
    rig = make_rig(allowed_networks=[])
    with rig.client() as c, pytest.raises(httpx.ProxyError, match="403"):
        c.get(f"https://rebind.test.example:{rig.up.port(API)}/")
    assert _last(rig)["reason"] == "resolves to a non-public address"
    assert rig.up.seen(API) == []


def test_ip_literals_pass_only_inside_allowed_networks(make_rig):
    rig = make_rig()
    port = rig.up.port(PLAIN)
    with rig.client() as c:
        assert c.get(f"http://127.0.0.4:{port}/lit").status_code == 200
        assert c.get(f"http://127.0.0.5:{port}/lit").status_code == 403


def test_a_name_that_does_not_resolve_is_502(make_rig, upstreams):
    rig = make_rig(allow=["*.test.example", f"*.test.example:{upstreams.port(API)}"])
    assert rig.raw(f"CONNECT nowhere.test.example:{rig.up.port(API)} HTTP/1.1\r\n\r\n".encode()).startswith(b"HTTP/1.1 502")
    assert (_last(rig)["verdict"], _last(rig)["reason"]) == ("allow", "cannot resolve the host")


def test_plain_http_allowed_and_denied(rig):
    with rig.client() as c:
        r = c.get(rig.url(PLAIN, "/hello?x=1", "http"))
        assert r.status_code == 200 and r.json()["path"] == "/hello?x=1"
        denied = c.get("http://blocked.test.example/")
        assert denied.status_code == 403 and b"deny-list" in denied.content
    entries = read_log(Path(rig.cfg.log))
    assert [(e["method"], e["host"], e["verdict"], e["status"]) for e in entries] == [
        ("GET", PLAIN, "allow", 200), ("GET", "blocked.test.example", "deny", 403),
    ]  # fmt: skip


@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [
        (b"TRACE http://plain.test.example/ HTTP/1.1\r\n\r\n", 405),
        (b"GET / HTTP/1.1\r\nHost: plain.test.example\r\n\r\n", 400),
        (b"GET https://api.test.example/ HTTP/1.1\r\n\r\n", 400),
        (b"GET ftp://plain.test.example/ HTTP/1.1\r\n\r\n", 400),
        (b"GET http://user@plain.test.example/ HTTP/1.1\r\n\r\n", 400),
        (b"CONNECT api.test.example HTTP/1.1\r\n\r\n", 400),
        (b"GET http://plain.test.example/ HTTP/2.0\r\n\r\n", 400),
        (b"POST http://plain.test.example/ HTTP/1.1\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n", 400),
        (b"POST http://plain.test.example/ HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n", 501),
        (b"GET http://plain.test.example/ HTTP/1.1\r\nX: a\r\n folded\r\n\r\n", 400),
    ],
)
def test_requests_a_forward_proxy_does_not_take(rig, request_bytes, status):
    assert rig.raw(request_bytes).startswith(b"HTTP/1.1 %d" % status)
    assert _last(rig)["verdict"] == "deny" and _last(rig)["status"] == status
    assert rig.up.seen(PLAIN) == []


def test_the_policy_file_is_reloaded_when_it_changes(make_rig, tmp_path):
    policy = tmp_path / "policy.json"
    rig = make_rig(policy_file=str(policy))
    with rig.client() as c:
        assert c.get(rig.url(PLAIN, "/", "http")).status_code == 200
        write_policy(policy, allow=[OTHER], deny=[])
        assert c.get(rig.url(PLAIN, "/", "http")).status_code == 403
        time.sleep(0.01)  # a new mtime, even on coarse clocks
        write_policy(policy, allow=["*.test.example"], deny=[PLAIN])
        assert c.get(rig.url(PLAIN, "/", "http")).status_code == 403
        assert _last(rig)["reason"] == f"deny-list: {PLAIN}"
        policy.write_text("{not json")
        assert c.get(rig.url(PLAIN, "/", "http")).status_code == 403  # a broken file keeps the last good policy
        policy.unlink()
        assert c.get(rig.url(PLAIN, "/", "http")).status_code == 200  # back to the config's lists


# --- HTTP/1.1 through the interception ---------------------------------------------------------------------


def test_bodies_and_keep_alive_through_the_interception(rig):
    body = bytes(range(256)) * 4000
    with rig.client() as c:
        fixed = c.post(rig.url(API, "/upload"), content=body, headers={"x-api-key": KEY})
        chunked = c.post(rig.url(API, "/upload"), content=iter([body[:1000], body[1000:]]))
        head = c.head(rig.url(API, "/"))
        streamed = c.get(rig.url(API, "/chunked"))
        expect = c.put(rig.url(API, "/put"), content=b"abc", headers={"Expect": "100-continue"})
    for r in (fixed, chunked):
        assert r.json()["body_sha256"] == hashlib.sha256(body).hexdigest()
    assert "transfer-encoding" in {k.lower() for k in chunked.json()["headers"]}
    assert head.status_code == 200 and head.content == b""
    assert streamed.text == "hello chunked world"
    assert expect.json()["body_len"] == 3 and "Expect" not in expect.json()["headers"]
    connects = [e for e in read_log(Path(rig.cfg.log)) if e["method"] == "CONNECT"]
    assert len(connects) == 1  # one tunnel, one upstream connection, five requests


def test_a_large_download_arrives_intact(rig):
    size = 8 * 1024 * 1024 + 17
    with rig.client() as c:
        intercepted = c.get(rig.url(API, f"/big/{size}"))
        tunnelled = c.get(rig.url(OTHER, f"/big/{size}"))
        plain = c.get(rig.url(PLAIN, f"/big/{size}", "http"))
    for r in (intercepted, tunnelled, plain):
        assert len(r.content) == size and r.content.count(b"x") == size


def test_a_response_that_ends_with_the_connection(rig):
    with rig.client() as c:
        assert c.get(rig.url(API, "/until-close")).text == "the end is the close"
        assert c.get(rig.url(API, "/after")).status_code == 200  # a new tunnel


def test_an_upgrade_turns_the_intercepted_connection_into_a_pipe(rig):
    with _tls_through_proxy(rig, API, API) as tls:
        host = f"{API}:{rig.up.port(API)}"
        tls.sendall(f"GET /upgrade HTTP/1.1\r\nHost: {host}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n"
                    .encode())  # fmt: skip
        head = b""
        while b"\r\n\r\n" not in head:
            head += tls.recv(1)
        assert head.startswith(b"HTTP/1.1 101") and b"Upgrade: websocket" in head
        tls.sendall(b"ping\n")
        assert tls.recv(100) == b"echo: ping\n"


def test_no_secret_in_the_log(rig):
    with rig.client() as c:
        c.get(rig.url(API, f"/?key={KEY}"), headers={"Authorization": f"Bearer {KEY}"})
        c.get(rig.url(OTHER, f"/?key={KEY}"))
    text = rig.log_text()
    assert SECRET not in text and GIT_SECRET not in text
    for entry in read_log(Path(rig.cfg.log)):
        assert set(entry) == {"time", "sandbox", "method", "host", "port", "verdict", "reason", "status"}


def test_connections_beyond_the_limit_are_turned_away(rig):
    rig.proxy.max_connections = 2
    idle = [socket.create_connection(("127.0.0.1", rig.proxy.port), timeout=5) for _ in range(2)]
    try:
        time.sleep(0.2)
        assert rig.raw(b"").startswith(b"HTTP/1.1 503")
        assert _last(rig)["reason"] == "too many connections"
    finally:
        for s in idle:
            s.close()
    time.sleep(0.2)
    with rig.client() as c:
        assert c.get(rig.url(PLAIN, "/", "http")).status_code == 200
