"""Issue 9, the proxy's part: no real key echoed back, CONNECT held to 443 and its SNI, no leaked upstream sockets,
strict framing, a capped log, honeytokens, and `ai policy log` printing guest text literally.

Pure parsers first (hypothesis where the input is free-form), then the proxy on loopback (see test_proxy_harness).
"""

# ruff: noqa: F811  (pytest fixtures imported from test_proxy_harness are redefined as parameters)
from __future__ import annotations

import base64
import functools
import json
import os
import shutil
import signal
import socket
import ssl
import struct
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import quote

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_proxy_harness import SECRET, client_context, make_rig, rig, upstreams  # noqa: F401

from ai_sandbox.cli.ui import safe_text
from ai_sandbox.proxy import placeholder, read_log
from ai_sandbox.proxy import sni as sni_mod
from ai_sandbox.proxy.honey import Pauser, aws_credentials, ensure
from ai_sandbox.proxy.log import RequestLog, rotated
from ai_sandbox.proxy.rules import Policy
from ai_sandbox.proxy.scrub import Hit, Scanner, forms
from ai_sandbox.proxy.wire import BadMessage, Head, request_framing, split_authority

pytestmark = pytest.mark.unit

KEY = placeholder("TEST_API_KEY")
API, OTHER = "api.test.example", "other.test.example"
AWS_KEY = "AKIAIOSFODNN7EXAMPLE"
AWS_SECRET = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"
HONEY = {"AWS_ACCESS_KEY_ID": AWS_KEY, "AWS_SECRET_ACCESS_KEY": AWS_SECRET, "PROD_DEPLOY_TOKEN": "dpt_" + "Zq9" * 12}


# --- scrub: the forms of a secret, masked or watched, whole or streamed ------------------------------------------


def _every_form(secret: str, user: str = "x-access-token") -> list[bytes]:
    basic = base64.b64encode(f"{user}:{secret}".encode())
    return [secret.encode(), quote(secret, safe="").encode(), base64.b64encode(secret.encode()),
            base64.urlsafe_b64encode(secret.encode()), basic, json.dumps(secret)[1:-1].encode()]  # fmt: skip


@pytest.mark.parametrize("secret", [SECRET, AWS_SECRET, "ghp_" + "a1B2" * 9])
@pytest.mark.parametrize("user", ["x-access-token", "u", "ab", "me@example.com"])
def test_every_form_of_a_secret_is_masked(secret, user):
    scanner = Scanner({"K": secret})
    for form in _every_form(secret, user):
        masked = scanner.mask(b"before " + form + b" after")
        assert masked.startswith(b"before ") and masked.endswith(b" after") and len(masked) == len(form) + 13
        for f in forms(secret):
            assert f not in masked
        assert base64.b64encode(f"{user}:{secret}".encode()) not in masked


def test_text_without_a_secret_is_untouched():
    scanner = Scanner({"K": SECRET})
    text = b'{"error": "invalid x-api-key", "type": "authentication_error"}'
    assert scanner.mask(text) == text and scanner.find(text) is None


@settings(max_examples=150, deadline=None)
@given(st.binary(max_size=80), st.binary(max_size=80), st.integers(0, 5), st.data())
def test_streamed_masking_is_the_same_at_every_split_point(before, after, which, data):
    secret = AWS_SECRET
    form = _every_form(secret)[which]
    whole = before + form + after
    scanner = Scanner({"K": secret})
    cuts = sorted(data.draw(st.lists(st.integers(0, len(whole)), max_size=6)))
    stream, out, last = scanner.masker(), b"", 0
    for cut in [*cuts, len(whole)]:
        out += stream.feed(whole[last:cut])
        last = cut
    out += stream.flush()
    assert len(out) == len(whole) and form not in out
    assert out == scanner.mask(whole)


