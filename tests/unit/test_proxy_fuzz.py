"""Whatever bytes the guest sends, the proxy answers with HTTP or closes, leaks no key, and keeps serving."""

# ruff: noqa: F811  (pytest fixtures imported from test_proxy_harness are redefined as parameters)
from __future__ import annotations

import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from test_proxy_harness import GIT_SECRET, SECRET, make_rig, rig, upstreams  # noqa: F401

from ai_sandbox.proxy import placeholder, read_log

pytestmark = pytest.mark.unit

KEY = placeholder("TEST_API_KEY")
EOL = st.sampled_from([b"\r\n", b"\n", b"\r", b"\r\r\n", b""])
TOKEN = st.sampled_from([b"GET", b"POST", b"CONNECT", b"HEAD", b"PUT", b"TRACE", b"get", b"G\x00T", b""])


def _requests(ports: dict[str, int]) -> st.SearchStrategy[bytes]:
    names = [f"{n}:{p}".encode() for n, p in ports.items()] + [b"blocked.test.example:443", b"127.0.0.1:22", b"[::1]:80"]
    authority = st.one_of(st.sampled_from(names), st.binary(max_size=40))
    target = st.one_of(
        authority, st.builds(lambda a, p: b"http://" + a + b"/" + p, authority, st.binary(max_size=30)),
        st.builds(lambda p: b"/" + p, st.binary(max_size=30)), st.just(b"*"),
    )  # fmt: skip
    version = st.sampled_from([b"HTTP/1.1", b"HTTP/1.0", b"HTTP/2", b"HTTP/1.1 x", b""])
    name = st.one_of(
        st.sampled_from([b"Host", b"Content-Length", b"Transfer-Encoding", b"Connection", b"x-api-key", b"Expect"]),
        st.binary(max_size=12),
    )  # fmt: skip
    value = st.one_of(
        st.sampled_from([b"chunked", b"5", b"-1", b"99999999999999999999", b"close", KEY.encode(), b"100-continue"]),
        st.binary(max_size=40),
    )  # fmt: skip
    header = st.builds(lambda n, s, v, e: n + s + v + e, name, st.sampled_from([b": ", b":", b" : ", b""]), value, EOL)
    structured = st.builds(
        lambda m, t, v, e, hs, e2, body: m + b" " + t + b" " + v + e + b"".join(hs) + e2 + body,
        TOKEN, target, version, EOL, st.lists(header, max_size=8), EOL, st.binary(max_size=64),
    )  # fmt: skip
    long_line = st.builds(
        lambda n, where: (b"GET http://plain.test.example/" + b"a" * n + b" HTTP/1.1\r\n\r\n") if where
        else (b"GET http://plain.test.example/ HTTP/1.1\r\nX: " + b"b" * n + b"\r\n\r\n"),
        st.integers(0, 200_000), st.booleans(),
    )  # fmt: skip
    many_headers = st.builds(lambda n: b"GET http://plain.test.example/ HTTP/1.1\r\n" + b"A: b\r\n" * n + b"\r\n",
                             st.integers(100, 3000))  # fmt: skip
    good_name = st.sampled_from([b"Host", b"Content-Length", b"Transfer-Encoding", b"Connection", b"x-api-key",
                                 b"Authorization", b"Expect", b"Upgrade", b"X-Any"])  # fmt: skip
    nearly_valid = st.builds(
        lambda m, t, hs, body: m + b" " + t + b" HTTP/1.1\r\n" + b"".join(n + b": " + v + b"\r\n" for n, v in hs)
        + b"\r\n" + body,
        st.sampled_from([b"GET", b"POST", b"CONNECT", b"HEAD"]),
        st.sampled_from([b"http://plain.test.example:%d/x" % ports["plain.test.example"], *names]),
        st.lists(st.tuples(good_name, value), max_size=5), st.binary(max_size=64),
    )  # fmt: skip
    return st.one_of(st.binary(max_size=2048), structured, nearly_valid, nearly_valid, long_line, many_headers)


def test_random_requests_never_break_the_proxy(rig):
    ports = {n: rig.up.port(n) for n in rig.up.servers}
    answers: list[bytes] = []

    @settings(max_examples=400, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(_requests(ports))
    @example(b"GET http://plain.test.example/" + b"a" * 300_000 + b" HTTP/1.1\r\n\r\n")  # refused with input unread
    @example(b"GET http://plain.test.example/ HTTP/1.1\r\n" + b"A: b\r\n" * 5000 + b"\r\n")
    def one(data: bytes) -> None:
        answer = rig.raw(data, timeout=15)
        answers.append(answer)
        assert SECRET.encode() not in answer and GIT_SECRET.encode() not in answer
        assert answer == b"" or answer.startswith(b"HTTP/1.1 "), answer[:200]

    one()
    assert any(a.startswith(b"HTTP/1.1 400") for a in answers)
    with rig.client() as c:  # still serving, and still brokering
        r = c.get(rig.url("api.test.example", "/after-fuzz"), headers={"x-api-key": KEY})
        assert r.status_code == 200 and rig.up.seen("api.test.example")[-1].header("x-api-key") == SECRET
        assert SECRET not in r.text  # the upstream echoes it; the proxy masks it on the way back
        assert c.get(rig.url("plain.test.example", "/after-fuzz", "http")).status_code == 200
    deadline = time.monotonic() + 10
    while rig.proxy._tasks and time.monotonic() < deadline:  # no connection left hanging
        time.sleep(0.05)
    assert not rig.proxy._tasks
    text = Path(rig.cfg.log).read_text()
    assert SECRET not in text and GIT_SECRET not in text
    assert all(e["verdict"] in ("allow", "deny") for e in read_log(Path(rig.cfg.log)))
