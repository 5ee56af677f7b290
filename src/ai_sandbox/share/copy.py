"""Workspace mode `copy` (the seed's behaviour): an ext4 image filled from the workspace at start, synced back at stop.

The image is built and read without mounting (`mkfs.ext4 -d`, `debugfs rdump`), so no root is needed. Sync-back is a
three-way merge against the manifest recorded at start: the guest's changes land on the host unless the host changed
the same path too; then the host version stays in place and the guest's is kept beside it. Nothing is lost, and
nothing outside the workspace is touched: host symlinks are never followed while writing back.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import shutil
import stat
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Literal

from ai_sandbox import runner
from ai_sandbox.errors import CommandError, SandboxError

IMAGE_LABEL = "aisbx-ws"
CONFLICT_TAG = ".guest-conflict-"
Kind = Literal["file", "link", "dir"]


@dataclass(frozen=True)
class Entry:
    """One path as recorded: `digest` is the sha256 of a file's content or of a link's target ("" for dirs)."""

    kind: Kind
    size: int = 0
    mtime_ns: int = 0
    digest: str = ""
    mode: int = 0  # permission bits of a file: `chmod +x` in the guest is a change too

    def same(self, other: Entry | None) -> bool:
        return other is not None and (self.kind, self.digest, self.mode) == (other.kind, other.digest, other.mode)


Manifest = dict[str, Entry]  # workspace-relative POSIX path -> entry


@dataclass(frozen=True)
class Action:
    """One step of a sync: `path` in the guest tree, `dest` on the host (differs only for conflict copies)."""

    op: Literal["copy", "delete", "conflict"]
    path: str
    kind: Kind
    dest: str
    expect: Entry | None = None  # what the host had when planned; checked again right before changing it


@dataclass
class SyncReport:
    copied: list[str] = field(default_factory=list)
    deleted: list[str] = field(default_factory=list)
    conflicts: list[tuple[str, str]] = field(default_factory=list)  # (path, where the guest version was put)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, why)

    def summary(self) -> str:
        counts = (len(self.copied), len(self.deleted), len(self.conflicts), len(self.skipped))
        return "{} copied, {} deleted, {} conflicts, {} skipped".format(*counts)


# -- manifests ------------------------------------------------------------------------------------------------------


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _entry(path: Path, st: os.stat_result, previous: Entry | None) -> Entry | None:
    if stat.S_ISDIR(st.st_mode):
        return Entry("dir")
    if stat.S_ISLNK(st.st_mode):
        return Entry("link", st.st_size, st.st_mtime_ns, hashlib.sha256(os.fsencode(os.readlink(path))).hexdigest())
    if not stat.S_ISREG(st.st_mode):
        return None  # sockets, fifos, devices: not workspace content
    mode = stat.S_IMODE(st.st_mode) & 0o777
    if previous and previous.kind == "file" and (previous.size, previous.mtime_ns) == (st.st_size, st.st_mtime_ns):
        return dataclasses.replace(previous, mode=mode)  # same size and ns mtime: trust the recorded hash
    return Entry("file", st.st_size, st.st_mtime_ns, _sha256_file(path), mode)


def scan(root: Path, previous: Manifest | None = None, ignore: frozenset[str] = frozenset()) -> Manifest:
    """Record every file, symlink and directory under `root` (symlinks are never followed)."""
    found: Manifest = {}
    pending = [""]
    while pending:
        rel_dir = pending.pop()
        with os.scandir(root / rel_dir) as entries:
            for item in entries:
                rel = f"{rel_dir}/{item.name}" if rel_dir else item.name
                if rel in ignore:
                    continue
                entry = _entry(Path(item.path), item.stat(follow_symlinks=False), (previous or {}).get(rel))
                if entry is not None:
                    found[rel] = entry
                    if entry.kind == "dir":
                        pending.append(rel)
    return found


def save_manifest(manifest: Manifest, path: Path) -> None:
    data = {rel: [e.kind, e.size, e.mtime_ns, e.digest, e.mode] for rel, e in sorted(manifest.items())}
    path.write_text(json.dumps(data))


def load_manifest(path: Path) -> Manifest:
    return {rel: Entry(*fields) for rel, fields in json.loads(path.read_text()).items()}


# -- planning (pure) ------------------------------------------------------------------------------------------------


def conflict_stamp(now: float | None = None) -> str:
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(time.time() if now is None else now))


def _same(a: Entry | None, b: Entry | None) -> bool:
    return (a is None and b is None) or (a is not None and a.same(b))


def _conflict_name(path: str, stamp: str, taken: set[str]) -> str:
    base = f"{path}{CONFLICT_TAG}{stamp}"
    name, n = base, 1
    while name in taken:
        n += 1
        name = f"{base}-{n}"
    taken.add(name)
    return name


def plan_sync(start: Manifest, host_now: Manifest, guest_now: Manifest, *, stamp: str | None = None) -> list[Action]:
    """The three-way merge of the guest's changes into the host, as actions in path order (parents first)."""
    stamp = stamp or conflict_stamp()
    taken = set(host_now) | set(guest_now)
    moved: dict[str, str] = {}  # guest dirs that cannot land in place -> where their changed contents go
    actions: list[Action] = []
    for path in sorted(set(start) | set(host_now) | set(guest_now)):
        s, h, g = start.get(path), host_now.get(path), guest_now.get(path)
        if _same(s, g):
            continue  # the guest left it alone: the host's version wins, even a deletion
        under = next((p for p in _ancestors(path) if p in moved), None)
        if under is None and g is not None and (blocked := _blocked(path, start, host_now, guest_now)):
            under = blocked
            moved[blocked] = _conflict_name(blocked, stamp, taken)
            actions.append(Action("conflict", blocked, "dir", moved[blocked]))
        if under is not None:
            if g is not None:
                actions.append(Action("conflict", path, g.kind, moved[under] + path[len(under) :]))
        elif _same(h, g):
            continue  # both made the same change
        elif _same(s, h):  # only the guest changed it
            if h is not None and (g is None or g.kind != h.kind):
                actions.append(Action("delete", path, h.kind, path, h))
            if g is not None:
                actions.append(Action("copy", path, g.kind, path, h if h and h.kind == g.kind else None))
        elif g is not None:  # both changed it, differently (a host deletion counts): keep both
            dest = _conflict_name(path, stamp, taken)
            actions.append(Action("conflict", path, g.kind, dest))
            if g.kind == "dir":
                moved[path] = dest
        # else: the guest deleted what the host changed; the host's version stays
    return actions