def test_every_single_split_point_of_a_key():
    scanner = Scanner({"K": SECRET})
    body = b'{"echo": "' + SECRET.encode() + b'"}'
    for cut in range(len(body) + 1):
        stream = scanner.masker()
        out = stream.feed(body[:cut]) + stream.feed(body[cut:]) + stream.flush()
        assert SECRET.encode() not in out and len(out) == len(body), cut


def test_a_stream_holds_back_only_what_could_begin_a_key():
    stream = Scanner({"K": SECRET}).masker()
    assert stream.feed(b"echo: ping\n") == b"echo: ping\n"  # an interactive stream is not delayed
    assert stream.feed(b"abc sk-te") == b"abc "  # could be the start of the key
    assert stream.feed(b"xt") + stream.flush() == b"sk-text"


def test_watching_raises_on_a_split_token_before_any_of_it_passes():
    stream = Scanner(HONEY).watcher()
    passed = stream.feed(b"aws_access_key_id=" + AWS_KEY[:7].encode())
    assert AWS_KEY[:1].encode() not in passed.split(b"=")[-1]
    with pytest.raises(Hit) as e:
        stream.feed(AWS_KEY[7:].encode() + b"&x=1")
    assert e.value.name == "AWS_ACCESS_KEY_ID" and AWS_KEY not in str(e.value)


# --- SNI of a ClientHello ------------------------------------------------------------------------------------


@functools.cache
def _client_hello(name: str | None) -> bytes:
    ctx = ssl.create_default_context()
    ctx.check_hostname = name is not None
    if name is None:
        ctx.verify_mode = ssl.CERT_NONE
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(incoming, outgoing, server_hostname=name)
    with pytest.raises(ssl.SSLWantReadError):
        obj.do_handshake()
    return outgoing.read()


def test_the_server_name_of_a_real_client_hello():
    assert sni_mod.parse(_client_hello("api.test.example")) == "api.test.example"
    assert sni_mod.parse(_client_hello(None)) is None


def test_a_client_hello_split_over_two_records():
    hello = _client_hello("split.example")
    body = hello[5:]
    rest = len(body) - 10
    two = b"\x16\x03\x01" + struct.pack(">H", 10) + body[:10] + b"\x16\x03\x01" + struct.pack(">H", rest) + body[10:]
    assert sni_mod.parse(two) == "split.example"


def test_every_truncation_of_a_client_hello_asks_for_more():
    hello = _client_hello("api.test.example")
    for n in range(len(hello)):
        with pytest.raises(sni_mod.Incomplete):
            sni_mod.parse(hello[:n])


@pytest.mark.parametrize(
    "data",
    [
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",  # plain HTTP through a CONNECT tunnel
        b"\x17\x03\x03\x00\x05hello",  # application data first
        b"\x16\x03\x01\x00\x00",  # empty record
        b"\x16\x03\x01\x00\x05\x02\x00\x00\x01\x00",  # a ServerHello
    ],
)
def test_what_is_not_a_client_hello_is_refused(data):
    with pytest.raises(sni_mod.BadHello):
        sni_mod.parse(data)


@settings(max_examples=400, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.data())
def test_mutated_client_hellos_never_raise_anything_else(data):
    hello = bytearray(_client_hello("fuzz.example"))
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, len(hello) - 1))
        hello[i] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(hello)))
    try:
        name = sni_mod.parse(bytes(hello[:cut]))
    except (sni_mod.Incomplete, sni_mod.BadHello):
        return
    assert name is None or all(0x21 <= ord(c) < 0x7F for c in name)


@given(st.binary(max_size=300))
def test_random_bytes_never_raise_anything_else(data):
    try:
        sni_mod.parse(data)
    except (sni_mod.Incomplete, sni_mod.BadHello):
        pass


