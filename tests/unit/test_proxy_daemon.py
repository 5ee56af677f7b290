"""The config file, the log format and the daemon process (`python -m ai_sandbox.proxy`) on loopback."""

# ruff: noqa: F811  (pytest fixtures imported from test_proxy_harness are redefined as parameters)
from __future__ import annotations

import json
import os
import signal
import socket
import ssl
import stat
import subprocess
import time
from pathlib import Path

import httpx
import pytest
from test_proxy_harness import HOSTS, SECRET, upstreams  # noqa: F401

from ai_sandbox.errors import UsageError
from ai_sandbox.proxy import PORT, ProxyConfig, ca_cert_pem, daemon_argv, placeholder, read_config, read_log, write_config
from ai_sandbox.proxy.log import RequestLog

pytestmark = pytest.mark.unit


def _cfg(tmp_path: Path, **kw) -> ProxyConfig:
    return ProxyConfig(sandbox="s1", listen="127.0.0.1", ca_dir=str(tmp_path / "ca"), log=str(tmp_path / "p.log"), **kw)


def test_config_round_trip_and_defaults(tmp_path):
    cfg = _cfg(tmp_path, allow=["a.example"], hosts={"a.example": ["203.0.113.1"]})
    path = tmp_path / "proxy.json"
    write_config(cfg, path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert read_config(path) == cfg
    assert cfg.port == PORT == 3128 and cfg.ports == [80, 443] and cfg.allowed_networks == []
    assert cfg.credentials["ANTHROPIC_API_KEY"] == ["api.anthropic.com"]
    assert "sk-" not in path.read_text()


@pytest.mark.parametrize(
    "text",
    ["[]", "{", '{"sandbox": "s"}', '{"sandbox": "s", "listen": "x", "ca_dir": "c", "log": "l", "port": "80"}',
     '{"sandbox": "s", "listen": "x", "ca_dir": "c", "log": "l", "allow": "a.example"}',
     '{"sandbox": "s", "listen": "x", "ca_dir": "c", "log": "l", "ports": [0]}',
     '{"sandbox": "s", "listen": "x", "ca_dir": "c", "log": "l", "credentials": {"NOT A VAR": ["h"]}}'],
)  # fmt: skip
def test_bad_configs_are_usage_errors(text):
    with pytest.raises(UsageError):
        ProxyConfig.from_json(text)


def test_daemon_argv_never_carries_a_secret(tmp_path):
    argv = daemon_argv(tmp_path / "proxy.json")
    assert argv[1:] == ["-m", "ai_sandbox.proxy", "--config", str(tmp_path / "proxy.json")]
    assert daemon_argv(tmp_path / "p.json", fd=5)[-2:] == ["--fd", "5"]


def test_log_lines_and_reader(tmp_path):
    path = tmp_path / "sub" / "log.jsonl"
    log = RequestLog(path, "s1")
    log.record("CONNECT", "api.example.com", 443, "allow", "tunnel", 200)
    log.record("GET", "x" * 1000, 80, "deny", "not in allow-list", 403)
    log.close()
    with path.open("a") as fh:
        fh.write('{"torn": ')
    entries = read_log(path)
    assert len(entries) == 2
    assert set(entries[0]) == {"time", "sandbox", "method", "host", "port", "verdict", "reason", "status"}
    assert entries[0]["time"].endswith("+00:00") and entries[1]["host"] == "x" * 255
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert read_log(tmp_path / "missing") == []


def _wait_listening(port: int, proc: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"daemon exited: {log.read_text()}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise AssertionError("daemon did not listen")


def test_the_daemon_serves_reloads_its_policy_and_stops_on_sigterm(tmp_path, upstreams):
    api_port = upstreams.port("api.test.example")
    listener = socket.create_server(("127.0.0.1", 0))
    cfg = _cfg(tmp_path, allow=["api.test.example", f"api.test.example:{api_port}"], allowed_networks=["127.0.0.0/8"],
               ports=upstreams.ports, credentials={"TEST_API_KEY": ["api.test.example"]},
               credential_fields={"TEST_API_KEY": ["header:x-api-key"]}, upstream_ca=str(upstreams.ca_file),
               hosts={"api.test.example": HOSTS["api.test.example"]}, port=listener.getsockname()[1])  # fmt: skip
    config = tmp_path / "proxy.json"
    write_config(cfg, config)
    ca_pem = ca_cert_pem(Path(cfg.ca_dir))  # as the caller does: the guest needs it before the daemon runs
    out = tmp_path / "daemon.out"
    env = {**os.environ, "TEST_API_KEY": SECRET}
    with out.open("wb") as fh:
        proc = subprocess.Popen(daemon_argv(config, fd=listener.fileno()), env=env, stdout=fh, stderr=subprocess.STDOUT,
                                pass_fds=[listener.fileno()])  # fmt: skip
    listener.close()
    try:
        _wait_listening(cfg.port, proc, out)
        assert SECRET not in Path(f"/proc/{proc.pid}/cmdline").read_text()
        ctx = ssl.create_default_context(cadata=ca_pem)
        with httpx.Client(proxy=f"http://127.0.0.1:{cfg.port}", verify=ctx, trust_env=False, timeout=10) as c:
            url = f"https://api.test.example:{api_port}/v1"
            r = c.get(url, headers={"x-api-key": placeholder("TEST_API_KEY")})
            assert r.status_code == 200 and upstreams.seen("api.test.example")[-1].header("x-api-key") == SECRET
            assert SECRET not in r.text  # echoed by the upstream, masked by the proxy
            (tmp_path / "policy.json").write_text(json.dumps({"allow": [], "deny": []}))
        with httpx.Client(proxy=f"http://127.0.0.1:{cfg.port}", verify=ctx, trust_env=False, timeout=10) as c:
            with pytest.raises(httpx.ProxyError, match="403"):
                c.get(url)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    entries = read_log(Path(cfg.log))
    assert [(e["method"], e["verdict"]) for e in entries] == [("CONNECT", "allow"), ("GET", "allow"), ("CONNECT", "deny")]
    assert SECRET not in out.read_text() and SECRET not in Path(cfg.log).read_text()


def test_the_daemon_reports_a_bad_config_in_one_line(tmp_path):
    config = tmp_path / "proxy.json"
    config.write_text("{}")
    result = subprocess.run(daemon_argv(config), capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("ai-sandbox proxy: proxy config:")
