"""Issue 10: with `sudo ./ai` (SUDO_UID/SUDO_GID/SUDO_USER set, euid 0), what the guest writes through virtiofs
and sftp belongs on the host to the user behind sudo, who can change and delete it. A real unprivileged user is
made for the test and removed after; one sandbox per share mode."""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest


@pytest.fixture(scope="module")
def user(sudo_user):
    return sudo_user  # conftest's


@pytest.fixture(scope="module")
def ws(user):
    d = Path(tempfile.mkdtemp(prefix="aisb-sudo-", dir="/var/tmp"))  # /tmp/pytest-of-root is root's only
    d.chmod(0o755)
    os.chown(d, user.pw_uid, user.pw_gid)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def as_sudo(ai, user, *args: str) -> subprocess.CompletedProcess[str]:
    return ai.as_sudo(user, *args, timeout=900)


def runuser(user, *argv: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["runuser", "-u", user.pw_name, "--", *argv], cwd=cwd, capture_output=True, text=True)


@pytest.fixture(scope="module", params=["virtiofs", "sftp"])
def sandbox(request, ai, user, ws, minimal_image):
    name = f"sudo-{request.param}"
    t0 = time.monotonic()
    as_sudo(ai, user, "start", "--name", name, "--workspace", str(ws), "--image", "minimal", "--share",
            request.param, "--detach", "--memory", "768", "--network", "nat")
    print(f"{name} boot: {time.monotonic() - t0:.1f}s")
    yield name
    as_sudo(ai, user, "rm", "--force", name)


def test_guest_files_belong_to_the_user_behind_sudo(ai, user, ws, sandbox):
    d = f"out-{sandbox}"
    as_sudo(ai, user, "exec", "--name", sandbox, "--", "sh", "-c",
            f"mkdir /workspace/{d} && echo guest > /workspace/{d}/f && id -u")
    group = pwd.getpwnam(user.pw_name).pw_gid
    for path in (ws / d, ws / d / "f"):
        st = path.stat()
        assert (st.st_uid, st.st_gid) == (user.pw_uid, group), (path, st.st_uid, st.st_gid)
    seen = runuser(user, "stat", "-c", "%U", f"{d}/f", cwd=ws)
    assert seen.stdout.strip() == user.pw_name
    # That user, and not only root, can change and delete what the guest made.
    assert runuser(user, "sh", "-c", f"echo more >> {d}/f && rm -r {d}", cwd=ws).returncode == 0
    assert not (ws / d).exists()


def test_the_sftp_daemon_runs_as_that_user(ai, user, sandbox):
    if not sandbox.endswith("sftp"):
        pytest.skip("only the sftp share has a daemon of its own")
    pid = int(Path(ai.state, sandbox, "share.pid").read_text())
    status = Path(f"/proc/{pid}/status").read_text()
    uids = next(ln for ln in status.splitlines() if ln.startswith("Uid:")).split()[1:]
    assert set(uids) == {str(user.pw_uid)}