# --- ports, framing --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("allow", "host", "port", "connect", "allowed"),
    [
        (["a.example"], "a.example", 443, True, True),
        (["a.example"], "a.example", 80, True, False),  # CONNECT a.example:80 then Host: anything
        (["a.example"], "a.example", 80, False, True),  # plain http to port 80 is fine
        (["a.example"], "a.example", 8443, True, False),
        (["a.example:8443"], "a.example", 8443, True, True),
        (["a.example:8443"], "a.example", 443, True, False),  # an entry with a port allows that port only
        (["*.a.example:8443"], "x.a.example", 8443, True, True),
        (["a.example:x"], "a.example", 443, True, False),
        (["203.0.113.5:8443"], "203.0.113.5", 8443, True, True),
    ],
)
def test_connect_port_rules(allow, host, port, connect, allowed):
    assert Policy(tuple(allow)).check(host, port, connect=connect).allowed is allowed


def test_a_deny_entry_with_a_port_denies_that_port_only():
    policy = Policy(("a.example", "a.example:8443"), ("a.example:8443",))
    assert not policy.check("a.example", 8443, connect=True).allowed
    assert policy.check("a.example", 443, connect=True).allowed


@pytest.mark.parametrize("value", ["²", "1²", "٣", "+5", "-1", "0x10", "1 2", "", "9" * 19])
def test_content_length_is_ascii_digits_only(value):
    with pytest.raises(BadMessage):
        request_framing(Head(("POST", "/", "HTTP/1.1"), [("Content-Length", value)], "HTTP/1.1"))


@pytest.mark.parametrize("authority", ["a.example:²", "a.example:٤٤٣", "a.example:+443", "a.example:0"])
def test_a_port_is_ascii_digits_only(authority):
    with pytest.raises(BadMessage):
        split_authority(authority, None)


def test_non_ascii_content_length_is_a_400_not_a_traceback(rig):
    answer = rig.raw("POST http://plain.test.example/ HTTP/1.1\r\nContent-Length: ²\r\n\r\nx".encode())
    assert answer.startswith(b"HTTP/1.1 400")
    answer = rig.raw("CONNECT api.test.example:²²² HTTP/1.1\r\n\r\n".encode())
    assert answer.startswith(b"HTTP/1.1 400")


# --- the proxy on loopback: no echo of the real key -----------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "headers"),
    [
        (f"/v1/{KEY}/messages", {}),
        ("/v1/messages", {"anthropic-beta": KEY}),
        (f"/v1/messages?return_to={KEY}", {}),
        (f"/v1/messages?key=1&next={quote(KEY)}", {}),
        ("/v1/messages", {"x-api-key": f"x{KEY}"}),  # not the whole value: stays the placeholder
    ],
)
def test_the_placeholder_outside_its_field_reaches_the_upstream_as_it_is(rig, path, headers):
    with rig.client() as c:
        r = c.get(rig.url(API, path), headers=headers)
    assert r.status_code == 200 and SECRET not in r.text
    (seen,) = rig.up.seen(API)
    assert SECRET not in seen.path and all(SECRET not in v for _, v in seen.headers)


@pytest.mark.parametrize("piece", [1, 3, 7, 64, 4096])
def test_an_echo_of_the_real_key_is_masked_at_any_chunk_size(rig, piece):
    with rig.client() as c:
        r = c.get(rig.url(API, f"/split/{piece}"), headers={"x-api-key": KEY})
    assert rig.up.seen(API)[0].header("x-api-key") == SECRET  # the upstream got it
    assert r.status_code == 200 and SECRET not in r.text and SECRET not in str(r.headers)
    assert r.json()["headers"]["x-api-key"] == "*" * len(SECRET)
    assert r.headers["x-echo"] == "*" * len(SECRET)


def test_basic_auth_echo_is_masked(rig):
    with rig.client() as c:
        r = c.get(rig.url(API, "/split/5"), auth=("x-access-token", placeholder("GIT_TOKEN")))
    seen = rig.up.seen(API)[0].header("Authorization")
    assert seen and seen != r.json()["headers"]["Authorization"]
    assert seen.split()[1] not in r.text


