"""Red team, workspace surface, copy mode: guest root crafts a hostile ext4 workspace with debugfs, then `ai stop`.

Each entry of ATTEMPTS is one attack; on the host every one must fail while the legitimate edits merge.
"""

from __future__ import annotations

import base64
import os
import shutil

import pytest

pytestmark = [pytest.mark.vm, pytest.mark.redteam]

NOBODY = 65534
TWIN_LINK, TWIN_DIR = "TWIN_AAAAAAAAAAA", "TWIN_BBBBBBBBBBB"

# Runs as root in the guest: plant the entries, unmount, then edit the filesystem the way only debugfs can.
CRAFT = r"""
import os, subprocess, sys
canary = sys.argv[1]
w = "/workspace"
open(f"{w}/legit.txt", "w").write("legit v2 from the guest\n")
open(f"{w}/new.txt", "w").write("new from the guest\n")
with open(f"{w}/huge-sparse", "wb") as fh:
    fh.truncate(1 << 30)
for name, text in [("Q" * 13 + "1", "dotdot\n"), ("Q" * 13 + "2", "slash\n"), ("nulXbyte", "nul\n"),
                   ("new-hard-a", "pair\n")]:
    open(f"{w}/{name}", "w").write(text)
os.link(f"{w}/new-hard-a", f"{w}/new-hard-b")
os.mkfifo(f"{w}/fifo")
os.symlink(f"{canary}/keep.txt", f"{w}/abs-link")
os.symlink("../canary/keep.txt", f"{w}/up-link")
os.symlink(".", f"{w}/dot")
os.symlink("dot/../canary/keep.txt", f"{w}/chain-link")
os.symlink("./legit.txt", f"{w}/ok-link")
os.symlink(canary, f"{w}/TWIN_AAAAAAAAAAA")
os.mkdir(f"{w}/TWIN_BBBBBBBBBBB")
open(f"{w}/TWIN_BBBBBBBBBBB/through.txt", "w").write("through\n")
os.mkdir(f"{w}/loopdir")
dev = subprocess.run(["findmnt", "-n", "-o", "SOURCE", w], capture_output=True, text=True, check=True).stdout.strip()
os.sync()
subprocess.run(["umount", w], check=True)
subprocess.run(["e2fsck", "-fy", dev], capture_output=True)  # tune2fs wants a freshly checked filesystem
r = subprocess.run(["tune2fs", "-O", "^metadata_csum", dev], capture_output=True, text=True)
if r.returncode:
    sys.exit(f"tune2fs: {r.stdout} {r.stderr}")
subprocess.run(["debugfs", "-w", "-R", "mknod dev-null c 1 3", dev], check=True, capture_output=True)
subprocess.run(["debugfs", "-w", "-R", "ln /loopdir /loopdir/again", dev], check=True, capture_output=True)
out = subprocess.run(["debugfs", "-R", "blocks /", dev], capture_output=True, text=True, check=True).stdout.split()
sb = open(dev, "rb").read(2048)[1024:]
bs = 1024 << int.from_bytes(sb[24:28], "little")
renames = {b"Q" * 13 + b"1": b"../../canary/x", b"Q" * 13 + b"2": b"sub/planted.tx", b"nulXbyte": b"nul\0byte",
           b"TWIN_BBBBBBBBBBB": b"TWIN_AAAAAAAAAAA"}
done = set()
with open(dev, "r+b") as fh:
    for block in map(int, out):
        fh.seek(block * bs)
        data = bytearray(fh.read(bs))
        for old, new in renames.items():
            if old in data:
                data[data.index(old):data.index(old) + len(old)] = new
                done.add(old)
        fh.seek(block * bs)
        fh.write(bytes(data))
os.sync()
print("renamed", len(done), "of", len(renames))
"""

