"""The proxy daemon as a sandbox uses it: on the gateway of a real TAP, firewall in mode "proxy", a fake internet.

    [guest ns]  curl with HTTPS_PROXY=http://<gateway>:3128, trusting the sandbox CA, holding placeholders only
        │ TAP + nftables: the guest reaches the proxy port on its gateway and nothing else
    [host ns]   python -m ai_sandbox.proxy (secrets in its environment only)
        │ uplink
    [inet ns]   api.test.example 203.0.113.10:443, other.test.example 203.0.113.11:443 (a test CA);
                169.254.169.254 (the metadata service; a name resolving there must be refused)
"""

from __future__ import annotations

import signal
import sys
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

from ai_sandbox import net
from ai_sandbox.net.netns import wait_for
from ai_sandbox.proxy import PORT, ProxyConfig, ca_cert_pem, daemon_argv, placeholder, read_log, write_config
from ai_sandbox.proxy.ca import issue_leaf, load_or_create, new_authority
from ai_sandbox.runner import spawn

pytestmark = pytest.mark.integration

SECRET = "sk-integration-REAL-key"
KEY = placeholder("TEST_API_KEY")
API, OTHER, META = "api.test.example", "other.test.example", "meta.test.example"
ADDRESSES = {API: "203.0.113.10", OTHER: "203.0.113.11", META: "169.254.169.254"}

_UPSTREAM = r"""
import json, ssl, sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
class H(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_GET(self):
        body = json.dumps({"server": sys.argv[3], "path": self.path, "headers": dict(self.headers)}).encode()
        print(body.decode(), flush=True)  # what arrived, for the test to read (the guest's copy is masked)
        self.send_response(200); self.send_header("Content-Length", str(len(body))); self.end_headers()
        self.wfile.write(body)
s = ThreadingHTTPServer((sys.argv[1], int(sys.argv[2])), H)
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER); ctx.load_cert_chain(sys.argv[4])
s.socket = ctx.wrap_socket(s.socket, server_side=True)
print("listening", flush=True)
s.serve_forever()
"""


def _upstream(topo, tmp: Path, ca, name: str) -> None:
    key = new_authority("k").key
    pem = tmp / f"{name}.pem"
    pem.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
        + issue_leaf(ca, name, key).public_bytes(serialization.Encoding.PEM)
    )
    address = ADDRESSES[name]
    if address != topo.internet_ip:
        topo.internet.ip("addr", "add", f"{address}/32", "dev", "lo")
    log_name = f"upstream-{name}.log"
    proc = topo.internet.python(_UPSTREAM, address, "443", name, str(pem), log_name=log_name)
    log = topo.internet.workdir / log_name
    wait_for(lambda: proc.poll() is not None or "listening" in log.read_text().splitlines(), f"upstream {name}")
    assert proc.poll() is None, log.read_text()


@pytest.fixture
def proxied(sandbox_host, guests, tmp_path):
    """A sandbox in proxy mode with its daemon running; yields (guest namespace, proxy config, daemon process)."""
    (cfg,) = [net.plan("alpha", set(), net.DEFAULT_POOL)]
    net.up("alpha", cfg, (PORT,), egress=())
    upstream_ca = load_or_create(tmp_path / "upstream-ca", "integration upstream CA")
    for name in (API, OTHER):
        _upstream(sandbox_host, tmp_path, upstream_ca, name)
    pcfg = ProxyConfig(
        sandbox="alpha", listen=str(cfg.host_ip), allow=[API, OTHER, META], deny=["blocked.test.example"],
        allowed_networks=["203.0.113.0/24"], blocked_networks=[str(cfg.pool)],
        credentials={"TEST_API_KEY": [API]}, ca_dir=str(tmp_path / "sandbox-ca"), log=str(tmp_path / "proxy.log"),
        upstream_ca=str(tmp_path / "upstream-ca" / "ca.pem"), hosts={k: [v] for k, v in ADDRESSES.items()},
    )  # fmt: skip
    config = tmp_path / "proxy.json"
    write_config(pcfg, config)
    (tmp_path / "guest-ca.pem").write_text(ca_cert_pem(Path(pcfg.ca_dir)))
    daemon = spawn(daemon_argv(config), log_file=tmp_path / "daemon.log", extra_env={"TEST_API_KEY": SECRET})
    guest = guests(cfg)
    try:
        wait_for(lambda: "listening on" in (tmp_path / "daemon.log").read_text() or daemon.poll() is not None, "proxy")
        assert daemon.poll() is None, (tmp_path / "daemon.log").read_text()
        yield guest, pcfg, daemon, tmp_path
    finally:
        if daemon.poll() is None:
            daemon.kill()
            daemon.wait()
        net.down("alpha")


