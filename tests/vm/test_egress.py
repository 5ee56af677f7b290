"""Issue: egress policy on the host and the credential broker, proved from guest root.

The "internet" is test hosts in a namespace the test made: 203.0.113.10 serves HTTPS (with a test CA) and HTTP
for every test name (names are pinned to it for the proxy), and hosts on each private range listen on TCP 80.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
from pathlib import Path

import pki
import pytest

from ai_sandbox.net import netns

REAL = {"ANTHROPIC_API_KEY": "sk-ant-api03-REALKEY-7f3a9c1e5b2d4f6a8c0e1a3b5d7f9a1c",
        "OPENAI_API_KEY": "sk-proj-REALKEY-0b1c2d3e4f5a6b7c8d9e0f1a2b3c4d5e",
        "GITHUB_TOKEN": "ghp_REALKEY1234567890abcdefghijABCDEFGHIJ"}
NAMES = ["api.anthropic.com", "api.openai.com", "github.com", "denied.example", "allowed.example"]
PRIVATE = {"10.99.0.20": "10/8", "172.16.5.5": "172.16/12", "192.168.77.7": "192.168/16", "100.64.1.1": "100.64/10"}

UPSTREAM = r"""
import http.server, json, ssl, sys, threading
log = open(sys.argv[3], "a")
class H(http.server.BaseHTTPRequestHandler):
    def _any(self):
        n = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(n).decode(errors="replace") if n else ""
        log.write(json.dumps({"path": self.path, "headers": dict(self.headers), "body": body}) + "\n"); log.flush()
        out = ("ok " + (self.headers.get("Host") or "")).encode()
        self.send_response(200); self.send_header("Content-Length", str(len(out))); self.end_headers()
        self.wfile.write(out)
    do_GET = do_POST = _any
    def log_message(self, *a): pass
def serve(port, tls):
    srv = http.server.ThreadingHTTPServer(("203.0.113.10", port), H)
    if tls:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER); ctx.load_cert_chain(sys.argv[1], sys.argv[2])
        srv.socket = ctx.wrap_socket(srv.socket, server_side=True)
    srv.serve_forever()
threading.Thread(target=serve, args=(80, False), daemon=True).start()
print("listening", flush=True)
serve(443, True)
"""


def _test_pki(d: Path) -> tuple[Path, Path, Path]:
    return pki.make_pki(d, NAMES, "ai-sandbox test upstream CA")


@pytest.fixture(scope="module")
def upstream(topo, tmp_path_factory):
    d = tmp_path_factory.mktemp("pki")
    ca, leaf, key = _test_pki(d)
    log = d / "upstream.jsonl"
    log.write_text("")
    proc = topo.internet.python(UPSTREAM, str(leaf), str(key), str(log), log_name="upstream.log")
    netns.wait_for(lambda: "listening" in (topo.internet.workdir / "upstream.log").read_text().splitlines(), "upstream")
    assert proc.poll() is None
    for addr in PRIVATE:
        topo.internet.ip("addr", "add", f"{addr}/32", "dev", "lo")
        netns.whoami_server(topo.internet, addr, 80)
    netns.whoami_server(topo.internet, topo.metadata_ip, 80)
    return {"ca": ca, "log": log}


@pytest.fixture(scope="module")
def guarded(ai, upstream, minimal_image, tmp_path_factory, monkeypatch_module):
    env = {**REAL, "AI_SANDBOX_PROXY_HOSTS": ",".join(f"{n}=203.0.113.10" for n in NAMES),
           "AI_SANDBOX_PROXY_UPSTREAM_CA": str(upstream["ca"]), "AI_SANDBOX_PROXY_ALLOWED_NETWORKS": "203.0.113.0/24"}
    for k, v in env.items():
        monkeypatch_module.setenv(k, v)
    ws = tmp_path_factory.mktemp("egress-ws")
    ai("start", "--name", "eg", "--workspace", str(ws), "--image", "minimal", "--detach", "--memory", "1024",
       "--network", "proxy")
    ai("policy", "allow", "allowed.example", "eg")
    ai("policy", "allow", "api.openai.com", "eg")
    yield "eg"
    ai("rm", "--force", "eg", check=False)


def guest(ai, name: str, cmd: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """As guest root, with the sandbox's login environment."""
    return ai("exec", "--name", name, "--", "sudo", "sh", "-c", ". /etc/environment 2>/dev/null; export "
              "$(cut -d= -f1 /etc/environment); " + cmd, check=False, timeout=timeout)