ATTEMPTS = [
    ("dirent name ../../canary/x", "write beside the workspace through a traversal name"),
    ("dirent name sub/planted.tx", "write into a subdirectory through a name with '/'"),
    ("dirent name with NUL", "truncate a name on the host"),
    ("absolute symlink to the canary", "leave a link the host follows out of the workspace"),
    ("relative ../ symlink", "the same with a relative target"),
    ("chain: dot -> . then dot/../canary", "escape through a link that is lexically inside"),
    ("symlink and directory with the same name", "make the host write a directory's files through the link"),
    ("1 GiB sparse file in a 64 MiB image", "fill the host disk"),
    ("hard link pair", "turn links into separate copies"),
    ("fifo", "block or confuse the host reader"),
    ("character device node (1,3)", "create a device node on the host"),
    ("directory linked into itself", "make the host reader loop"),
    ("skipped entries plus a stop", "have the host delete the image and lose the guest's data"),
    ("files written as root", "leave root-owned files in the user's workspace"),
]


@pytest.fixture(scope="module")
def attacked(ai, minimal_image, tmp_path_factory):
    top = tmp_path_factory.mktemp("redteam-copy")
    os.chmod(top, 0o755)
    ws, canary = top / "ws", top / "canary"
    ws.mkdir()
    canary.mkdir()
    (canary / "keep.txt").write_text("canary\n")
    (ws / "legit.txt").write_text("legit v1\n")
    (ws / "sub").mkdir()
    for p in (ws, ws / "legit.txt", ws / "sub"):
        os.chown(p, NOBODY, NOBODY)
    os.environ["FC_WORKSPACE_SIZE"] = "64"
    try:
        ai("start", "--name", "rtcopy", "--workspace", str(ws), "--image", "minimal", "--share", "copy", "--detach",
           "--memory", "1024")
    finally:
        del os.environ["FC_WORKSPACE_SIZE"]
    try:
        script = base64.b64encode(CRAFT.encode()).decode()
        # `ai exec` starts in /workspace: leave it before sudo, or the unmount finds the mount busy.
        res = ai("exec", "--name", "rtcopy", "--", "sh", "-c",
                 f"cd / && echo {script} | base64 -d > /tmp/craft.py && exec sudo python3 /tmp/craft.py {canary}",
                 check=False, timeout=300)
        stop = ai("stop", "rtcopy", check=False, timeout=900)
    finally:
        state = ai.state / "rtcopy"
        kept = sorted(p.name for p in state.glob("workspace-kept-*")) if state.exists() else []
        ai("rm", "--force", "rtcopy", check=False)
    yield {"ws": ws, "canary": canary, "top": top, "craft": res, "stop": stop, "kept": kept}
    shutil.rmtree(top, ignore_errors=True)


def test_the_guest_crafted_every_entry(attacked):
    assert attacked["craft"].returncode == 0, attacked["craft"].stderr[-2000:]
    assert "renamed 4 of 4" in attacked["craft"].stdout


def test_every_attack_failed_and_the_legitimate_edits_merged(attacked):
    ws, canary, stop = attacked["ws"], attacked["canary"], attacked["stop"]
    assert stop.returncode == 0, stop.stderr[-3000:]
    assert sorted(os.listdir(canary)) == ["keep.txt"] and (canary / "keep.txt").read_text() == "canary\n"
    assert sorted(os.listdir(attacked["top"])) == ["canary", "ws"]
    assert not os.path.lexists(ws / "sub" / "planted.tx")
    for name in ("abs-link", "up-link", "chain-link", "huge-sparse", "fifo", "dev-null"):
        assert not os.path.lexists(ws / name), name
    assert not (ws / TWIN_LINK).is_symlink() and not (canary / "through.txt").exists()
    for path in ws.rglob("*"):
        if path.is_symlink():
            real = os.path.realpath(path)
            assert real == str(ws) or real.startswith(str(ws) + "/"), path  # `dot -> .` is the workspace itself
    a, b = (ws / "new-hard-a").stat(), (ws / "new-hard-b").stat()
    assert a.st_ino == b.st_ino
    assert (ws / "legit.txt").read_text() == "legit v2 from the guest\n"
    assert (ws / "new.txt").read_text() == "new from the guest\n"
    for rel in ("legit.txt", "new.txt", "new-hard-a", "ok-link"):
        assert (ws / rel).lstat().st_uid == NOBODY, rel
    assert "skipped" in stop.stderr and "kept at" in stop.stderr
    assert len(attacked["kept"]) == 1
    assert len(ATTEMPTS) == 14
