"""Red team, virtiofs behind sudo: `ai` runs as root for a real unprivileged user who owns the workspace, and guest
root tries to plant in /workspace what would hurt the host: setuid/setgid-root files, device nodes, file
capabilities, files of root or of other users. Each entry of ATTACKS is one attempt; on the host the workspace must
hold nothing but the user's own plain files, and virtiofsd must run as that user with only its ids mapped."""

from __future__ import annotations

import json
import os
import shutil
import stat
import tempfile
from pathlib import Path

import pytest

pytestmark = [pytest.mark.vm, pytest.mark.redteam]

OTHER = 4242  # a uid that is neither root nor the user

# Runs as guest root. The guest user made `victim`, `capped` and the world-writable `open/` first; every attack is
# one try and reports ok or its errno.
ATTACKS = r"""
import errno, json, os, shutil, struct, subprocess, sys
W, OTHER = "/workspace", int(sys.argv[1])
res = {}
def attempt(name, fn):
    try:
        fn()
        res[name] = "ok"
    except OSError as e:
        res[name] = errno.errorcode.get(e.errno, str(e.errno))
    except subprocess.CalledProcessError as e:
        res[name] = f"exit {e.returncode}: {e.stderr.strip()[-200:]}"
def as_uid(uid, path):
    pid = os.fork()
    if pid == 0:
        try:
            os.setgroups([]); os.setresgid(uid, uid, uid); os.setresuid(uid, uid, uid)
            open(path, "w").close()
            os._exit(0)
        except OSError as e:
            os._exit(e.errno)
    code = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
    if code:
        raise OSError(code, os.strerror(code))
def setuid_root_new():
    shutil.copy("/usr/bin/id", f"{W}/suid-new")
    os.chown(f"{W}/suid-new", 0, 0)
    os.chmod(f"{W}/suid-new", 0o4755)
def capability():
    if shutil.which("setcap"):
        subprocess.run(["setcap", "cap_setuid+ep", f"{W}/capped"], check=True, capture_output=True, text=True)
    elif shutil.which("setfattr"):
        subprocess.run(["setfattr", "-n", "security.capability", "-v", "0x0100000280000000000000000000000000000000",
                        f"{W}/capped"], check=True, capture_output=True, text=True)
    else:  # VFS_CAP_REVISION_2 | effective, permitted = CAP_SETUID
        os.setxattr(f"{W}/capped", "security.capability", struct.pack("<5I", 0x02000001, 1 << 7, 0, 0, 0))
attempt("root creates a file", lambda: open(f"{W}/root-made", "w").close())
attempt("root makes a directory", lambda: os.mkdir(f"{W}/root-dir"))
attempt("copy, chown 0:0, chmod 4755", setuid_root_new)
attempt("chown victim to 0", lambda: os.chown(f"{W}/victim", 0, -1))
attempt("chgrp victim to 0", lambda: os.chown(f"{W}/victim", -1, 0))
attempt("chmod victim 6755", lambda: os.chmod(f"{W}/victim", 0o6755))
attempt("chown victim to the user (legit)", lambda: os.chown(f"{W}/victim", os.stat(W).st_uid, os.stat(W).st_gid))
attempt("chown victim to another uid", lambda: os.chown(f"{W}/victim", OTHER, OTHER))
attempt("another uid creates a file", lambda: as_uid(OTHER, f"{W}/open/other-made"))
attempt("mknod block sda 8:0", lambda: os.mknod(f"{W}/sda", 0o666 | 0o060000, os.makedev(8, 0)))
attempt("chmod 666 sda", lambda: os.chmod(f"{W}/sda", 0o666))
attempt("mknod char mem 1:1", lambda: os.mknod(f"{W}/mem", 0o666 | 0o020000, os.makedev(1, 1)))
attempt("security.capability on a copy", capability)
attempt("security.selinux xattr", lambda: os.setxattr(f"{W}/victim", "security.selinux", b"unconfined_u:object_r:x\0"))
print(json.dumps(res))
"""