def test_compression_is_refused_upstream_and_a_compressed_answer_is_not_passed(rig):
    with rig.client() as c:
        r = c.get(rig.url(API, "/gzip"), headers={"Accept-Encoding": "gzip, br"})
    assert rig.up.seen(API)[0].header("Accept-Encoding") == "identity"
    assert r.status_code == 502 and b"compressed" in r.content


# --- the proxy on loopback: tunnels --------------------------------------------------------------------------


def _tunnel(rig, target: str, server_name: str | None) -> tuple[bytes, ssl.SSLSocket | None]:
    s = socket.create_connection(("127.0.0.1", rig.proxy.port), timeout=5)
    s.sendall(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode())
    head = b""
    while b"\r\n\r\n" not in head:
        head += s.recv(1)
    if not head.startswith(b"HTTP/1.1 200"):
        s.close()
        return head, None
    ctx = client_context(rig.up.ca_file)
    ctx.check_hostname = False
    try:
        return head, ctx.wrap_socket(s, server_hostname=server_name)
    except (ssl.SSLError, OSError):
        s.close()
        return head, None


def test_a_tunnel_whose_sni_is_another_name_is_cut(rig):
    target = f"{OTHER}:{rig.up.port(OTHER)}"
    head, tls = _tunnel(rig, target, API)  # the CDN would route by this name
    assert head.startswith(b"HTTP/1.1 200") and tls is None
    assert _last(rig)["verdict"] == "deny" and "differs from the CONNECT target" in _last(rig)["reason"]
    head, tls = _tunnel(rig, target, None)
    assert tls is None and "names no server" in _last(rig)["reason"]
    head, tls = _tunnel(rig, target, OTHER)
    assert tls is not None
    tls.sendall(f"GET /ok HTTP/1.1\r\nHost: {OTHER}\r\nConnection: close\r\n\r\n".encode())
    assert tls.recv(100).startswith(b"HTTP/1.")
    tls.close()
    assert [s.path for s in rig.up.seen(OTHER)] == ["/ok"]


def test_plain_http_inside_a_tunnel_is_cut(rig):
    s = socket.create_connection(("127.0.0.1", rig.proxy.port), timeout=5)
    target = f"{OTHER}:{rig.up.port(OTHER)}"
    s.sendall(f"CONNECT {target} HTTP/1.1\r\n\r\nGET / HTTP/1.1\r\nHost: anything.example\r\n\r\n".encode())
    data = b""
    while chunk := s.recv(4096):
        data += chunk
    s.close()
    assert data == b"HTTP/1.1 200 Connection established\r\n\r\n"
    assert rig.up.seen(OTHER) == [] and "not a TLS handshake" in _last(rig)["reason"]


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_clients_that_reset_before_the_200_leave_no_upstream_socket(rig):
    target = f"{OTHER}:{rig.up.port(OTHER)}".encode()
    with rig.client() as c:  # warm up: CA leaf, thread pools
        c.get(rig.url(OTHER, "/warm"))
    time.sleep(0.3)
    before = _fds()
    for _ in range(40):
        s = socket.create_connection(("127.0.0.1", rig.proxy.port))
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # close = RST
        s.sendall(b"CONNECT " + target + b" HTTP/1.1\r\n\r\n")
        s.close()
    deadline = time.monotonic() + 10
    while (_fds() > before + 2 or rig.proxy._tasks) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _fds() <= before + 2 and not rig.proxy._tasks


# --- honeytokens ---------------------------------------------------------------------------------------------


@pytest.fixture
def honey_rig(make_rig, tmp_path):
    return make_rig(honeytokens=HONEY, alerts=str(tmp_path / "alerts.jsonl"))


def _alerts(path: Path) -> list[dict]:
    return [json.loads(ln) for ln in path.read_text().splitlines()] if path.exists() else []


def _last(rig) -> dict:
    return read_log(Path(rig.cfg.log))[-1]