def _blocked(path: str, start: Manifest, host_now: Manifest, guest_now: Manifest) -> str | None:
    """The topmost ancestor the host turned into a non-directory, which the guest's change cannot go through."""
    for parent in reversed(_ancestors(path)):
        h = host_now.get(parent)
        if h is None or h.kind == "dir":
            continue
        g = guest_now.get(parent)
        if not (_same(start.get(parent), h) and g is not None and g.kind == "dir"):  # else the plan swaps in a dir
            return parent
    return None


def _ancestors(path: str) -> list[str]:
    return [str(p) for p in PurePosixPath(path).parents if str(p) != "."]


# -- applying -------------------------------------------------------------------------------------------------------


class _Unsafe(Exception):
    """A path that would leave the workspace or go through a host symlink."""


def _phase(action: Action) -> tuple[int, int, str]:
    depth = action.dest.count("/")
    if action.op == "delete":
        return (0, 0, action.dest) if action.kind != "dir" else (1, -depth, action.dest)  # rmdir deepest first
    return (2 if action.op == "copy" else 3, depth, action.dest)


def _checked(rel: str) -> PurePosixPath:
    parts = PurePosixPath(rel).parts
    if not parts or rel.startswith("/") or any(p in ("", ".", "..") or "\0" in p for p in parts):
        raise _Unsafe("not a plain relative path")
    return PurePosixPath(rel)


def _host_dir(root: Path, rel: PurePosixPath, create: bool) -> Path:
    """The host directory `rel` under root, walked one component at a time so no symlink is ever followed."""
    current = root
    for part in rel.parts:
        current = current / part
        try:
            st = current.lstat()
        except FileNotFoundError:
            if not create:
                raise
            current.mkdir()
            continue
        if not stat.S_ISDIR(st.st_mode):
            raise _Unsafe(f"{current.relative_to(root)} on the host is not a plain directory")
    return current


def _unchanged(path: Path, expect: Entry | None) -> bool:
    try:
        st = path.lstat()
    except FileNotFoundError:
        return expect is None
    if expect is None:
        return False
    if expect.kind == "dir":
        return stat.S_ISDIR(st.st_mode)
    return (st.st_size, st.st_mtime_ns) == (expect.size, expect.mtime_ns)


def _write(src: Path, parent: Path, name: str, kind: Kind, root: Path) -> None:
    target = parent / name
    if kind == "dir":
        target.mkdir(exist_ok=True)
        return
    if kind == "link":
        link = os.readlink(src)
        resolved = os.path.normpath(parent / link)
        if link.startswith("/") or not (resolved == str(root) or resolved.startswith(f"{root}/")):
            raise _Unsafe(f"symlink target {link!r} leaves the workspace")
    fd, tmp = tempfile.mkstemp(prefix=".aisbx-", suffix=".sync", dir=parent)  # short: any name length still fits
    os.close(fd)
    try:
        if kind == "link":
            os.unlink(tmp)
            os.symlink(link, tmp)
        else:
            shutil.copyfile(src, tmp)
            st = src.stat()
            os.chmod(tmp, stat.S_IMODE(st.st_mode) & ~(stat.S_ISUID | stat.S_ISGID))
            os.utime(tmp, ns=(st.st_atime_ns, st.st_mtime_ns))
        os.replace(tmp, target)  # replaces a host symlink itself; never writes through it
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _free_name(parent: Path, name: str) -> str:
    candidate, n = name, 1
    while os.path.lexists(parent / candidate):
        n += 1
        candidate = f"{name}-{n}"
    return candidate


