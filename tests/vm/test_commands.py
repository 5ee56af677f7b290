"""Commands that had no test (issue 10): logs, ssh-config, gh, the bare `ai`, rm of a running sandbox, exec with
stdin, stop --all. One sandbox, named after its workspace (so the commands that take no name find it), boots once
for the whole module; `stop --all` at the end boots a second one because it must stop two."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest
from terminal import Terminal, ai_command

from ai_sandbox.state import name_for_workspace


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("cmds")
    (d / "FILE").write_text("hello\n")
    return d


@pytest.fixture(scope="module")
def name(ai, ws, minimal_image) -> str:
    t0 = time.monotonic()
    ai("start", "--workspace", str(ws), "--image", "minimal", "--detach", "--memory", "1024", "--network", "nat",
       cwd=ws)
    print(f"boot: {time.monotonic() - t0:.1f}s")
    yield name_for_workspace(ws.resolve())
    ai("rm", "--force", name_for_workspace(ws.resolve()), check=False)


def _status(ai, name: str) -> str:
    return {r["name"]: r["status"] for r in json.loads(ai("ps", "--json").stdout)}.get(name, "")


def test_logs_show_the_boot_and_no_escape_sequences(ai, ws, name):
    # Guest root writes escape sequences and rich markup to its console: they must reach the terminal inert.
    ai("exec", "--name", name, "--", "sudo", "sh", "-c",
       r"printf 'MARK-\033[31mred\033]0;title\007-[bold]x[/bold]-\033[2J\n' > /dev/console")
    out = ai("logs", cwd=ws).stdout  # no name: the sandbox of the current directory
    assert "\x1b" not in out and "\x07" not in out
    assert "MARK-red-[bold]x[/bold]-" in out
    assert any(word in out for word in ("systemd", "login:", "Debian")), out[-2000:]


def test_ssh_config_works_with_plain_ssh(ai, ws, name, tmp_path):
    cfg = tmp_path / "ssh_config"
    cfg.write_text(ai("ssh-config", name).stdout)
    res = subprocess.run(["ip", "netns", "exec", ai.topo.host.name, "ssh", "-F", str(cfg), f"ai-{name}",
                          "echo", "via-ssh:$(whoami)"], capture_output=True, text=True, timeout=60)
    assert (res.returncode, res.stdout) == (0, "via-ssh:sandbox\n"), res.stderr


def test_exec_passes_stdin(ai, name):
    assert ai("exec", "--name", name, "--", "cat", input="hi\nthere\n").stdout == "hi\nthere\n"
    assert ai("exec", "--name", name, "--", "wc", "-c", input="x" * 100000).stdout.strip() == "100000"


def test_gh_runs_in_the_sandbox_of_the_directory(ai, ws, name):
    res = ai("gh", "--version", cwd=ws, check=False)
    # The minimal image has no gh: the guest's shell says so and the exit status is its 127.
    if res.returncode == 0:
        assert res.stdout.startswith("gh version")
    else:
        assert res.returncode == 127 and "gh" in res.stderr and "not found" in res.stderr, res


def test_bare_ai_attaches_to_the_running_sandbox(ai, ws, name):
    with Terminal(ai_command(ai.state, ai.topo.host.name), cwd=ws) as term:
        assert "sandbox@" in term.wait_for("sandbox@", 90)
        term.type("echo HOST=$(hostname) && cat FILE")
        term.wait_for(f"HOST={name}", 15)
        screen = term.wait_for("hello", 15)  # the command line shows "cat FILE", never the file's text
        assert f"HOST={name}" in screen and "hello" in screen
        term.type("exit")
    assert _status(ai, name) == "running"


def test_rm_refuses_a_running_sandbox(ai, name):
    res = ai("rm", name, check=False)
    errors = [ln for ln in res.stderr.splitlines() if ln.startswith("error:")]
    assert res.returncode != 0 and len(errors) == 1 and "running" in errors[0], res.stderr
    assert _status(ai, name) == "running"


def test_flags_differing_from_the_sandbox_are_refused_in_one_line(ai, ws, name):
    res = ai("start", "--name", name, "--share", "copy", "--detach", check=False)
    errors = [ln for ln in res.stderr.splitlines() if ln.startswith("error:")]
    assert res.returncode == 2 and len(errors) == 1 and f"ai rm {name}" in errors[0], res.stderr
    ai("start", "--name", name, "--cpus", "1", "--detach")  # running: kept for the next start
    spec = json.loads(Path(ai.state, name, "sandbox.json").read_text())
    assert (spec["cpus"], spec["share"]) == (1, "virtiofs")


def test_stop_all_stops_every_sandbox(ai, name, tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    ai("start", "--name", "cmd2", "--workspace", str(other), "--image", "minimal", "--detach", "--memory", "768",
       "--network", "nat")
    try:
        assert _status(ai, "cmd2") == "running"
        res = ai("stop", "--all")
        assert f"stopped {name}" in res.stderr and "stopped cmd2" in res.stderr
        assert (_status(ai, name), _status(ai, "cmd2")) == ("stopped", "stopped")
    finally:
        ai("rm", "--force", "cmd2", check=False)