def _upstream_requests(upstream) -> list[dict]:
    return [json.loads(ln) for ln in upstream["log"].read_text().splitlines()]


def test_broker_puts_the_real_key_only_where_it_belongs(ai, guarded, upstream):
    env = guest(ai, guarded, "echo $ANTHROPIC_API_KEY; echo $https_proxy").stdout.split()
    assert env[0] == "ai-sandbox-placeholder-ANTHROPIC_API_KEY" and env[1].endswith(":3128")
    before = len(_upstream_requests(upstream))
    res = guest(ai, guarded, 'curl -sS -f https://api.anthropic.com/v1/messages -H "x-api-key: $ANTHROPIC_API_KEY" '
                             '-d "{}"')
    assert res.returncode == 0 and res.stdout == "ok api.anthropic.com", res.stderr
    res = guest(ai, guarded, 'curl -sS -f https://api.openai.com/v1/models -H "x-api-key: $ANTHROPIC_API_KEY" '
                             '-H "Authorization: Bearer $OPENAI_API_KEY"')
    assert res.returncode == 0, res.stderr
    got = _upstream_requests(upstream)[before:]
    assert got[0]["headers"]["x-api-key"] == REAL["ANTHROPIC_API_KEY"]
    assert got[1]["headers"]["Authorization"] == f"Bearer {REAL['OPENAI_API_KEY']}"
    assert got[1]["headers"]["x-api-key"] == "ai-sandbox-placeholder-ANTHROPIC_API_KEY"  # not this host's key


def test_no_key_bytes_anywhere_in_the_guest(ai, guarded):
    # The marker is assembled in the shell so that the command line itself (SUDO_COMMAND) does not contain it.
    found = guest(ai, guarded, 'P=REAL; P="${P}KEY"; grep -rl -a -e "$P" /proc/[0-9]*/environ /etc /home /root /run '
                               '/tmp 2>/dev/null; env | grep -c "$P"', timeout=120)
    assert found.stdout.strip() == "0", found.stdout
    inst = Path(ai.state, guarded)
    for disk in ("config.ext4", "data.ext4"):
        data = (inst / disk).read_bytes()
        for value in REAL.values():
            assert value.encode() not in data, disk
    for value in REAL.values():  # nor on the host side in the sandbox's files
        for f in inst.rglob("*"):
            if f.is_file() and f.suffix not in (".ext4",):
                assert value.encode() not in f.read_bytes(), f


ESCAPES = [
    "curl -sS -m 5 --noproxy '*' http://203.0.113.10/",
    "curl -sS -m 5 --noproxy '*' -k https://203.0.113.10/",
    "curl -sS -m 5 --noproxy '*' --resolve api.anthropic.com:443:203.0.113.10 -k https://api.anthropic.com/",
    "python3 -c \"import socket; socket.create_connection(('203.0.113.10', 22), 5)\"",
    "python3 -c \"import socket; socket.create_connection(('203.0.113.10', 443), 5)\"",
    *[f"curl -sS -m 5 --noproxy '*' http://{a}/" for a in PRIVATE],
    *[f"curl -sS -m 5 -f http://{a}/" for a in PRIVATE],  # through the proxy: private targets are refused
    "curl -sS -m 5 --noproxy '*' http://169.254.169.254/",
    "curl -sS -m 5 -f http://169.254.169.254/latest/meta-data/",
    "curl -sS -m 5 -6 --noproxy '*' 'http://[2001:db8::10]/'",
    "ip -6 addr add 2001:db8:1::2/64 dev eth0; ip -6 route add default dev eth0; "
    "curl -sS -m 5 -6 --noproxy '*' 'http://[2001:db8::10]/'",
    "python3 -c \"import socket; s=socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(3); "
    "s.sendto(b'x', ('203.0.113.10', 53)); s.recvfrom(10)\"",
    "getent hosts example.com",
    "curl -sS -m 5 -f https://denied.example/",
    "curl -sS -m 5 -f http://denied.example/",
    "curl -sS -m 5 -f https://api.anthropic.com/ -H 'Host: denied.example'",
    "curl -sS -m 5 -f -x $https_proxy --proxytunnel http://api.anthropic.com:443/ -H 'Host: denied.example'",
    "curl -sS -m 5 -f --connect-to denied.example:443:api.anthropic.com:443 https://denied.example/",
    "curl -sS -m 5 -f http://api.anthropic.com:22/",
    "curl -sS -m 5 -f https://api.anthropic.com:8443/",
    "curl -sS -m 5 -f https://github.com/ -H 'Host: api.anthropic.com'",
    "curl -sS -m 5 -f -x http://203.0.113.10:3128 https://api.anthropic.com/",
    "curl -sS -m 5 --noproxy '*' http://198.51.100.1/",
    "curl -sS -m 5 --noproxy '*' http://198.51.100.2/",
    "curl -sS -m 5 -f http://198.51.100.2/",
    "curl -sS -m 5 --noproxy '*' telnet://203.0.113.10:25",
    "curl -sS -m 5 -f https://203.0.113.10/",
    "curl -sS -m 5 --noproxy '*' http://10.213.0.6/",
    "curl -sS -m 5 --noproxy '*' http://10.213.0.5/",
    "GW=$(ip route | awk '/default/{print $3}'); curl -sS -m 5 --noproxy '*' http://$GW:22/",
    "GW=$(ip route | awk '/default/{print $3}'); curl -sS -m 5 --noproxy '*' http://$GW:8080/",
    "GW=$(ip route | awk '/default/{print $3}'); curl -sS -m 5 --noproxy '*' http://$GW:3129/",
    "GW=$(ip route | awk '/default/{print $3}'); python3 -c \"import socket; s=socket.socket(2,2); s.settimeout(3); "
    "s.sendto(b'x', ('$GW', 53)); s.recvfrom(10)\"",
    "nft flush ruleset 2>/dev/null; iptables -F 2>/dev/null; curl -sS -m 5 --noproxy '*' http://203.0.113.10/",
    "ip addr add 10.213.0.9/30 dev eth0 && curl -sS -m 5 --noproxy '*' --interface 10.213.0.9 http://203.0.113.10/",
]
# A forged source MAC is refused by the host too, but it also cuts the host's own SSH to the guest, so it is
# proved in the integration tier (tests/integration/test_net_policy_traffic.py) rather than here.