@pytest.fixture(scope="module")
def ws(sudo_user):
    d = Path(tempfile.mkdtemp(prefix="aisb-rt-vfs-", dir="/var/tmp"))  # the user reaches it (not /tmp/pytest-of-root)
    d.chmod(0o755)
    os.chown(d, sudo_user.pw_uid, sudo_user.pw_gid)
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="module")
def box(ai, sudo_user, ws, minimal_image):
    ai.as_sudo(sudo_user, "start", "--name", "rtvfs", "--workspace", str(ws), "--image", "minimal", "--share",
               "virtiofs", "--detach", "--memory", "768", "--network", "nat", timeout=900)
    yield "rtvfs"
    ai.as_sudo(sudo_user, "rm", "--force", "rtvfs", check=False)


@pytest.fixture(scope="module")
def results(ai, sudo_user, box) -> dict[str, str]:
    ai.as_sudo(sudo_user, "exec", "--name", box, "--", "sh", "-c",
               "cd /workspace && cp /usr/bin/id victim && cp /usr/bin/id capped && mkdir open && chmod 777 open"
               " && chown $(id -u):$(id -g) victim open && cp -a open copied")  # a user's own chowns work
    out = ai.as_sudo(sudo_user, "exec", "--name", box, "--", "sudo", "python3", "-c", ATTACKS, str(OTHER)).stdout
    res = json.loads(out.strip().splitlines()[-1])
    print(json.dumps(res, indent=1))
    return res


def test_virtiofsd_is_the_user_with_only_the_guest_ids(ai, sudo_user, box):
    pid = int(Path(ai.state, box, "virtiofsd.pid").read_text())
    status = Path(f"/proc/{pid}/status").read_text()
    uids = next(ln for ln in status.splitlines() if ln.startswith("Uid:")).split()[1:]
    assert set(uids) == {str(sudo_user.pw_uid)}  # not host root
    uid_map = Path(f"/proc/{pid}/uid_map").read_text().split()
    gid_map = Path(f"/proc/{pid}/gid_map").read_text().split()
    # one line each: the guest user (behind sudo its ids are the user's) is the user, nothing else exists
    assert uid_map == [str(sudo_user.pw_uid), str(sudo_user.pw_uid), "1"]
    assert gid_map == [str(sudo_user.pw_gid), str(sudo_user.pw_gid), "1"]


def test_guest_root_cannot_chown_mknod_or_create_as_another(results):
    assert results, "the attacks did not run"
    for name in ("chown victim to 0", "chgrp victim to 0", "chown victim to another uid", "another uid creates a file",
                 "mknod block sda 8:0", "mknod char mem 1:1", "root creates a file", "root makes a directory",
                 "copy, chown 0:0, chmod 4755", "security.selinux xattr", "security.capability on a copy"):
        assert results[name] != "ok", name
    assert results["chown victim to the user (legit)"] == "ok"  # root still works on the user's files


def test_the_host_workspace_holds_only_the_users_plain_files(sudo_user, ws, results):
    victim = ws / "victim"
    assert victim.exists() and victim.stat().st_uid == sudo_user.pw_uid  # the share works for the guest user
    seen = []
    for root, dirs, files in os.walk(ws):
        for name in dirs + files:
            path = os.path.join(root, name)
            st = os.lstat(path)
            seen.append(name)
            assert (st.st_uid, st.st_gid) == (sudo_user.pw_uid, sudo_user.pw_gid), (path, st.st_uid, st.st_gid)
            assert not (st.st_mode & (stat.S_ISUID | stat.S_ISGID) and 0 in (st.st_uid, st.st_gid)), path
            assert not (stat.S_ISBLK(st.st_mode) or stat.S_ISCHR(st.st_mode)), path
            names = os.listxattr(path, follow_symlinks=False)
            assert not [x for x in names if x.startswith("security.")], (path, names)
    assert {"victim", "capped", "open", "copied"} <= set(seen)
    assert not {"sda", "mem", "root-made", "root-dir", "other-made"} & set(seen)
