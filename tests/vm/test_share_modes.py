"""Issue: the workspace on any VMM (sftp, reverse sshfs) and as the seed did (copy), exercised on QEMU."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

SECRET = "host-secret-outside-the-workspace"


@pytest.fixture(scope="module")
def layout(tmp_path_factory):
    top = tmp_path_factory.mktemp("share")
    ws, outside = top / "ws", top / "outside"
    ws.mkdir()
    outside.mkdir()
    (outside / "secret.txt").write_text(SECRET + "\n")
    (ws / "FILE").write_text("from the host\n")
    (ws / "sub").mkdir()
    os.symlink(str(outside / "secret.txt"), ws / "abs-link")  # host symlinks pointing out of the workspace
    os.symlink("../outside/secret.txt", ws / "rel-link")
    return ws, outside


def _outside_state(outside) -> dict[str, str]:
    return {str(p.relative_to(outside)): p.read_text() for p in sorted(outside.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def sftp(ai, layout, minimal_image):
    ws, _ = layout
    ai("start", "--name", "sftp", "--workspace", str(ws), "--image", "minimal", "--share", "sftp", "--detach",
       "--memory", "1024")
    yield "sftp"
    ai("rm", "--force", "sftp", check=False)


def test_sftp_round_trip_and_ownership(ai, sftp, layout):
    ws, _ = layout
    assert ai("exec", "--name", sftp, "--", "cat", "/workspace/FILE").stdout == "from the host\n"
    ai("exec", "--name", sftp, "--", "sh", "-c", "mkdir -p /workspace/sub/deep && echo guest > /workspace/sub/deep/g")
    assert (ws / "sub/deep/g").read_text() == "guest\n"
    assert (ws / "sub/deep/g").stat().st_uid == os.getuid()
    (ws / "later.txt").write_text("live\n")
    assert ai("exec", "--name", sftp, "--", "cat", "/workspace/later.txt").stdout == "live\n"
    assert ai("exec", "--name", sftp, "--", "stat", "-c", "%U", "/workspace/FILE").stdout.strip() == "sandbox"


KILL_SSHFS = ("import os,sys,signal\n"
              "pid=next(int(p) for p in os.listdir('/proc') if p.isdigit() and open(f'/proc/{p}/comm').read()=='sshfs\\n')\n"
              "if sys.argv[1]=='parent': pid=int(open(f'/proc/{pid}/stat').read().rsplit(')',1)[1].split()[1])\n"
              "os.kill(pid, signal.SIGKILL)\n")


def test_sftp_remounts_after_sshfs_or_the_connection_dies(ai, sftp):
    log = Path(ai.state, sftp, "share.log")
    # `sshfs`: the guest's sshfs dies; `parent`: its sshd session, i.e. the daemon's whole SSH connection drops.
    for victim in ("sshfs", "parent"):
        before = log.read_text().count("re-mounted")
        ai("exec", "--name", sftp, "--", "sudo", "python3", "-c", KILL_SSHFS, victim)
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and log.read_text().count("re-mounted") == before:
            time.sleep(0.5)
        assert log.read_text().count("re-mounted") == before + 1, log.read_text()[-2000:]
        res = ai("exec", "--name", sftp, "--", "cat", "/workspace/FILE", check=False)
        assert res.stdout == "from the host\n", (victim, res.stderr)


ESCAPES = [
    "cat /workspace/abs-link",
    "cat /workspace/rel-link",
    "cat /workspace/../outside/secret.txt",
    "cat /workspace/sub/../../outside/secret.txt",
    "ln -s /etc/passwd /workspace/new-abs-link && cat /workspace/new-abs-link",
    "ln -s ../../outside/secret.txt /workspace/new-rel-link && cat /workspace/new-rel-link",
    "ln -s ../../../../../../ /workspace/up && ls /workspace/up/outside",
    "cd /workspace/sub && ln -s ../../outside out && cat out/secret.txt",
    "ln /workspace/abs-link /workspace/hard-of-link && cat /workspace/hard-of-link",
    "ln /etc/hostname /workspace/hard-cross",
    "mv /workspace/rel-link /workspace/sub/rel-link && cat /workspace/sub/rel-link",
    "mv /workspace/abs-link /workspace/sub/ && cat /workspace/sub/abs-link",
    "echo x > /workspace/abs-link",
    "echo x >> /workspace/rel-link",
    "truncate -s 0 /workspace/abs-link",
    "chmod 777 /workspace/abs-link && cat /workspace/abs-link",
    "cp /workspace/rel-link /tmp/x && cat /tmp/x",
    "python3 -c \"print(open('/workspace/abs-link').read())\"",
    "python3 -c \"import os; print(os.listdir(os.path.realpath('/workspace/rel-link') + '/..'))\"",
    "sudo cat /workspace/abs-link",
    "tar -C /workspace -chf - abs-link rel-link | tar -xOf -",
    "find -L /workspace -name secret.txt -exec cat {} \\;",
]


@pytest.mark.redteam
def test_sftp_escapes_all_fail(ai, sftp, layout):
    ws, outside = layout
    before = _outside_state(outside)
    assert len(ESCAPES) >= 20
    leaked = []
    for cmd in ESCAPES:
        res = ai("exec", "--name", sftp, "--", "sh", "-c", cmd, check=False, timeout=60)
        if SECRET in res.stdout or SECRET in res.stderr:
            leaked.append(cmd)
    assert leaked == []
    assert _outside_state(outside) == before  # nothing outside the workspace changed
    assert sorted(p.name for p in outside.iterdir()) == ["secret.txt"]
    for name in ("new-abs-link", "new-rel-link", "up", "hard-cross"):
        target = ws / name
        assert not (target.is_symlink() and not os.path.realpath(target).startswith(str(ws))), name


def test_copy_mode_merges_without_losing_either_side(ai, minimal_image, tmp_path):
    ws, outside = tmp_path / "ws", tmp_path / "outside"
    ws.mkdir()
    outside.mkdir()
    (outside / "untouched").write_text("outside\n")
    (ws / "both.txt").write_text("original\n")
    (ws / "host-deletes.txt").write_text("doomed\n")
    (ws / "guest-deletes.txt").write_text("bye\n")
    ai("start", "--name", "copy", "--workspace", str(ws), "--image", "minimal", "--share", "copy", "--detach",
       "--memory", "1024")
    try:
        ai("exec", "--name", "copy", "--", "sh", "-c",
           "echo guest > /workspace/both.txt && echo new > /workspace/new.txt && rm /workspace/guest-deletes.txt")
        (ws / "both.txt").write_text("host\n")
        (ws / "host-deletes.txt").unlink()
        res = ai("stop", "copy")
        assert "conflict" in res.stderr
    finally:
        ai("rm", "--force", "copy", check=False)
    assert (ws / "both.txt").read_text() == "host\n"
    guest_copies = list(ws.glob("both.txt.guest-conflict-*"))
    assert len(guest_copies) == 1 and guest_copies[0].read_text() == "guest\n"
    assert not (ws / "host-deletes.txt").exists()  # not brought back
    assert (ws / "new.txt").read_text() == "new\n"
    assert not (ws / "guest-deletes.txt").exists()
    assert [p.name for p in outside.iterdir()] == ["untouched"] and (outside / "untouched").read_text() == "outside\n"
