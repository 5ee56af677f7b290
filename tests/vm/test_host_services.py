"""Issue 10: the host agent's services, proved from a real guest.

- Ollama: a fake Ollama on the sandbox host's loopback 127.0.0.1:11434 answers the guest's `curl $OLLAMA_HOST`
  (tags; a chat streamed back); what manages models (pull, delete) is refused by the host agent with a 403 and never
  reaches it; another loopback port of that host (11435) stays out of reach.
- DNS in `open` mode: the host's resolver sits at a private address (10.99.53.53, in the test's fake internet),
  which the guest's open ruleset may not reach; the guest resolves through its gateway, and the query is logged.
- An offline host (a namespace with no default route): `ai start` works with one notice, egress fails at once
  (the proxy's 502), Ollama still answers.
One sandbox per situation (module-scoped); everything runs in namespaces the test made.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from ai_sandbox.net import netns
from ai_sandbox.state import Files

RESOLVER = "10.99.53.53"
NAME, ADDRESS = "db.corp.example", "203.0.113.77"

FAKE_OLLAMA = r"""
import http.server, json, sys
port = int(sys.argv[1])
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        print("request", self.command, self.path, flush=True)
        body = json.dumps({"models": [{"name": "fake-llm:1b", "port": port}]}).encode()
        self.send_response(200 if self.path == "/api/tags" else 404)
        self.send_header("Content-Length", str(len(body))); self.end_headers(); self.wfile.write(body)
    def do_POST(self):
        print("request", self.command, self.path, flush=True)
        asked = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
        self.send_response(200 if self.path == "/api/chat" else 404)
        self.send_header("Content-Type", "application/x-ndjson"); self.end_headers()
        for word, done in (("hello", False), ("there", True)):
            self.wfile.write(json.dumps({"model": asked.get("model"), "message": {"content": word},
                                         "done": done}).encode() + b"\n")
            self.wfile.flush()
    do_DELETE = do_HEAD = do_PUT = do_POST
    def log_message(self, *a): pass
srv = http.server.ThreadingHTTPServer(("127.0.0.1", port), H)
print("listening", flush=True)
srv.serve_forever()
"""

FAKE_RESOLVER = r"""
import socket, sys
import dns.message, dns.rcode, dns.rdatatype, dns.rrset
addr, name, answer = sys.argv[1:4]
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind((addr, 53))
print("listening", flush=True)
while True:
    data, peer = s.recvfrom(4096)
    q = dns.message.from_wire(data)
    qname = q.question[0].name.to_text()
    print("query", qname, dns.rdatatype.to_text(q.question[0].rdtype), peer[0], flush=True)
    r = dns.message.make_response(q)
    if qname != name + ".":
        r.set_rcode(dns.rcode.NXDOMAIN)
    elif q.question[0].rdtype == dns.rdatatype.A:
        r.answer.append(dns.rrset.from_text(qname, 60, "IN", "A", answer))
    s.sendto(r.to_wire(), peer)
"""


def _serve(ns: netns.Netns, code: str, *args: str, log_name: str) -> Path:
    proc = ns.python(code, *args, log_name=log_name)
    log = ns.workdir / log_name
    netns.wait_for(lambda: proc.poll() is not None or "listening" in log.read_text().splitlines(), log_name)
    assert proc.poll() is None, log.read_text()[-2000:]
    return log


def _ollamas(ns: netns.Netns) -> dict[int, Path]:
    return {port: _serve(ns, FAKE_OLLAMA, str(port), log_name=f"ollama-{port}.log") for port in (11434, 11435)}


def _resolv_conf(ns: netns.Netns, nameserver: str) -> Path:
    """The host namespace's /etc/resolv.conf, as `ip netns exec` shows it to the `ai` it runs (and its agent)."""
    d = Path("/etc/netns") / ns.name
    d.mkdir(parents=True, exist_ok=True)
    (d / "resolv.conf").write_text(f"nameserver {nameserver}\n")
    return d


def _start(ai, name: str, ws: Path, network: str) -> tuple[subprocess.CompletedProcess[str], float]:
    t0 = time.monotonic()
    res = ai("start", "--name", name, "--workspace", str(ws), "--image", "minimal", "--detach", "--memory", "1024",
             "--network", network)
    return res, time.monotonic() - t0