def test_a_honeytoken_in_a_header_is_refused_and_alerted(honey_rig):
    with honey_rig.client() as c:
        r = c.get(honey_rig.url(API, "/v1"), headers={"Authorization": f"AWS4-HMAC-SHA256 Credential={AWS_KEY}/x"})
    assert r.status_code == 403 and honey_rig.up.seen(API) == []
    (alert,) = _alerts(Path(honey_rig.cfg.alerts))
    assert (alert["verdict"], alert["host"], alert["status"], alert["paused"]) == ("alert", API, 403, False)
    assert "AWS_ACCESS_KEY_ID" in alert["reason"] and AWS_KEY not in json.dumps(alert)
    assert _last(honey_rig)["verdict"] == "alert"


@pytest.mark.parametrize(
    "send",
    [
        lambda c, u: c.get(u(f"/collect?d={base64.b64encode(AWS_SECRET.encode()).decode()}", "http")),
        lambda c, u: c.get(u(f"/collect?d={quote(AWS_SECRET, safe='')}", "http")),
        lambda c, u: c.post(u("/collect", "http"), content=b"x" * 5000 + HONEY["PROD_DEPLOY_TOKEN"].encode()),
        lambda c, u: c.post(u("/collect", "http"), content=iter([b"k=" + AWS_KEY[:9].encode(), AWS_KEY[9:].encode()])),
        lambda c, u: c.post(u("/collect"), content=json.dumps({"secret": AWS_SECRET}).encode()),
    ],
    ids=["base64-url", "urlencoded-url", "plain-body", "chunked-split-body", "intercepted-json-body"],
)
def test_a_honeytoken_in_any_form_anywhere_is_refused(honey_rig, send):
    def url(path: str, scheme: str = "https") -> str:
        return honey_rig.url("plain.test.example" if scheme == "http" else API, path, scheme)

    with honey_rig.client() as c:
        r = send(c, url)
    assert r.status_code == 403
    assert len(_alerts(Path(honey_rig.cfg.alerts))) == 1
    for server in honey_rig.up.servers.values():
        for seen in server.seen:
            assert AWS_KEY.encode() not in seen.body and AWS_SECRET.encode() not in seen.body


def test_a_honeytoken_on_a_connect_is_refused(honey_rig):
    target = f"{OTHER}:{honey_rig.up.port(OTHER)}"
    answer = honey_rig.raw(f"CONNECT {target} HTTP/1.1\r\nProxy-Authorization: Basic "
                           f"{base64.b64encode(f'u:{AWS_SECRET}'.encode()).decode()}\r\n\r\n".encode())  # fmt: skip
    assert answer.startswith(b"HTTP/1.1 403") and _alerts(Path(honey_rig.cfg.alerts))[0]["method"] == "CONNECT"


def test_honeytokens_are_made_once_per_sandbox(tmp_path):
    a, b = ensure(tmp_path / "a.json"), ensure(tmp_path / "b.json")
    assert a != b and ensure(tmp_path / "a.json") == a
    assert (tmp_path / "a.json").stat().st_mode & 0o777 == 0o600
    assert a["AWS_ACCESS_KEY_ID"].startswith("AKIA") and len(a["AWS_ACCESS_KEY_ID"]) == 20
    assert len(a["AWS_SECRET_ACCESS_KEY"]) == 40
    assert a["AWS_SECRET_ACCESS_KEY"] in aws_credentials(a)


def test_pause_stops_only_a_vmm_process(tmp_path):
    fake_vmm = tmp_path / "qemu-system-x86_64"
    shutil.copy("/bin/sleep", fake_vmm)
    procs = [subprocess.Popen([str(fake_vmm), "30"]), subprocess.Popen(["sleep", "30"])]
    try:
        results = []
        for proc in procs:
            pid_file = tmp_path / f"{proc.pid}.pid"
            pid_file.write_text(f"{proc.pid}\n")
            results.append(Pauser(pid_file).pause())
        time.sleep(0.2)
        states = [Path(f"/proc/{p.pid}/stat").read_text().split(") ")[1][0] for p in procs]
        assert results == [True, False] and states == ["T", "S"]
        assert Pauser(tmp_path / "missing.pid").pause() is False and Pauser(None).pause() is False
    finally:
        for proc in procs:
            proc.send_signal(signal.SIGKILL)
            proc.wait()


