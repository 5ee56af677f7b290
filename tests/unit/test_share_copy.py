"""Workspace mode `copy`: the three-way sync plan, applying it safely, the real mkfs.ext4 -d / debugfs round trip."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ai_sandbox.errors import SandboxError
from ai_sandbox.share.copy import (
    CONFLICT_TAG,
    Action,
    Entry,
    Manifest,
    apply_sync,
    create_image,
    link_stays_inside,
    load_manifest,
    plan_sync,
    save_manifest,
    scan,
)
from ai_sandbox.share.syncback import sync_back

pytestmark = pytest.mark.unit

STAMP = "20250101T000000Z"
F1, F2, F3 = Entry("file", 1, 1, "one"), Entry("file", 1, 2, "two"), Entry("file", 1, 3, "three")
L1 = Entry("link", 2, 1, "link-one")
D = Entry("dir")


def plan(start: Manifest, host: Manifest, guest: Manifest) -> list[tuple[str, str, str, str]]:
    return [(a.op, a.path, a.kind, a.dest) for a in plan_sync(start, host, guest, stamp=STAMP)]


def conflict(path: str) -> str:
    return f"{path}{CONFLICT_TAG}{STAMP}"


# -- the plan, rule by rule -----------------------------------------------------------------------------------------


def test_unchanged_everywhere_means_nothing_to_do() -> None:
    m = {"a": D, "a/f": F1, "l": L1}
    assert plan(m, m, m) == []


def test_changed_only_in_guest_is_written_to_the_host() -> None:
    assert plan({"f": F1}, {"f": F1}, {"f": F2}) == [("copy", "f", "file", "f")]
    assert plan_sync({"f": F1}, {"f": F1}, {"f": F2}, stamp=STAMP)[0].expect == F1  # checked again at apply time


def test_changed_only_on_host_keeps_the_host_version() -> None:
    assert plan({"f": F1}, {"f": F2}, {"f": F1}) == []


def test_changed_on_both_differently_is_a_conflict_copy() -> None:
    assert plan({"f": F1}, {"f": F2}, {"f": F3}) == [("conflict", "f", "file", conflict("f"))]


def test_changed_on_both_the_same_way_is_nothing() -> None:
    assert plan({"f": F1}, {"f": F2}, {"f": F2}) == []


def test_deleted_in_guest_and_unchanged_on_host_is_deleted() -> None:
    assert plan({"f": F1}, {"f": F1}, {}) == [("delete", "f", "file", "f")]


def test_deleted_in_guest_but_changed_on_host_keeps_the_host_version() -> None:
    assert plan({"f": F1}, {"f": F2}, {}) == []


def test_deleted_on_host_is_not_brought_back_when_the_guest_left_it_alone() -> None:
    assert plan({"f": F1}, {}, {"f": F1}) == []


def test_deleted_on_host_but_changed_in_guest_is_a_conflict_copy() -> None:
    assert plan({"f": F1}, {}, {"f": F2}) == [("conflict", "f", "file", conflict("f"))]


def test_new_in_guest_is_created_on_the_host() -> None:
    assert plan({}, {}, {"d": D, "d/f": F1, "l": L1}) == [
        ("copy", "d", "dir", "d"),
        ("copy", "d/f", "file", "d/f"),
        ("copy", "l", "link", "l"),
    ]


def test_new_on_both_with_different_content_is_a_conflict() -> None:
    assert plan({}, {"f": F1}, {"f": F2}) == [("conflict", "f", "file", conflict("f"))]


def test_guest_replacing_a_file_by_a_directory_deletes_then_creates() -> None:
    assert plan({"p": F1}, {"p": F1}, {"p": D, "p/f": F2}) == [
        ("delete", "p", "file", "p"),
        ("copy", "p", "dir", "p"),
        ("copy", "p/f", "file", "p/f"),
    ]


def test_a_conflicting_guest_directory_moves_whole_beside_the_host_file() -> None:
    assert plan({}, {"p": F1}, {"p": D, "p/f": F2, "p/s": D, "p/s/g": F3}) == [
        ("conflict", "p", "dir", conflict("p")),
        ("conflict", "p/f", "file", conflict("p") + "/f"),
        ("conflict", "p/s", "dir", conflict("p") + "/s"),
        ("conflict", "p/s/g", "file", conflict("p") + "/s/g"),
    ]


def test_guest_additions_under_a_directory_the_host_replaced_go_beside_it() -> None:
    start = {"d": D, "d/old": F1}
    assert plan(start, {"d": F2}, {"d": D, "d/old": F1, "d/new": F3}) == [
        ("conflict", "d", "dir", conflict("d")),
        ("conflict", "d/new", "file", conflict("d") + "/new"),
    ]


def test_conflict_names_never_collide() -> None:
    taken = conflict("f")
    result = plan({"f": F1}, {"f": F2, taken: F1}, {"f": F3})
    assert result == [("conflict", "f", "file", taken + "-2")]


# -- the plan, as properties over random small trees (applied for real on disk) ------------------------------------

PATHS = ["a", "a/x", "a/x/deep", "a/y", "b", "b/x", "c"]
TOKENS = [None, ("file", "A"), ("file", "B"), ("file", "A+x"), ("link", "A"), ("link", "B"), ("dir", "")]
Spec = dict[str, tuple[str, str]]


def _normalized(spec: dict[str, tuple[str, str] | None]) -> Spec:
    """Drop entries whose parent is not a directory, so the spec is a real tree."""
    tree: Spec = {}
    for path in sorted(spec):
        parent = path.rpartition("/")[0]
        if spec[path] is not None and (not parent or tree.get(parent, ("", ""))[0] == "dir"):
            tree[path] = spec[path]  # type: ignore[assignment]
    return tree


@st.composite
def three_trees(draw: st.DrawFn) -> tuple[Spec, Spec, Spec]:
    start = {p: draw(st.sampled_from(TOKENS)) for p in PATHS}
    # Mostly unchanged, so every rule gets exercised, not just "everything differs".
    host = {p: draw(st.sampled_from([start[p]] * 3 + TOKENS)) for p in PATHS}
    guest = {p: draw(st.sampled_from([start[p]] * 3 + TOKENS)) for p in PATHS}
    return _normalized(start), _normalized(host), _normalized(guest)


def build(root: Path, spec: Spec) -> None:
    root.mkdir()
    for path, (kind, token) in sorted(spec.items()):
        target = root / path
        if kind == "dir":
            target.mkdir()
        elif kind == "file":
            target.write_text(token.removesuffix("+x"))
            os.chmod(target, 0o755 if token.endswith("+x") else 0o644)
        else:
            target.symlink_to(f"t{token}")  # relative, stays inside


def base_path(path: str) -> str:
    """The original path of a conflict copy (or of anything inside a conflict directory)."""
    return "/".join(re.sub(rf"{re.escape(CONFLICT_TAG)}{STAMP}(-\d+)?$", "", part) for part in path.split("/"))


def _ancestors(path: str) -> list[str]:
    parts = path.split("/")
    return ["/".join(parts[:i]) for i in range(1, len(parts))]


def _non_dir_host_ancestor(path: str, host: Manifest) -> bool:
    return any(host.get(q) not in (None, D) for q in _ancestors(path))


def _conflicts(path: str, start: Manifest, host: Manifest, guest: Manifest) -> bool:
    s, h, g = start.get(path), host.get(path), guest.get(path)
    return g is not None and not (_same(s, g) or _same(h, g) or _same(s, h))


@settings(max_examples=300, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(three_trees())
def test_sync_properties_on_real_trees(trees: tuple[Spec, Spec, Spec]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        top = Path(tmp)
        for name, spec in zip(("start", "host", "guest"), trees, strict=True):
            build(top / name, spec)
        start = scan(top / "start")
        host = scan(top / "host", previous=start)
        guest = scan(top / "guest")
        guest_before = snapshot(top / "guest")
        report = apply_sync(plan_sync(start, host, guest, stamp=STAMP), top / "host", top / "guest", stamp=STAMP)
        result = scan(top / "host")

        assert report.skipped == []
        assert snapshot(top / "guest") == guest_before  # the source is only read
        assert sorted(os.listdir(top)) == ["guest", "host", "start"]  # nothing created beside the workspace
        assert not [p for p in result if ".aisbx-" in p]  # no temp file left
        for path in set(start) | set(host) | set(guest):
            s, h, g = start.get(path), host.get(path), guest.get(path)
            if h is not None and not h.same(s):
                assert h.same(result.get(path)), f"host change to {path} lost"
            if g is not None and not g.same(s):
                homes = [k for k in result if base_path(k) == path and g.same(result[k])]
                assert homes, f"guest change to {path} lost"
            if s is not None and s.kind != "dir" and h is None and g is not None and g.same(s):
                assert path not in result, f"{path} deleted on the host came back"
            guest_only = (s is None and h is None) or (s is not None and s.same(h))
            lands_in_place = (
                (h is None or h.kind != "dir")
                and not _non_dir_host_ancestor(path, host)
                and not any(_conflicts(q, start, host, guest) for q in _ancestors(path))
            )
            if guest_only and lands_in_place and not _same(g, s):
                assert _same(result.get(path), g), f"guest-only change to {path} not applied"
        for path in result:
            assert base_path(path) in set(host) | set(guest), f"{path} came from nowhere"


def _same(a: Entry | None, b: Entry | None) -> bool:
    return (a is None and b is None) or (a is not None and a.same(b))


def snapshot(top: Path) -> dict[str, tuple]:
    out = {}
    for dirpath, dirnames, filenames in os.walk(top):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            stat = p.lstat()
            out[str(p.relative_to(top))] = (stat.st_mode, stat.st_size, stat.st_mtime_ns)
    return out


# -- applying safely -------------------------------------------------------------------------------------------------


@pytest.fixture
def trio(tmp_path: Path) -> tuple[Path, Path, Path]:
    host, guest, outside = tmp_path / "host", tmp_path / "guest", tmp_path / "outside"
    for d in (host, guest, outside):
        d.mkdir()
    (outside / "keep.txt").write_text("outside\n")
    return host, guest, outside


def test_apply_refuses_guest_symlinks_that_leave_the_workspace(trio: tuple[Path, Path, Path]) -> None:
    host, guest, _ = trio
    (guest / "abs").symlink_to("/etc/passwd")
    (guest / "up").symlink_to("../outside/keep.txt")
    (guest / "via").symlink_to("sub/../x")  # `sub` could be a link to `.`: then `..` climbs out
    (guest / "fine").symlink_to("./sub/x")
    report = apply_sync(plan_sync({}, {}, scan(guest), stamp=STAMP), host, guest)
    assert sorted(p for p, _ in report.skipped) == ["abs", "up", "via"]
    assert report.copied == ["fine"]
    assert sorted(os.listdir(host)) == ["fine"]


@pytest.mark.parametrize(
    ("target", "depth", "inside"),
    [("x", 0, True), ("./a/b", 0, True), ("../x", 1, True), ("../../x", 1, False), ("/etc", 3, False),
     ("a/../b", 2, False), ("../a/../b", 2, False), ("", 0, False), ("..", 0, False), ("..", 1, True)],
)
def test_link_target_rule(target: str, depth: int, inside: bool) -> None:
    assert link_stays_inside(target, depth) is inside


def test_apply_never_writes_through_a_host_symlink(trio: tuple[Path, Path, Path]) -> None:
    host, guest, outside = trio
    (host / "d").symlink_to(outside)
    (host / "f").symlink_to(outside / "keep.txt")
    start = scan(host)
    (guest / "d").mkdir()
    (guest / "d" / "new.txt").write_text("guest\n")
    (guest / "f").write_text("guest replaced the link\n")
    report = apply_sync(plan_sync(start, scan(host, previous=start), scan(guest), stamp=STAMP), host, guest)
    assert (outside / "keep.txt").read_text() == "outside\n"
    assert sorted(os.listdir(outside)) == ["keep.txt"]
    assert (host / "d").is_dir() and not (host / "d").is_symlink()  # the link itself was replaced
    assert (host / "d" / "new.txt").read_text() == "guest\n"
    assert (host / "f").read_text() == "guest replaced the link\n" and not (host / "f").is_symlink()
    assert report.skipped == []


def test_apply_refuses_actions_with_unsafe_paths(trio: tuple[Path, Path, Path]) -> None:
    host, guest, outside = trio
    (guest / "x").write_text("x")
    bad = [
        Action("copy", "x", "file", "../outside/x"),
        Action("copy", "x", "file", "/tmp/x"),
        Action("copy", "../outside/keep.txt", "file", "stolen"),
        Action("delete", "x", "file", "../outside/keep.txt", Entry("file")),
    ]
    report = apply_sync(bad, host, guest)
    assert len(report.skipped) == 4
    assert os.listdir(host) == [] and sorted(os.listdir(outside)) == ["keep.txt"]


def test_a_host_edit_after_planning_turns_a_copy_into_a_conflict(trio: tuple[Path, Path, Path]) -> None:
    host, guest, _ = trio
    (host / "f").write_text("start\n")
    start = scan(host)
    (guest / "f").write_text("guest\n")
    actions = plan_sync(start, scan(host, previous=start), scan(guest), stamp=STAMP)
    (host / "f").write_text("host, while syncing\n")
    report = apply_sync(actions, host, guest)
    assert (host / "f").read_text() == "host, while syncing\n"
    [(path, dest)] = report.conflicts
    assert path == "f" and (host / dest).read_text() == "guest\n"


def test_a_host_edit_after_planning_cancels_a_delete(trio: tuple[Path, Path, Path]) -> None:
    host, guest, _ = trio
    (host / "f").write_text("start\n")
    start = scan(host)
    actions = plan_sync(start, scan(host, previous=start), scan(guest), stamp=STAMP)
    assert [a.op for a in actions] == ["delete"]
    (host / "f").write_text("host, while syncing\n")
    assert apply_sync(actions, host, guest).deleted == []
    assert (host / "f").read_text() == "host, while syncing\n"


def test_deleting_a_directory_keeps_files_the_host_added(trio: tuple[Path, Path, Path]) -> None:
    host, guest, _ = trio
    (host / "d").mkdir()
    (host / "d" / "old").write_text("old")
    start = scan(host)
    (host / "d" / "host-new").write_text("mine")
    report = apply_sync(plan_sync(start, scan(host, previous=start), scan(guest), stamp=STAMP), host, guest)
    assert sorted(os.listdir(host / "d")) == ["host-new"]
    assert report.deleted == ["d/old"]


def test_a_mode_change_in_the_guest_is_synced(trio: tuple[Path, Path, Path]) -> None:
    host, guest, _ = trio
    (host / "run.sh").write_text("#!/bin/sh\n")
    os.chmod(host / "run.sh", 0o644)
    start = scan(host)
    shutil.copy2(host / "run.sh", guest / "run.sh")
    os.chmod(guest / "run.sh", 0o755)
    report = apply_sync(plan_sync(start, scan(host, previous=start), scan(guest), stamp=STAMP), host, guest)
    assert report.copied == ["run.sh"] and (host / "run.sh").stat().st_mode & 0o777 == 0o755


def test_set_id_bits_from_the_guest_are_dropped(trio: tuple[Path, Path, Path]) -> None:
    host, guest, _ = trio
    (guest / "tool").write_text("#!/bin/sh\n")
    os.chmod(guest / "tool", 0o6755)
    apply_sync(plan_sync({}, {}, scan(guest), stamp=STAMP), host, guest)
    assert (host / "tool").stat().st_mode & 0o7777 == 0o755


# -- manifests ------------------------------------------------------------------------------------------------------


def test_scan_records_files_links_dirs_and_skips_special_files(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "f").write_text("hello")
    (tmp_path / "l").symlink_to("d")
    os.mkfifo(tmp_path / "fifo")
    m = scan(tmp_path)
    assert sorted(m) == ["d", "d/f", "l"]
    assert m["d"].kind == "dir" and m["l"].kind == "link" and m["d/f"].size == 5
    assert m["d/f"].digest == "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"


def test_scan_reuses_a_recorded_hash_when_size_and_mtime_match(tmp_path: Path) -> None:
    (tmp_path / "f").write_text("x")
    first = scan(tmp_path)
    recorded = {"f": Entry("file", first["f"].size, first["f"].mtime_ns, "recorded")}
    assert scan(tmp_path, previous=recorded)["f"].digest == "recorded"
    os.utime(tmp_path / "f", ns=(1, 1))
    assert scan(tmp_path, previous=recorded)["f"].digest == first["f"].digest


def test_manifest_round_trips_through_json(tmp_path: Path) -> None:
    m = {"a": D, "a/f": F1, "l": L1, "caf\u00e9": F2}
    save_manifest(m, tmp_path / "manifest.json")
    assert load_manifest(tmp_path / "manifest.json") == m


# -- the real image: mkfs.ext4 -d in, debugfs rdump out ----------------------------------------------------------

needs_e2fsprogs = pytest.mark.skipif(
    not (shutil.which("mkfs.ext4") and shutil.which("debugfs")), reason="needs mkfs.ext4 and debugfs (e2fsprogs)"
)


def debugfs_write(image: Path, commands: list[str]) -> None:
    """Change the image the way a guest would, without mounting it."""
    with tempfile.NamedTemporaryFile("w", suffix=".cmds") as fh:
        fh.write("\n".join(commands) + "\n")
        fh.flush()
        subprocess.run(["debugfs", "-w", "-f", fh.name, str(image)], check=True, capture_output=True)


@needs_e2fsprogs
def test_image_round_trip_and_three_way_sync(tmp_path: Path) -> None:
    ws, state = tmp_path / "work space", tmp_path / "state dir"
    (ws / "src").mkdir(parents=True)
    state.mkdir()
    files = {
        "guest-edits.txt": "v1\n",
        "host-edits.txt": "v1\n",
        "both-edit.txt": "v1\n",
        "guest-deletes.txt": "v1\n",
        "host-deletes.txt": "v1\n",
        "src/untouched.py": "print('hi')\n",
    }
    for rel, text in files.items():
        (ws / rel).write_text(text)
    (ws / "link").symlink_to("src/untouched.py")
    image = state / "workspace.ext4"
    start = create_image(ws, image, 16)
    assert image.stat().st_size == 16 * 1024 * 1024
    assert "lost+found" not in start and "link" in start

    local = tmp_path / "local"
    local.mkdir()
    (local / "guest").write_text("v2 from the guest\n")
    debugfs_write(
        image,
        [
            "rm /guest-edits.txt",
            f"write {local / 'guest'} /guest-edits.txt",
            "rm /both-edit.txt",
            f"write {local / 'guest'} /both-edit.txt",
            "rm /guest-deletes.txt",
            "mkdir /new-dir",
            f"write {local / 'guest'} /new-dir/new.txt",
            "symlink /escape /etc/passwd",
        ],
    )
    (ws / "host-edits.txt").write_text("v2 from the host\n")
    (ws / "both-edit.txt").write_text("v2 from the host\n")
    (ws / "host-deletes.txt").unlink()

    report = sync_back(ws, image, start, stamp=STAMP)

    assert (ws / "guest-edits.txt").read_text() == "v2 from the guest\n"
    assert (ws / "host-edits.txt").read_text() == "v2 from the host\n"
    assert (ws / "both-edit.txt").read_text() == "v2 from the host\n"
    assert (ws / conflict("both-edit.txt")).read_text() == "v2 from the guest\n"
    assert not (ws / "guest-deletes.txt").exists()
    assert not (ws / "host-deletes.txt").exists()
    assert (ws / "new-dir" / "new.txt").read_text() == "v2 from the guest\n"
    assert os.readlink(ws / "link") == "src/untouched.py"
    assert not os.path.lexists(ws / "escape") and not (ws / "lost+found").exists()
    assert sorted(report.copied) == ["guest-edits.txt", "new-dir", "new-dir/new.txt"]
    assert report.deleted == ["guest-deletes.txt"]
    assert report.conflicts == [("both-edit.txt", conflict("both-edit.txt"))]
    assert [p for p, _ in report.skipped] == ["escape"]
    assert report.summary() == "3 copied, 1 deleted, 1 conflicts, 1 skipped (escape)"
    assert sorted(os.listdir(state)) == ["workspace.ext4"]  # the extraction directory is gone


@needs_e2fsprogs
def test_create_image_that_is_too_small_says_what_to_do(tmp_path: Path) -> None:
    (tmp_path / "ws").mkdir()
    (tmp_path / "ws" / "big").write_bytes(os.urandom(3 * 1024 * 1024))
    with pytest.raises(SandboxError) as info:
        create_image(tmp_path / "ws", tmp_path / "img", 2)
    assert "FC_WORKSPACE_SIZE" in (info.value.hint or "")
    assert not (tmp_path / "img").exists()


@needs_e2fsprogs
def test_an_unreadable_image_changes_nothing(tmp_path: Path) -> None:
    (tmp_path / "ws").mkdir()
    (tmp_path / "ws" / "f").write_text("keep me")
    start = scan(tmp_path / "ws")
    image = tmp_path / "img"
    image.write_bytes(b"\0" * (1024 * 1024))  # not an ext4 filesystem: must not read as "the guest deleted all"
    with pytest.raises(SandboxError, match="could not sync back the workspace image") as info:
        sync_back(tmp_path / "ws", image, start)
    assert str(image) in (info.value.hint or "")
    assert (tmp_path / "ws" / "f").read_text() == "keep me"
    assert image.exists() and sorted(os.listdir(tmp_path)) == ["img", "ws"]  # no scratch directory left
