"""Red team, settings surface: guest root writes settings files into the shared workspace, hoping the host reads
them at the next `ai start` and widens the sandbox's egress, switches its network mode or picks another image.

Each test is one attack. On the host, `ai start` must print one note naming the unread file, leave the nftables
ruleset and the sandbox's spec exactly as they were, and the guest's direct connection to a fake internet host on
a port no policy allows must still fail.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from ai_sandbox.net import netns
from ai_sandbox.state import name_for_workspace

pytestmark = [pytest.mark.vm, pytest.mark.redteam]

BOX: list[str] = []  # the module's sandbox name, derived from its workspace like `ai` does
INTERNET, PORT = "203.0.113.10", 5432  # a fake internet host and a port that no policy of this sandbox allows
# The attack: whole internet, every port, plain NAT, a recipe of the guest's own.
WIDE = ("EGRESS_ALLOW_IP=0.0.0.0/0\nEGRESS_ALLOW_TCP_PORTS=1-65535\nAI_IMAGE=/workspace/evil.toml\n"
        "AI_NETWORK=nat\nAI_VMM=qemu\n")
# The same aim with values that would pass validation: exactly the host and port, so only not-reading stops it.
NARROW = f"EGRESS_ALLOW_IP={INTERNET}\nEGRESS_ALLOW_TCP_PORTS={PORT}\nAI_NETWORK=nat\n"
EVIL_RECIPE = 'name = "evil"\nbase = "debian:bookworm"\npackages = ["netcat-openbsd"]\n'


@pytest.fixture(scope="module")
def box(ai, topo, minimal_image, tmp_path_factory):
    """The workspace of a sandbox started the plain way: from its directory, named after it (`ai start` there
    finds it again)."""
    netns.whoami_server(topo.internet, INTERNET, PORT)
    ws = tmp_path_factory.mktemp("rt-settings-ws").resolve()
    BOX[:] = [name_for_workspace(ws)]
    ai("start", "--image", "minimal", "--detach", "--memory", "1024", cwd=ws)
    yield ws
    ai("rm", "--force", name_for_workspace(ws), check=False)


def guest_root(ai, cmd: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return ai("exec", "--name", BOX[0], "--", "sudo", "sh", "-c", cmd, check=False, timeout=timeout)


def direct_connect(ai) -> subprocess.CompletedProcess[str]:
    """From guest root, around the proxy, to the fake internet host on the port nothing allows."""
    return guest_root(ai, f"python3 -c \"import socket; print(socket.create_connection(('{INTERNET}', {PORT}), 5)"
                          ".recv(64).decode())\"")


def snapshot(ai) -> tuple[str, dict]:
    ruleset = ai.host("nft", "list", "table", "inet", "ai_sandbox")
    spec = json.loads((Path(ai.state) / BOX[0] / "sandbox.json").read_text())
    return ruleset, spec


def plant(ai, files: dict[str, str]) -> None:
    """The guest writes settings files into /workspace (shared with the host), as the workspace's owner there."""
    for rel, text in files.items():
        script = f"mkdir -p \"$(dirname /workspace/{rel})\" && printf '%s' '{text}' > /workspace/{rel}"
        res = ai("exec", "--name", BOX[0], "--", "sh", "-c", script, check=False)
        assert res.returncode == 0, res.stderr


def restart(ai, cwd: Path, *args: str) -> list[str]:
    """`ai stop`, then `ai start` from `cwd`; returns its stderr lines."""
    ai("stop", BOX[0])
    res = ai("start", "--detach", *args, cwd=cwd)
    return res.stderr.splitlines()


def notes_naming(lines: list[str], path: Path) -> list[str]:
    return [ln for ln in lines if str(path) in ln]


def test_attack_wide_open_env_at_the_workspace_root(ai, box):
    before = snapshot(ai)
    assert direct_connect(ai).returncode != 0  # closed to begin with
    plant(ai, {".env": WIDE, "evil.toml": EVIL_RECIPE})
    assert (box / ".env").read_text() == WIDE  # the guest did write it on the host side
    lines = restart(ai, box)  # the user starts it again from the workspace, as `ai` invites
    notes = notes_naming(lines, box / ".env")
    assert len(notes) == 1 and "config.env" in notes[0], lines
    assert snapshot(ai) == before
    res = direct_connect(ai)
    assert res.returncode != 0 and "198.51.100" not in res.stdout, res.stdout


def test_attack_valid_allowance_from_a_subdirectory(ai, box):
    before = snapshot(ai)
    plant(ai, {".env": NARROW, "sub/dir/.env": NARROW})
    lines = restart(ai, box / "sub" / "dir", "--name", BOX[0])  # ./.env here is inside the workspace too
    assert len([ln for ln in lines if "not reading" in ln]) == 1, lines  # one line, naming both files
    assert notes_naming(lines, box / "sub" / "dir" / ".env"), lines
    ruleset, spec = snapshot(ai)
    assert (ruleset, spec) == before
    assert INTERNET not in ruleset and str(PORT) not in ruleset
    res = direct_connect(ai)
    assert res.returncode != 0 and "198.51.100" not in res.stdout, res.stdout


def test_attack_guest_settings_for_a_new_sandbox_of_the_same_workspace(ai, box, tmp_path):
    # No boot needed: FC_VCPU is validated before FC_MEM, so if the guest's file were read its bad value would be
    # the error; the error is the command line's, and no second sandbox is made.
    plant(ai, {".env": "FC_VCPU=lots\n" + WIDE})
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    res = ai("start", "--name", "rt-second", "--workspace", str(box), "--detach", "--memory", "1", cwd=outside,
             check=False)
    assert res.returncode == 2
    errors = [ln for ln in res.stderr.splitlines() if ln.startswith("error:")]
    assert errors == [errors[0]] and errors[0].startswith("error: FC_MEM=1 (from command line)"), res.stderr
    assert len(notes_naming(res.stderr.splitlines(), box / ".env")) == 1
    assert not (Path(ai.state) / "rt-second").exists()


def test_attack_planted_user_config_in_a_workspace_that_holds_it(ai, box, tmp_path):
    # A user who shares a directory holding their config dir (e.g. their home): the guest writes config.env there.
    plant(ai, {".config/ai-sandbox/config.env": "FC_VCPU=lots\n" + NARROW})
    ai.env["XDG_CONFIG_HOME"] = str(box / ".config")
    try:
        res = ai("start", "--name", "rt-third", "--workspace", str(box), "--detach", "--memory", "1", cwd=tmp_path,
                 check=False)
    finally:
        del ai.env["XDG_CONFIG_HOME"]
    assert res.returncode == 2 and "FC_MEM=1 (from command line)" in res.stderr, res.stderr
    assert "FC_VCPU" not in res.stderr
    assert len(notes_naming(res.stderr.splitlines(), box / ".config" / "ai-sandbox" / "config.env")) == 1
    assert not (Path(ai.state) / "rt-third").exists()
