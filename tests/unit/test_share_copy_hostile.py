"""Copy mode against a hostile guest filesystem image (issue 9, hole 1 and the symlink part of hole 7).

Each image is made for real (mke2fs -d, then debugfs -w and byte patches of directory entries, as a guest with root
and debugfs could), then synced back into a workspace that has a canary directory beside it.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import tempfile
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ai_sandbox.share import ext4read, sharing
from ai_sandbox.share.copy import SyncReport, scan
from ai_sandbox.share.ext4read import Refused, check_name, parse_dirents
from ai_sandbox.share.syncback import sync_back
from ai_sandbox.state import Files, Instance

pytestmark = [
    pytest.mark.unit,
    pytest.mark.skipif(not (shutil.which("mke2fs") and shutil.which("debugfs")), reason="needs e2fsprogs"),
]

STAMP = "20250101T000000Z"
NOBODY = 65534


# -- the name checker -----------------------------------------------------------------------------------------------


@given(st.binary(min_size=0, max_size=300))
def test_check_name_accepts_only_single_plain_components(raw: bytes) -> None:
    try:
        name = check_name(raw)
    except Refused:
        assert raw in (b"", b".", b"..") or b"/" in raw or b"\0" in raw or len(raw) > 255
        return
    assert os.fsencode(name) == raw  # exact round trip: what is created is what the guest named
    assert "/" not in name and "\0" not in name and name not in (".", "..")
    assert os.path.basename(name) == name and os.path.normpath(name) == name


@given(st.lists(st.tuples(st.integers(1, 2**32 - 1), st.binary(min_size=1, max_size=255)), max_size=8))
def test_dirent_parser_round_trips_any_names(entries: list[tuple[int, bytes]]) -> None:
    """Any bytes at all in a name (`/`, newline, NUL) come back exactly: no text parsing is involved."""
    block = 4096  # 8 entries of at most 268 bytes fit one block
    data = bytearray()
    for i, (ino, name) in enumerate(entries):
        rec = (8 + len(name) + 3) & ~3
        if i == len(entries) - 1:
            rec = block - len(data)  # the last entry spans to the block's end, as in ext4
        data += ino.to_bytes(4, "little") + rec.to_bytes(2, "little") + bytes([len(name), 1]) + name
        data += bytes(rec - 8 - len(name))
    if not entries:
        data += bytes(4) + block.to_bytes(2, "little") + bytes(block - 6)  # one free entry
    assert parse_dirents(bytes(data), block) == entries


def test_a_corrupt_directory_block_is_refused() -> None:
    with pytest.raises(Refused):
        parse_dirents(b"\x0c\x00\x00\x00\x04\x00\x01\x01x" + bytes(1015), 1024)  # rec_len 4 < 8


# -- crafting a hostile image -----------------------------------------------------------------------------------------


def debugfs_w(image: Path, commands: list[str]) -> None:
    with tempfile.NamedTemporaryFile("w", suffix=".cmds") as fh:
        fh.write("\n".join(commands) + "\n")
        fh.flush()
        subprocess.run(["debugfs", "-w", "-f", fh.name, str(image)], check=True, capture_output=True)


def rename_entries(image: Path, renames: dict[bytes, bytes]) -> None:
    """Patch directory-entry names in place (same length): names debugfs itself refuses to make."""
    data = bytearray(image.read_bytes())
    for old, new in renames.items():
        assert len(old) == len(new) and data.count(old) == 1, old
        at = data.index(old)
        data[at:at + len(old)] = new
    image.write_bytes(bytes(data))


EVIL_UP = b"../../canary/x"
EVIL_SLASH = b"sub/planted.tx"
EVIL_NUL = b"nul\0byte"
TWIN = b"TWIN_AAAAAAAAAAA"


@pytest.fixture
def hostile(tmp_path: Path) -> dict:
    top = tmp_path
    src, ws, canary, state = top / "src", top / "ws", top / "canary", top / "state"
    for d in (src, canary, state):
        d.mkdir()
    (canary / "keep.txt").write_text("canary\n")
    (src / "legit.txt").write_text("legit v1\n")
    (src / "sub").mkdir()
    (src / "hard-a").write_text("linked\n")
    os.link(src / "hard-a", src / "hard-b")
    shutil.copytree(src, ws, symlinks=True)
    start = scan(ws)
    # What the guest leaves behind:
    (src / "legit.txt").write_text("legit v2 from the guest\n")
    (src / "new.txt").write_text("new from the guest\n")
    with (src / "huge-sparse").open("wb") as fh:
        fh.truncate(1 << 30)  # 1 GiB apparent, no data: the image is 32 MiB
    with (src / "small-sparse").open("wb") as fh:
        fh.seek(300_000)
        fh.write(b"end")
    (src / ("Q" * 13 + "1")).write_text("escaped via ../\n")
    (src / ("Q" * 13 + "2")).write_text("planted through a slash\n")
    (src / "nulXbyte").write_text("nul\n")
    (src / "new-hard-a").write_text("new link pair\n")
    os.link(src / "new-hard-a", src / "new-hard-b")
    os.mkfifo(src / "fifo")
    os.symlink(str(canary / "keep.txt"), src / "abs-link")
    os.symlink("../canary/keep.txt", src / "up-link")
    os.symlink("./legit.txt", src / "ok-link")
    os.symlink(str(canary), src / TWIN.decode())  # a link named like the directory below
    (src / "TWIN_BBBBBBBBBBB").mkdir()
    (src / "TWIN_BBBBBBBBBBB" / "through.txt").write_text("written through the link?\n")
    image = state / "workspace.ext4"
    subprocess.run(["mke2fs", "-q", "-F", "-t", "ext4", "-O", "^metadata_csum", "-d", str(src), str(image), "32M"],
                   check=True, capture_output=True)
    debugfs_w(image, ["mknod dev-null c 1 3"])
    rename_entries(image, {b"Q" * 13 + b"1": EVIL_UP, b"Q" * 13 + b"2": EVIL_SLASH, b"nulXbyte": EVIL_NUL,
                           b"TWIN_BBBBBBBBBBB": TWIN})
    if os.geteuid() == 0:
        for p in [ws, *ws.rglob("*")]:
            os.chown(p, NOBODY, NOBODY, follow_symlinks=False)
    return {"ws": ws, "canary": canary, "state": state, "image": image, "start": start, "top": top}


def _tree(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.lstat().st_mode, p.lstat().st_size) for p in sorted(root.rglob("*"))}


def test_a_hostile_image_writes_nothing_outside_and_keeps_the_legitimate_changes(hostile: dict) -> None:
    ws, canary, image = hostile["ws"], hostile["canary"], hostile["image"]
    canary_before = _tree(canary)
    report = sync_back(ws, image, hostile["start"], stamp=STAMP)

    # nothing outside the workspace
    assert _tree(canary) == canary_before and (canary / "keep.txt").read_text() == "canary\n"
    assert sorted(os.listdir(hostile["top"])) == ["canary", "src", "state", "ws"]
    assert sorted(os.listdir(hostile["state"])) == ["workspace.ext4"]  # scratch directory gone
    assert not os.path.lexists(ws / "sub" / "planted.tx")
    # the legitimate changes
    assert (ws / "legit.txt").read_text() == "legit v2 from the guest\n"
    assert (ws / "new.txt").read_text() == "new from the guest\n"
    assert os.readlink(ws / "ok-link") == "./legit.txt"
    # every attack listed by name
    skipped = dict(report.skipped)
    for name in [EVIL_UP, EVIL_SLASH, EVIL_NUL]:
        assert os.fsdecode(name) in skipped, name
    assert "huge-sparse" in skipped and "cap" in skipped["huge-sparse"]
    assert "fifo" in skipped and "dev-null" in skipped
    assert "abs-link" in skipped and "up-link" in skipped
    assert TWIN.decode() in skipped  # one of the two same-named entries
    for name in ("abs-link", "up-link", "huge-sparse", "fifo", "dev-null", "nul"):
        assert not os.path.lexists(ws / name), name
    # the twin: whichever came first, nothing went through a link out of the workspace
    twin = ws / TWIN.decode()
    assert not twin.is_symlink()
    assert not (canary / "through.txt").exists()
    # the summary prints the names escaped, on one line
    assert "\0" not in report.summary() and "\n" not in report.summary()
    nul = SyncReport(skipped=[(os.fsdecode(EVIL_NUL), "why"), ("a\x1b[31m[b]\nc", "why")]).summary()
    assert "nul\\x00byte" in nul and "a\\x1b[31m[b]\\nc" in nul


@pytest.mark.parametrize("name", ["a\\[link=https://evil.example/]click-me", "c\\[bold red]PWNED", "b\\[/]",
                                  "[/]", "x\x1b]8;;https://evil.example/\x1b\\y", "z\x9b31m"])
def test_a_skipped_guest_name_reaches_the_terminal_literally(name: str) -> None:
    # What `ai stop` prints: the summary through the CLI's step printer (rich), as a user's terminal gets it.
    from rich.console import Console

    from ai_sandbox import progress
    from ai_sandbox.cli import ui

    console = Console(record=True, force_terminal=True, width=400)
    old, ui.err = ui.err, console
    printer = ui.show_progress()
    try:
        progress.info(f"workspace synced back: {SyncReport(skipped=[(name, 'fifo')]).summary()}")
    finally:
        progress.unlisten(printer)
        ui.err = old
    shown = console.export_text(styles=False)
    raw = console.export_text(styles=True)
    assert "\x1b]8" not in raw and "\x9b" not in raw  # no hyperlink, no raw CSI from the name
    assert "PWNED" not in name or "\x1b[1;31mPWNED" not in raw
    printable = "".join(c for c in name if c.isprintable())
    assert printable.replace("\x1b", "") in shown.replace("\n", "") or name.startswith(("x", "z"))


def test_hard_links_stay_links_and_sparse_files_stay_sparse(hostile: dict) -> None:
    ws = hostile["ws"]
    sync_back(ws, hostile["image"], hostile["start"], stamp=STAMP)
    a, b = (ws / "new-hard-a").stat(), (ws / "new-hard-b").stat()
    assert (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino) and a.st_nlink == 2
    sparse = (ws / "small-sparse").stat()
    assert sparse.st_size == 300_003 and sparse.st_blocks * 512 < 64 * 1024
    assert (ws / "small-sparse").read_bytes()[-3:] == b"end"


@pytest.mark.skipif(os.geteuid() != 0, reason="ownership: needs root to hand the workspace to another user")
def test_files_belong_to_the_workspace_owner_not_root(hostile: dict) -> None:
    ws = hostile["ws"]
    assert ws.stat().st_uid == NOBODY
    report = sync_back(ws, hostile["image"], hostile["start"], stamp=STAMP)
    assert "new.txt" in report.copied
    for rel in ("new.txt", "legit.txt", "new-hard-a", "ok-link"):
        st_ = (ws / rel).lstat()
        assert (st_.st_uid, st_.st_gid) == (NOBODY, NOBODY), rel


def test_copy_out_keeps_the_image_when_something_was_skipped(hostile: dict) -> None:
    inst = Instance("hostile", root=hostile["state"].parent / "instances")
    inst.dir.mkdir(parents=True)
    shutil.move(hostile["image"], inst.path(Files.WORKSPACE_IMG))
    from ai_sandbox.share.copy import save_manifest

    save_manifest(hostile["start"], inst.path(Files.COPY_MANIFEST))

    class _Spec:
        workspace = str(hostile["ws"])

    report = sharing.copy_out(inst, _Spec())  # type: ignore[arg-type]
    assert report is not None and report.skipped
    kept = [n for n in os.listdir(inst.dir) if n.startswith("workspace-kept-")]
    assert len(kept) == 1 and report.kept == str(inst.dir / kept[0])
    assert f"kept at {inst.dir / kept[0]}" in report.summary()
    assert not inst.path(Files.WORKSPACE_IMG).exists() and not inst.path(Files.COPY_MANIFEST).exists()
    assert (ws_legit := hostile["ws"] / "legit.txt").read_text().startswith("legit v2")
    assert stat.S_ISREG(ws_legit.lstat().st_mode)


def test_a_clean_image_is_deleted_after_copy_out(tmp_path: Path) -> None:
    ws = tmp_path / "ws"
    ws.mkdir()
    (ws / "f").write_text("x\n")
    inst = Instance("clean", root=tmp_path / "instances")
    inst.dir.mkdir(parents=True)
    from ai_sandbox.share.copy import create_image, save_manifest

    save_manifest(create_image(ws, inst.path(Files.WORKSPACE_IMG), 16), inst.path(Files.COPY_MANIFEST))

    class _Spec:
        workspace = str(ws)

    report = sharing.copy_out(inst, _Spec())  # type: ignore[arg-type]
    assert report is not None and report.skipped == [] and report.kept == ""
    assert os.listdir(inst.dir) == []


def test_the_byte_cap_follows_the_used_size(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_bytes(os.urandom(1 << 20))
    image = tmp_path / "img"
    subprocess.run(["mke2fs", "-q", "-F", "-t", "ext4", "-d", str(src), str(image), "64M"], check=True,
                   capture_output=True)
    sb = ext4read.read_super(image)
    assert 1 << 20 < sb.used_bytes < 32 << 20