# --- the log: capped and rotated; printed literally ------------------------------------------------------------


def test_the_log_is_capped_and_rotated(tmp_path):
    path = tmp_path / "proxy.log"
    log = RequestLog(path, "s", max_bytes=4096)
    for i in range(500):
        log.record("GET", f"h{i}.example", 443, "deny", "x" * 50, 403)
    log.close()
    assert path.stat().st_size <= 4096 and rotated(path).stat().st_size <= 4096
    entries = read_log(path)
    assert entries[-1]["host"] == "h499.example" and 20 < len(entries) < 500
    assert [int(e["host"][1:-8]) for e in entries] == sorted(int(e["host"][1:-8]) for e in entries)


@pytest.mark.parametrize(
    "nasty",
    ["GET [/x] HTTP/1.1", "[link=https://evil.example]click[/link]", "[bold red]x", "a\x1b[2J\x1b]0;owned\x07b",
     "tab\tnew\nline\x9b31m", "\\", "[/]"],
)
def test_safe_text_prints_literally(nasty):
    from rich.console import Console

    console = Console(file=None, width=200, record=True, color_system=None)
    with console.capture() as cap:
        console.print(safe_text(nasty), end="")
    printed = cap.get()
    expected = "".join(ch for ch in nasty.replace("\x1b[2J", "").replace("\x1b]0;owned\x07", "").replace("\x9b31m", "")
                       if ch in "\t\n" or (ord(ch) >= 32 and not 0x7F <= ord(ch) <= 0x9F))  # fmt: skip
    assert "\x1b" not in printed and "\x9b" not in printed
    assert printed.replace("\\\\", "\\") == expected.expandtabs(8)


def test_policy_log_prints_hostile_entries_literally(tmp_path):
    from ai_sandbox.state import Files, Instance, Spec

    inst = Instance("hostile", tmp_path / "state")
    inst.save(Spec(name="hostile", workspace=str(tmp_path), image="minimal", vmm="qemu", cpus=1, memory_mib=512))
    log = RequestLog(inst.path(Files.PROXY_LOG), "hostile")
    log.record("GET", "[link=https://evil.example]a.example[/link]", 80, "deny", "GET [/x] HTTP/1.1 \x1b[31m", 403)
    log.alert("CONNECT", "exfil.example", 443, "honeytoken AWS_ACCESS_KEY_ID sent", False)
    log.close()
    ai = str(Path(sys.executable).with_name("ai"))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FC_", "AI_"))}
    res = subprocess.run([ai, "policy", "log", "hostile"], env={**env, "AI_SANDBOX_STATE": str(tmp_path / "state"),
                         "COLUMNS": "300"}, capture_output=True, text=True, timeout=60, cwd=tmp_path)  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert "[link=https://evil.example]a.example[/link]" in res.stdout and "GET [/x] HTTP/1.1" in res.stdout
    assert "\x1b" not in res.stdout and "alert" in res.stdout and "exfil.example" in res.stdout


def test_a_proxy_request_carrying_a_honeytoken_via_httpx_through_intercept_keeps_working_after(honey_rig):
    with honey_rig.client() as c:
        assert c.get(honey_rig.url(API, "/x"), headers={"x-api-key": HONEY["PROD_DEPLOY_TOKEN"]}).status_code == 403
        r = c.get(honey_rig.url(API, "/after"), headers={"x-api-key": KEY})
    assert r.status_code == 200 and honey_rig.up.seen(API)[-1].header("x-api-key") == SECRET