@pytest.mark.redteam
def test_escape_suite_from_guest_root_all_fail(ai, guarded, topo):
    assert len(ESCAPES) >= 40
    # One SSH session runs every attempt (each in its own shell) and prints its exit status.
    script = "".join(f"sh -c {shlex.quote(cmd)} >/dev/null 2>&1; echo \"rc=$?\"\n" for cmd in ESCAPES)
    res = guest(ai, guarded, script, timeout=600)
    codes = [ln for ln in res.stdout.splitlines() if ln.startswith("rc=")]
    assert len(codes) == len(ESCAPES), res.stdout + res.stderr
    escaped = [cmd for cmd, rc in zip(ESCAPES, codes, strict=True) if rc == "rc=0"]
    assert escaped == []
    # The allowed path still works after all that (the guest's own tampering changed nothing on the host).
    assert guest(ai, guarded, "curl -sS -m 5 -f -k https://allowed.example/").returncode == 0


def test_policy_log_shows_every_verdict(ai, guarded):
    rows = json.loads(ai("policy", "log", guarded, "--json").stdout)
    hosts = {(r["host"], r["verdict"]) for r in rows}
    assert ("api.anthropic.com", "allow") in hosts and ("denied.example", "deny") in hosts
    assert all(r["time"] and r["host"] and r["verdict"] in ("allow", "deny") for r in rows)
    text = ai("policy", "log", guarded).stdout
    assert "denied.example" in text and "deny" in text


def test_policy_allow_and_deny_take_effect(ai, guarded):
    ai("policy", "deny", "allowed.example", guarded)
    assert guest(ai, guarded, "curl -sS -m 5 -f -k https://allowed.example/").returncode != 0
    ai("policy", "allow", "allowed.example", guarded)
    assert guest(ai, guarded, "curl -sS -m 5 -f -k https://allowed.example/").returncode == 0
    shown = json.loads(ai("policy", "show", guarded, "--json").stdout)
    assert "allowed.example" in shown["allow"] and "allowed.example" not in shown["deny"]
    bad = ai("policy", "allow", "not a host!", guarded, check=False)
    assert bad.returncode == 2


def test_stop_removes_proxy_and_rules(ai, guarded):
    ai("stop", guarded)
    inst = Path(ai.state, guarded)
    assert not (inst / "proxy.pid").exists()
    assert "aisb-" not in ai.host("ip", "-o", "link", "show")
    assert os.system(f"ip netns exec {ai.topo.host.name} nft list table inet ai_sandbox >/dev/null 2>&1") != 0