def _curl(guest, pcfg: ProxyConfig, tmp: Path, url: str, *args: str, ca: str = "guest-ca.pem", proxy: bool = True):
    # curl reads http_proxy in lower case only (HTTP_PROXY could come from a CGI request header): set both spellings.
    url_ = f"http://{pcfg.listen}:{PORT}"
    env = [f"HTTPS_PROXY={url_}", f"https_proxy={url_}", f"http_proxy={url_}"] if proxy else []
    argv = ["env", "-i", *env, "curl", "-sS", "--max-time", "5", "--cacert", str(tmp / ca), *args, url]
    return guest.run(argv, check=False, timeout=30)


def test_the_guest_sends_a_placeholder_and_the_upstream_receives_the_key(proxied, sandbox_host):
    guest, pcfg, _, tmp = proxied
    r = _curl(guest, pcfg, tmp, f"https://{API}/v1/messages?key={KEY}", "-H", f"x-api-key: {KEY}",
              "-H", f"Authorization: Bearer {KEY}")  # fmt: skip
    assert r.returncode == 0, r.stderr
    seen = [ln for ln in (sandbox_host.internet.workdir / f"upstream-{API}.log").read_text().splitlines()
            if ln.startswith("{")][-1]
    # A credential with no entry of its own goes in Authorization only; the placeholder elsewhere stays one.
    assert f"Bearer {SECRET}" in seen
    assert f'"x-api-key": "{KEY}"' in seen and f"key={KEY}" in seen
    # ... and what the upstream echoes back reaches the guest with the real key masked.
    assert SECRET not in r.stdout and "Bearer " + "*" * len(SECRET) in r.stdout
    entries = read_log(Path(pcfg.log))
    assert [(e["method"], e["host"], e["verdict"], e["status"]) for e in entries] == [
        ("CONNECT", API, "allow", 200), ("GET", API, "allow", 200),
    ]  # fmt: skip
    assert SECRET not in Path(pcfg.log).read_text()


def test_another_host_gets_the_placeholder_through_a_blind_tunnel(proxied):
    guest, pcfg, _, tmp = proxied
    r = _curl(guest, pcfg, tmp, f"https://{OTHER}/", "-H", f"x-api-key: {KEY}", ca="upstream-ca/ca.pem")
    assert r.returncode == 0, r.stderr
    assert f'"x-api-key": "{KEY}"' in r.stdout and SECRET not in r.stdout


def test_denied_hosts_metadata_and_direct_traffic_are_refused(proxied):
    guest, pcfg, _, tmp = proxied
    denied = _curl(guest, pcfg, tmp, "https://blocked.test.example/")
    assert denied.returncode != 0 and "403" in denied.stderr
    unlisted = _curl(guest, pcfg, tmp, "http://unlisted.test.example/", "-o", "/dev/null", "-w", "%{http_code}")
    assert unlisted.stdout == "403"
    meta = _curl(guest, pcfg, tmp, f"http://{META}/latest/meta-data/", "-o", "/dev/null", "-w", "%{http_code}")
    assert meta.stdout == "403"
    direct = _curl(guest, pcfg, tmp, f"https://{API}/", "--resolve", f"{API}:443:{ADDRESSES[API]}", proxy=False)
    assert direct.returncode != 0  # the firewall: nothing but the proxy port on the gateway
    reasons = [(e["host"], e["reason"]) for e in read_log(Path(pcfg.log))]
    assert reasons == [
        ("blocked.test.example", "deny-list: blocked.test.example"), ("unlisted.test.example", "not in allow-list"),
        (META, "resolves to a non-public address"),
    ]  # fmt: skip


def test_the_daemon_keeps_no_secret_in_argv_and_stops_on_sigterm(proxied):
    _, pcfg, daemon, tmp = proxied
    assert SECRET not in Path(f"/proc/{daemon.pid}/cmdline").read_text()
    assert daemon.args[:3] == [sys.executable, "-m", "ai_sandbox.proxy"]
    daemon.send_signal(signal.SIGTERM)
    assert daemon.wait(10) == 0
    assert "stopped" in (tmp / "daemon.log").read_text()