def guest(ai, name: str, cmd: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """As the sandbox user, with the sandbox's login environment."""
    return ai("exec", "--name", name, "--", "sh", "-c", "set -a; . /etc/environment; set +a; " + cmd,
              check=False, timeout=timeout)


@pytest.fixture(scope="module")
def open_box(ai, topo, minimal_image, tmp_path_factory):
    ollama = _ollamas(topo.host)
    topo.internet.ip("addr", "add", f"{RESOLVER}/32", "dev", "lo")
    resolver_log = _serve(topo.internet, FAKE_RESOLVER, RESOLVER, NAME, ADDRESS, log_name="resolver.log")
    etc = _resolv_conf(topo.host, RESOLVER)
    try:
        res, took = _start(ai, "hs-open", tmp_path_factory.mktemp("hs-open-ws"), "open")
        print(f"start (open mode): {took:.1f} s")
        yield SimpleNamespace(name="hs-open", ollama=ollama, resolver_log=resolver_log, start=res)
    finally:
        ai("rm", "--force", "hs-open", check=False)
        shutil.rmtree(etc, ignore_errors=True)


@pytest.fixture(scope="module")
def offline_box(ai, minimal_image, tmp_path_factory):
    host = netns.Netns.create("offl")  # a host whose only network is its loopback: no default route
    etc = _resolv_conf(host, "192.0.2.53")  # the resolver of the network it left
    offline_ai = type(ai)(SimpleNamespace(host=host), tmp_path_factory.mktemp("offline-state"))
    try:
        ollama = _ollamas(host)
        res, took = _start(offline_ai, "hs-off", tmp_path_factory.mktemp("hs-off-ws"), "proxy")
        print(f"start (offline host): {took:.1f} s")
        yield SimpleNamespace(ai=offline_ai, name="hs-off", ollama=ollama, start=res)
    finally:
        offline_ai("rm", "--force", "hs-off", check=False)
        offline_ai("stop", "--all", check=False)
        host.delete()
        shutil.rmtree(etc, ignore_errors=True)


# --- open mode: Ollama and DNS ------------------------------------------------------------------------------------


def test_guest_reaches_the_hosts_ollama_through_its_gateway(ai, open_box):
    env = guest(ai, open_box.name, 'echo "$OLLAMA_HOST"; ip route | awk \'/default/{print $3}\'').stdout.split()
    assert env[0] == f"http://{env[1]}:11434"
    res = guest(ai, open_box.name, 'curl -sS -m 20 "$OLLAMA_HOST/api/tags"')
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["models"][0] == {"name": "fake-llm:1b", "port": 11434}


def test_no_other_loopback_port_of_the_host_is_reachable(ai, open_box):
    res = guest(ai, open_box.name, "GW=$(ip route | awk '/default/{print $3}'); "
                                   "curl -sS -m 5 http://$GW:11435/api/tags")
    assert res.returncode != 0
    assert not [ln for ln in open_box.ollama[11435].read_text().splitlines() if ln.startswith("request ")]


def _requests(log: Path) -> list[str]:
    return [ln.removeprefix("request ") for ln in log.read_text().splitlines() if ln.startswith("request ")]


def test_the_guest_cannot_pull_or_delete_the_hosts_models(ai, open_box):
    res = guest(ai, open_box.name, "for req in 'POST /api/pull' 'DELETE /api/delete' 'POST /api/%70ull'; do "
                                   "set -- $req; curl -sS -m 20 -o /tmp/err -w '%{http_code} ' -X $1 "
                                   "\"$OLLAMA_HOST$2\" -d '{\"model\":\"attacker.example:8443/x/y\",\"insecure\":true}'; "
                                   "done; echo; cat /tmp/err")
    codes, err = res.stdout.split("\n", 1)
    assert codes.split() == ["403", "403", "403"], (res.stdout, res.stderr)
    assert "inference and reading only" in json.loads(err)["error"]
    seen = _requests(open_box.ollama[11434])
    assert not [r for r in seen if "pull" in r or "delete" in r or "%70" in r], seen
    agent_log = (Path(ai.state) / open_box.name / Files.AGENT_LOG).read_text()
    assert 'refused "POST" "/api/pull"' in agent_log and 'refused "DELETE" "/api/delete"' in agent_log


def test_a_chat_streams_through_the_forward(ai, open_box):
    res = guest(ai, open_box.name, 'curl -sS -m 20 "$OLLAMA_HOST/api/chat" '
                                   "-d '{\"model\":\"fake-llm:1b\",\"messages\":[]}'")
    assert res.returncode == 0, res.stderr
    lines = [json.loads(ln) for ln in res.stdout.splitlines()]
    assert [(x["model"], x["message"]["content"], x["done"]) for x in lines] == [
        ("fake-llm:1b", "hello", False), ("fake-llm:1b", "there", True)]
    assert "POST /api/chat" in _requests(open_box.ollama[11434])


def test_guest_resolves_through_the_gateway_from_a_private_resolver(ai, open_box):
    conf = guest(ai, open_box.name, "cat /etc/resolv.conf; ip route | awk '/default/{print $3}'").stdout.split()
    assert conf == ["nameserver", conf[-1], conf[-1]]  # the gateway is the guest's only resolver
    res = guest(ai, open_box.name, f"getent hosts {NAME}")
    assert res.returncode == 0 and res.stdout.split()[:2] == [ADDRESS, NAME], res.stderr
    assert f"query {NAME}. A" in open_box.resolver_log.read_text()
    entries = [json.loads(x) for x in (Path(ai.state) / open_box.name / Files.DNS_LOG).read_text().splitlines()]
    mine = [e for e in entries if e.get("name") == NAME + "." and e.get("type") == "A"]
    assert mine and mine[-1]["rcode"] == "NOERROR" and mine[-1]["upstream"] == RESOLVER
    assert mine[-1]["sandbox"] == open_box.name
    # Why the gateway is needed: the open ruleset keeps the guest itself away from the private resolver.
    direct = guest(ai, open_box.name, "python3 -c \"import socket; s=socket.socket(2,2); s.settimeout(3); "
                                      f"s.sendto(bytes(12), ('{RESOLVER}', 53)); s.recvfrom(512)\"")
    assert direct.returncode != 0


def test_an_unknown_name_is_nxdomain_not_a_timeout(ai, open_box):
    t0 = time.monotonic()
    res = guest(ai, open_box.name, "getent hosts nothing.corp.example; echo rc=$?")
    assert "rc=2" in res.stdout  # getent: key not found
    assert time.monotonic() - t0 < 30


# --- an offline host ----------------------------------------------------------------------------------------------


def test_offline_host_starts_with_one_notice(offline_box):
    said = offline_box.start.stdout + offline_box.start.stderr
    lines = [ln for ln in said.splitlines() if "no way out" in ln]
    assert len(lines) == 1 and "offline" in lines[0] and "Ollama" in lines[0], said


def test_offline_egress_fails_at_once_and_ollama_still_answers(offline_box):
    t0 = time.monotonic()
    res = guest(offline_box.ai, offline_box.name,
                "curl -sS -m 30 -o /dev/null -w '%{http_code}' http://api.anthropic.com/v1/models")
    took = time.monotonic() - t0
    assert res.stdout.strip() == "502", (res.stdout, res.stderr)
    assert took < 20, took  # a clean failure, not a wait for a timeout (exec itself takes a few seconds here)
    res = guest(offline_box.ai, offline_box.name, 'curl -sS -m 20 "$OLLAMA_HOST/api/tags"')
    assert res.returncode == 0 and "fake-llm" in res.stdout, res.stderr


# --- status -------------------------------------------------------------------------------------------------------


def test_a_dead_agent_shows_as_broken(ai, open_box):
    pid = int((Path(ai.state) / open_box.name / Files.AGENT_PID).read_text())
    subprocess.run(["kill", "-9", str(pid)], check=True)
    netns.wait_for(lambda: not Path(f"/proc/{pid}").exists() or _zombie(pid), "the agent to die")
    rows = {r["name"]: r for r in json.loads(ai("ps", "--json").stdout)}
    assert rows[open_box.name]["status"] == "broken" and "host agent" in rows[open_box.name]["reason"]


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True

