"""Issue: `ai start/exec/stop/rm/ps` on QEMU with the live workspace, NAT to a fake internet host, persistence,
isolation between sandboxes, crash recovery, and bad input. Runs entirely inside test network namespaces."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from terminal import Terminal, ai_command  # tests/vm/terminal.py (pytest puts tests/vm on sys.path)

from ai_sandbox.net import netns

PROBE = ("import socket,sys\n"
         "s=socket.create_connection((sys.argv[1],int(sys.argv[2])),timeout=5)\n"
         "print(s.recv(100).decode().strip())\n")


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("ws")
    (d / "FILE").write_text("hello from the host\n")
    return d


@pytest.fixture(scope="module")
def started(ai, ws, minimal_image):
    ai("start", "--name", "lc", "--workspace", str(ws), "--image", "minimal", "--detach", "--cpus", "2",
       "--memory", "1024", "--network", "nat")
    return "lc"


def _ps(ai) -> dict[str, dict]:
    return {r["name"]: r for r in json.loads(ai("ps", "--json").stdout)}


def _leftovers(ai, name: str) -> tuple[str, str]:
    from ai_sandbox.net.pool import tap_name

    links = ai.host("ip", "-o", "link", "show")
    rules = ai.host("nft", "list", "ruleset")
    return (tap_name(name) if tap_name(name) in links else "",
            rules if tap_name(name).removeprefix("aisb-") in rules else "")


def test_workspace_exec_and_exit_status(ai, started, ws):
    assert ai("exec", "--name", started, "--", "cat", "/workspace/FILE").stdout == "hello from the host\n"
    ai("exec", "--name", started, "--", "sh", "-c", "echo from the guest > /workspace/guest.txt")
    assert (ws / "guest.txt").read_text() == "from the guest\n"
    assert (ws / "guest.txt").stat().st_uid == os.getuid()  # owned by the invoking user
    (ws / "live.txt").write_text("written while running\n")  # live: no sync step
    assert ai("exec", "--name", started, "--", "cat", "/workspace/live.txt").stdout == "written while running\n"
    res = ai("exec", "--name", started, "--", "sh", "-c", "echo out; echo err >&2; exit 7", check=False)
    assert (res.returncode, res.stdout, res.stderr) == (7, "out\n", "err\n")
    assert ai("exec", "--name", started, "--", "pwd").stdout == "/workspace\n"


def test_nat_reaches_the_fake_internet_and_nothing_else(ai, topo, started):
    netns.whoami_server(topo.internet, topo.internet_ip, 8080)
    seen = ai("exec", "--name", started, "--", "python3", "-c", PROBE, topo.internet_ip, "8080").stdout.strip()
    assert seen == topo.uplink_ip  # the fake internet host saw the host's uplink address: NAT worked
    netns.whoami_server(topo.internet, topo.metadata_ip, 80)
    res = ai("exec", "--name", started, "--", "python3", "-c", PROBE, topo.metadata_ip, "80", check=False)
    assert res.returncode != 0


def test_ps_shows_running_sandbox(ai, started, ws):
    row = _ps(ai)[started]
    assert row["status"] == "running" and row["vmm"] == "qemu" and row["workspace"] == str(ws)
    assert row["address"].startswith("10.213.")


def test_persistence_across_stop_start(ai, started, ws, tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "DEBIAN").mkdir(parents=True)
    (pkg / "DEBIAN/control").write_text("Package: ai-sandbox-probe\nVersion: 1.0\nArchitecture: all\n"
                                        "Maintainer: t <t@example.invalid>\nDescription: probe\n")
    (pkg / "usr/share/ai-sandbox-probe").mkdir(parents=True)
    (pkg / "usr/share/ai-sandbox-probe/marker").write_text("installed\n")
    subprocess.run(["dpkg-deb", "--build", "--root-owner-group", str(pkg), str(ws / "probe.deb")], check=True,
                   capture_output=True)
    ai("exec", "--name", started, "--", "sh", "-c",
       "cp /workspace/probe.deb /tmp/ && sudo dpkg -i /tmp/probe.deb && echo kept > /home/sandbox/keep.txt")
    ai("stop", started)
    assert _ps(ai)[started]["status"] == "stopped"
    assert _leftovers(ai, started) == ("", "")
    ai("start", "--name", started, "--detach")
    out = ai("exec", "--name", started, "--", "sh", "-c",
             "cat /home/sandbox/keep.txt; dpkg-query -W -f='${Status}' ai-sandbox-probe").stdout
    assert out == "kept\ninstall ok installed"


def test_two_sandboxes_cannot_reach_each_other(ai, started, tmp_path):
    other_ws = tmp_path / "other"
    other_ws.mkdir()
    ai("start", "--name", "lc2", "--workspace", str(other_ws), "--image", "minimal", "--detach", "--cpus", "1",
       "--memory", "768")
    try:
        rows = _ps(ai)
        a, b = rows[started]["address"], rows["lc2"]["address"]
        assert a != b
        for src, dst in ((started, b), ("lc2", a)):
            res = ai("exec", "--name", src, "--", "python3", "-c", PROBE, dst, "22", check=False)
            assert res.returncode != 0, f"{src} reached {dst}"
    finally:
        ai("rm", "--force", "lc2")
    assert _leftovers(ai, "lc2") == ("", "")
    assert "lc2" not in _ps(ai)


def test_kill_minus_9_is_reported_and_recovered(ai, started):
    cycles = int(os.environ.get("AI_TEST_KILL_CYCLES", "10"))
    for _ in range(cycles):
        pid = int(Path(ai.state, started, "vmm.pid").read_text())
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and _ps(ai)[started]["status"] == "running":
            time.sleep(0.2)
        row = _ps(ai)[started]
        assert row["status"] == "broken" and "gone" in row["reason"]
        ai("start", "--name", started, "--detach")
        assert _ps(ai)[started]["status"] == "running"
        links = ai.host("ip", "-o", "link", "show")
        assert links.count("aisb-") == 1  # one TAP for one sandbox: nothing leaked
    assert ai("exec", "--name", started, "--", "cat", "/workspace/FILE").returncode == 0


def test_interactive_shell_through_a_terminal(ai, started, topo):
    with Terminal(ai_command(ai.state, topo.host.name, "shell", started)) as term:
        screen = term.wait_for("sandbox@")
        assert "sandbox@" in screen and "/workspace" in screen
        term.type("echo TTY=$(tty)")
        assert "TTY=/dev/pts/" in term.wait_for("TTY=/dev/pts/", 10)
        term.type("exit")
        time.sleep(2)
    assert _ps(ai)[started]["status"] == "running"  # leaving the shell leaves the VM running


def test_bad_input_is_one_line_and_creates_nothing(ai, tmp_path):
    before = sorted(p.name for p in ai.state.iterdir())
    cases = [
        ("exec", "--name", "no-such-sandbox", "--", "true"),
        ("start", "--name", "bad1", "--workspace", str(tmp_path / "missing"), "--detach"),
        ("start", "--name", "bad2", "--workspace", str(tmp_path), "--vmm", "firecracker", "--detach"),
        ("start", "--name", "Bad Name", "--workspace", str(tmp_path), "--detach"),
    ]
    for args in cases:
        res = ai(*args, check=False)
        errors = [ln for ln in res.stderr.splitlines() if ln.startswith("error:")]
        assert res.returncode != 0 and len(errors) == 1, (args, res.stderr)
    assert sorted(p.name for p in ai.state.iterdir()) == before


def test_rm_removes_state_and_network(ai, started, ws):
    ai("rm", "--force", started)
    assert not Path(ai.state, started).exists()
    assert _leftovers(ai, started) == ("", "")
    assert (ws / "FILE").exists()  # never the workspace