def _apply_one(action: Action, host_root: Path, guest_root: Path, stamp: str) -> Action | None:
    """Carry out one action; returns what was actually done (a late conflict, say), or None for nothing."""
    dest = _checked(action.dest)
    _checked(action.path)
    target = host_root / dest
    try:
        parent = _host_dir(host_root, dest.parent, create=action.op != "delete")
    except FileNotFoundError:
        return None  # deleting under a directory the host already removed
    if action.op == "delete":
        if not _unchanged(target, action.expect):
            return None  # the host changed it after planning: keep it
        with contextlib.suppress(OSError):
            (os.rmdir if action.kind == "dir" else os.unlink)(target)  # rmdir: a dir the host added to stays
            return action
        return None
    if action.op == "copy" and not _unchanged(target, action.expect):
        if action.kind == "dir" and stat.S_ISDIR(target.lstat().st_mode):
            return None  # the host made the same directory meanwhile
        action = Action("conflict", action.path, action.kind, f"{action.dest}{CONFLICT_TAG}{stamp}")
        return _apply_one(action, host_root, guest_root, stamp)
    name = _free_name(parent, dest.name) if action.op == "conflict" and action.kind != "dir" else dest.name
    _write(guest_root / action.path, parent, name, action.kind, host_root)
    return dataclasses.replace(action, dest=str(dest.with_name(name)))


def apply_sync(actions: list[Action], host_root: Path, guest_root: Path, *, stamp: str | None = None) -> SyncReport:
    """Carry out a plan: guest files come from `guest_root` (an extracted image), changes go to `host_root`."""
    stamp = stamp or conflict_stamp()
    report = SyncReport()
    root = Path(os.path.realpath(host_root))
    moved: set[str] = set()  # conflicting guest dirs: their contents are not listed one by one
    for action in sorted(actions, key=_phase):
        try:
            done = _apply_one(action, root, guest_root, stamp)
        except (_Unsafe, OSError) as e:
            report.skipped.append((action.path, str(e)))
            continue
        if done is None:
            continue
        if done.op == "delete":
            report.deleted.append(done.path)
        elif done.op == "copy":
            report.copied.append(done.path)
        elif not moved.intersection(_ancestors(done.path)):
            report.conflicts.append((done.path, done.dest))
            if done.kind == "dir":
                moved.add(done.path)
    return report


# -- the image ------------------------------------------------------------------------------------------------------


def create_image(workspace: Path, image: Path, size_mib: int, *, timeout: float = 600) -> Manifest:
    """Build `image` holding a copy of `workspace`; return the manifest to keep for `sync_back`."""
    manifest = scan(workspace)  # before the copy: a file changed meanwhile then reads as "changed by both, same"
    image.unlink(missing_ok=True)
    owner = f"root_owner={os.getuid()}:{os.getgid()}"
    argv = ["mkfs.ext4", "-q", "-F", "-m", "0", "-L", IMAGE_LABEL, "-E", owner, "-d", workspace, image, f"{size_mib}M"]
    try:
        runner.run(argv, timeout=timeout)
    except CommandError as e:
        image.unlink(missing_ok=True)
        raise SandboxError(
            f"could not copy the workspace into a {size_mib} MiB image: {e.message}",
            hint="raise FC_WORKSPACE_SIZE if the workspace does not fit, or use the sftp workspace mode",
        ) from e
    return manifest


def extract_image(image: Path, dest: Path, *, timeout: float = 600) -> None:
    """Copy the image's whole tree into the existing directory `dest`, without mounting it."""
    if '"' in str(dest):
        raise SandboxError(f"cannot extract the workspace image into {dest}: the path contains a double quote")
    # debugfs splits its request on blanks; double quotes keep a path with spaces whole.
    result = runner.run(["debugfs", "-R", f'rdump / "{dest}"', image], timeout=timeout)
    # debugfs exits 0 even when a request fails; only its banner and a non-root owner change are harmless.
    lines = [x for x in result.stderr.splitlines() if x.strip() and not x.startswith("debugfs ")]
    errors = [x for x in lines if "while changing ownership" not in x]
    if errors:
        raise SandboxError(f"could not read the workspace image {image}: {errors[0]}", hint="the image is kept")


def sync_back(workspace: Path, image: Path, start: Manifest, *, stamp: str | None = None) -> SyncReport:
    """Merge the guest's changes from `image` into `workspace` (see `plan_sync`)."""
    # Next to the image, not in /tmp: a tmpfs there may be smaller than the workspace.
    with tempfile.TemporaryDirectory(prefix=".sync-", dir=image.parent) as tmp:
        guest_root = Path(tmp)
        extract_image(image, guest_root)
        ignore = frozenset() if "lost+found" in start else frozenset({"lost+found"})  # made by mkfs
        guest_now = scan(guest_root, ignore=ignore)
        host_now = scan(workspace, previous=start)
        stamp = stamp or conflict_stamp()
        return apply_sync(plan_sync(start, host_now, guest_now, stamp=stamp), workspace, guest_root, stamp=stamp)
