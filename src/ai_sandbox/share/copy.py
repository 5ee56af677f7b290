"""Workspace mode `copy` (the seed's behaviour): an ext4 image filled from the workspace at start, synced back at stop.

The image is built and read without mounting (`mkfs.ext4 -d`; `ext4read`, entry by entry), so no root is needed.
Sync-back is a three-way merge against the manifest recorded at start: the guest's changes land on the host unless
the host changed the same path too; then the host version stays in place and the guest's is kept beside it. Nothing
is lost, and nothing outside the workspace is touched: host symlinks are never followed while writing back.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from ai_sandbox import runner
from ai_sandbox.errors import CommandError, SandboxError
from ai_sandbox.share.links import link_stays_inside  # noqa: F401  (copy mode's rule, also the sftp share's)
from ai_sandbox.share.syncplan import (  # noqa: F401  (the pure half: the three-way plan and its types)
    CONFLICT_TAG,
    Action,
    Entry,
    Kind,
    Manifest,
    SyncReport,
    ancestors,
    conflict_stamp,
    plan_sync,
)

IMAGE_LABEL = "aisbx-ws"


# -- manifests ------------------------------------------------------------------------------------------------------


_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def _sha256_fd(fd: int) -> str:
    digest = hashlib.sha256()
    while chunk := os.read(fd, 1 << 20):
        digest.update(chunk)
    return digest.hexdigest()


def _entry(dir_fd: int, name: str, st: os.stat_result, previous: Entry | None) -> Entry | None:
    if stat.S_ISDIR(st.st_mode):
        return Entry("dir")
    if stat.S_ISLNK(st.st_mode):
        target = os.fsencode(os.readlink(name, dir_fd=dir_fd))
        return Entry("link", st.st_size, st.st_mtime_ns, hashlib.sha256(target).hexdigest())
    if not stat.S_ISREG(st.st_mode):
        return None  # sockets, fifos, devices: not workspace content
    mode = stat.S_IMODE(st.st_mode) & 0o777
    if previous and previous.kind == "file" and (previous.size, previous.mtime_ns) == (st.st_size, st.st_mtime_ns):
        return dataclasses.replace(previous, mode=mode)  # same size and ns mtime: trust the recorded hash
    fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, dir_fd=dir_fd)
    try:
        return Entry("file", st.st_size, st.st_mtime_ns, _sha256_fd(fd), mode)
    finally:
        os.close(fd)


def copy_sparse(src_fd: int, dst_fd: int, block: int = 4096) -> int:
    """Copy src into dst, seeking over all-zero blocks so holes stay holes; returns the bytes written."""
    zero = bytes(block)
    written = size = 0
    while chunk := os.read(src_fd, 1 << 16):
        for i in range(0, len(chunk), block):
            piece = chunk[i : i + block]
            if piece == zero[: len(piece)]:
                os.lseek(dst_fd, len(piece), os.SEEK_CUR)
            else:
                os.write(dst_fd, piece)
                written += len(piece)
        size += len(chunk)
    os.ftruncate(dst_fd, size)
    return written


def walk_fd(root_fd: int, rel: str) -> int:
    """The directory `rel` under root_fd, opened one component at a time with O_NOFOLLOW (no link is followed)."""
    fd = os.dup(root_fd)
    for part in filter(None, rel.split("/")):
        try:
            nxt = os.open(part, _DIR, dir_fd=fd)
        finally:
            os.close(fd)
        fd = nxt
    return fd


def _open_root(root: Path | int) -> int:
    return os.dup(root) if isinstance(root, int) else os.open(root, _DIR)


def scan(root: Path | int, previous: Manifest | None = None, ignore: frozenset[str] = frozenset()) -> Manifest:
    """Record every file, symlink and directory under `root` (symlinks are never followed)."""
    found: Manifest = {}
    pending = [""]
    root_fd = _open_root(root)
    try:
        while pending:
            rel_dir = pending.pop()
            dir_fd = walk_fd(root_fd, rel_dir)
            try:
                with os.scandir(dir_fd) as entries:
                    for item in entries:
                        rel = f"{rel_dir}/{item.name}" if rel_dir else item.name
                        if rel in ignore:
                            continue
                        st = item.stat(follow_symlinks=False)
                        entry = _entry(dir_fd, item.name, st, (previous or {}).get(rel))
                        if entry is not None:
                            found[rel] = entry
                            if entry.kind == "dir":
                                pending.append(rel)
            finally:
                os.close(dir_fd)
    finally:
        os.close(root_fd)
    return found


def save_manifest(manifest: Manifest, path: Path) -> None:
    data = {rel: [e.kind, e.size, e.mtime_ns, e.digest, e.mode] for rel, e in sorted(manifest.items())}
    path.write_text(json.dumps(data))


def load_manifest(path: Path) -> Manifest:
    return {rel: Entry(*fields) for rel, fields in json.loads(path.read_text()).items()}


# -- applying (every host path walked from the workspace's fd, one component at a time, never through a link) -----


class _Unsafe(Exception):
    """A path that would leave the workspace or go through a symlink."""


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


def _dir_fd(root_fd: int, rel: PurePosixPath, create: bool) -> int:
    """The host directory `rel` under the root, as an fd; missing ones are made when `create` is set."""
    fd = os.dup(root_fd)
    for part in rel.parts:
        try:
            try:
                nxt = os.open(part, _DIR, dir_fd=fd)
            except FileNotFoundError:
                if not create:
                    raise
                os.mkdir(part, 0o777, dir_fd=fd)
                nxt = os.open(part, _DIR, dir_fd=fd)
            except (NotADirectoryError, PermissionError):
                raise
            except OSError as e:  # ELOOP: a symlink
                raise _Unsafe(f"{part} on the host is not a plain directory") from e
        finally:
            os.close(fd)
        fd = nxt
    return fd


def _lstat(dir_fd: int, name: str) -> os.stat_result | None:
    try:
        return os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return None


def _unchanged(dir_fd: int, name: str, expect: Entry | None) -> bool:
    st = _lstat(dir_fd, name)
    if st is None or expect is None:
        return st is None and expect is None
    if expect.kind == "dir":
        return stat.S_ISDIR(st.st_mode)
    return (st.st_size, st.st_mtime_ns) == (expect.size, expect.mtime_ns)


@dataclass
class _Ctx:
    root_fd: int
    guest_fd: int
    stamp: str
    written: dict[tuple[int, int], str] = field(default_factory=dict)  # guest inode -> host path written for it


def _tmp_name(dir_fd: int) -> str:
    for _ in range(100):
        name = f".aisbx-{os.urandom(6).hex()}.sync"  # short: any name length still fits
        if _lstat(dir_fd, name) is None:
            return name
    raise _Unsafe("no free temporary name")


def _write(ctx: _Ctx, src: PurePosixPath, dest: PurePosixPath, parent: int, name: str, kind: Kind) -> None:
    if kind == "dir":
        with contextlib.suppress(FileExistsError):
            os.mkdir(name, 0o777, dir_fd=parent)
        st = _lstat(parent, name)
        if st is None or not stat.S_ISDIR(st.st_mode):
            raise _Unsafe(f"{name} on the host is not a plain directory")
        return
    src_dir = walk_fd(ctx.guest_fd, str(src.parent))
    try:
        tmp = _tmp_name(parent)
        if kind == "link":
            link = os.readlink(src.name, dir_fd=src_dir)
            if not link_stays_inside(link, len(dest.parent.parts)):
                raise _Unsafe(f"symlink target {link!r} could lead out of the workspace")
            os.symlink(link, tmp, dir_fd=parent)
        else:
            _write_file(ctx, src_dir, src.name, parent, tmp, dest)
        try:
            os.replace(tmp, name, src_dir_fd=parent, dst_dir_fd=parent)  # replaces a host link; never writes through
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp, dir_fd=parent)
            raise
    finally:
        os.close(src_dir)


def _write_file(ctx: _Ctx, src_dir: int, src_name: str, parent: int, tmp: str, dest: PurePosixPath) -> None:
    src = os.open(src_name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, dir_fd=src_dir)
    try:
        st = os.fstat(src)
        if not stat.S_ISREG(st.st_mode):
            raise _Unsafe("not a regular file in the guest tree")
        first = ctx.written.get((st.st_dev, st.st_ino)) if st.st_nlink > 1 else None
        if first is not None:  # a hard link in the guest: the same link on the host
            first_path = PurePosixPath(first)
            first_dir = _dir_fd(ctx.root_fd, first_path.parent, create=False)
            try:
                os.link(first_path.name, tmp, src_dir_fd=first_dir, dst_dir_fd=parent, follow_symlinks=False)
            finally:
                os.close(first_dir)
            return
        out = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=parent)
        try:
            copy_sparse(src, out)
            os.fchmod(out, stat.S_IMODE(st.st_mode) & 0o777)  # set-id bits from the guest are dropped
            os.utime(out, ns=(st.st_atime_ns, st.st_mtime_ns))
        except BaseException:
            os.close(out)
            os.unlink(tmp, dir_fd=parent)
            raise
        os.close(out)
        if st.st_nlink > 1:
            ctx.written[(st.st_dev, st.st_ino)] = str(dest)
    finally:
        os.close(src)


def _free_name(parent: int, name: str) -> str:
    candidate, n = name, 1
    while _lstat(parent, candidate) is not None:
        n += 1
        candidate = f"{name}-{n}"
    return candidate


def _apply_one(ctx: _Ctx, action: Action) -> Action | None:
    """Carry out one action; returns what was actually done (a late conflict, say), or None for nothing."""
    dest = _checked(action.dest)
    src = _checked(action.path)
    try:
        parent = _dir_fd(ctx.root_fd, dest.parent, create=action.op != "delete")
    except FileNotFoundError:
        return None  # deleting under a directory the host already removed
    try:
        if action.op == "delete":
            if not _unchanged(parent, dest.name, action.expect):
                return None  # the host changed it after planning: keep it
            with contextlib.suppress(OSError):
                if action.kind == "dir":
                    os.rmdir(dest.name, dir_fd=parent)  # a dir the host added to stays
                else:
                    os.unlink(dest.name, dir_fd=parent)
                return action
            return None
        if action.op == "copy" and not _unchanged(parent, dest.name, action.expect):
            st = _lstat(parent, dest.name)
            if action.kind == "dir" and st is not None and stat.S_ISDIR(st.st_mode):
                return None  # the host made the same directory meanwhile
            action = Action("conflict", action.path, action.kind, f"{action.dest}{CONFLICT_TAG}{ctx.stamp}")
            return _apply_one(ctx, action)
        name = _free_name(parent, dest.name) if action.op == "conflict" and action.kind != "dir" else dest.name
        _write(ctx, src, dest.with_name(name), parent, name, action.kind)
        return dataclasses.replace(action, dest=str(dest.with_name(name)))
    finally:
        os.close(parent)


def apply_sync(
    actions: list[Action], host_root: Path | int, guest_root: Path | int, *, stamp: str | None = None
) -> SyncReport:
    """Carry out a plan: guest files come from `guest_root` (an extracted image), changes go to `host_root`."""
    report = SyncReport()
    root_fd, guest_fd = _open_root(host_root), _open_root(guest_root)
    ctx = _Ctx(root_fd, guest_fd, stamp or conflict_stamp())
    moved: set[str] = set()  # conflicting guest dirs: their contents are not listed one by one
    try:
        for action in sorted(actions, key=_phase):
            try:
                done = _apply_one(ctx, action)
            except (_Unsafe, OSError) as e:
                report.skipped.append((action.path, str(e)))
                continue
            if done is None:
                continue
            if done.op == "delete":
                report.deleted.append(done.path)
            elif done.op == "copy":
                report.copied.append(done.path)
            elif not moved.intersection(ancestors(done.path)):
                report.conflicts.append((done.path, done.dest))
                if done.kind == "dir":
                    moved.add(done.path)
    finally:
        os.close(root_fd)
        os.close(guest_fd)
    return report


def merge(workspace: Path | int, guest_root: Path | int, start: Manifest, *, stamp: str | None = None) -> SyncReport:
    """The three-way merge of an extracted guest tree into the workspace (see `plan_sync`)."""
    ignore = frozenset() if "lost+found" in start else frozenset({"lost+found"})  # made by mkfs
    guest_now = scan(guest_root, ignore=ignore)
    host_now = scan(workspace, previous=start)
    stamp = stamp or conflict_stamp()
    return apply_sync(plan_sync(start, host_now, guest_now, stamp=stamp), workspace, guest_root, stamp=stamp)


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
