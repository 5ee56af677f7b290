"""An asyncssh SFTP server confined to one host directory (the workspace).

The guest is untrusted: every path it sends is clamped to the root, and every path the host would *follow* is
resolved with realpath and refused when it lands outside the root. Operations that act on a link itself (lstat,
readlink, remove, rename, link, symlink, mkdir, rmdir) resolve only the parent directory, so an in-workspace symlink
keeps POSIX meaning while an escaping one is never followed. `map_path` is the fully-resolving check, so any
operation asyncssh adds later and we do not override still fails closed.

Every method is synchronous on purpose: asyncssh awaits one request before reading the next, so a check and the
system call that uses it cannot be interleaved with another guest request (no check-then-use race from the guest).
"""

from __future__ import annotations

import logging
import os
import posixpath
import stat
from collections.abc import Callable
from typing import Any

import asyncssh
from asyncssh import SFTPAttrs, SFTPPermissionDenied

from ai_sandbox.share.links import link_stays_inside

log = logging.getLogger(__name__)

# Guest-created set-id bits would give whoever runs the file the host user's identity; never store them.
_DROPPED_MODE_BITS = stat.S_ISUID | stat.S_ISGID


class ConfinedSFTPServer(asyncssh.SFTPServer):
    """SFTP server whose whole filesystem is `root`; nothing outside it can be read, written, created or linked."""

    def __init__(self, chan: Any, root: str | os.PathLike[str]) -> None:
        # No asyncssh `chroot`: it follows pre-existing symlinks out of the root (documented); we map paths ourselves.
        super().__init__(chan)
        real = os.path.realpath(os.fspath(root))
        if real == "/" or not os.path.isdir(real):
            raise ValueError(f"workspace root must be an existing directory other than /: {root}")
        self._root = os.fsencode(real)

    @property
    def root(self) -> bytes:
        return self._root

    # -- path confinement -------------------------------------------------------------------------------------

    def _virtual(self, path: bytes) -> bytes:
        """The client path as an absolute path in the virtual tree; `..` stops at the virtual root."""
        if b"\0" in path:
            raise SFTPPermissionDenied("invalid path")
        vpath = posixpath.normpath(posixpath.join(b"/", path))
        return b"/" + vpath.lstrip(b"/")  # normpath keeps a leading "//"

    def _inside(self, local: bytes) -> bool:
        return local == self._root or local.startswith(self._root + b"/")

    def _require_inside(self, local: bytes, path: bytes) -> bytes:
        if not self._inside(local):
            log.warning("refused SFTP access outside the workspace: %r", path)
            raise SFTPPermissionDenied("path leads outside the workspace")
        return local

    def map_path(self, path: bytes) -> bytes:
        """Local path with every symlink followed; refused when it ends outside the root."""
        return self._resolve(self._virtual(path), path)

    def _resolve(self, vpath: bytes, path: bytes) -> bytes:
        lexical = self._root if vpath == b"/" else self._root + vpath
        return self._require_inside(os.path.realpath(lexical), path)

    def _map_nofollow(self, path: bytes) -> bytes:
        """Local path whose parent is resolved and checked but whose last component is not followed."""
        vpath = self._virtual(path)
        if vpath == b"/":
            return self._root
        parent, name = posixpath.split(vpath)
        return posixpath.join(self._resolve(parent, path), name)

    def _map_changeable(self, path: bytes) -> bytes:
        """Like `_map_nofollow`, but the root itself may not be removed, renamed or replaced."""
        local = self._map_nofollow(path)
        if local == self._root:
            raise SFTPPermissionDenied("the workspace root cannot be changed")
        return local

    def reverse_map_path(self, path: bytes) -> bytes:
        if path == self._root:
            return b"/"
        if path.startswith(self._root + b"/"):
            return path[len(self._root) :]
        raise SFTPPermissionDenied("path leads outside the workspace")

    # -- operations that follow symlinks: default implementations through the checking `map_path` ------------

    def open(self, path: bytes, pflags: int, attrs: SFTPAttrs) -> object:
        return super().open(path, pflags, _sanitized(attrs))

    def open56(self, path: bytes, desired_access: int, flags: int, attrs: SFTPAttrs) -> object:
        return super().open56(path, desired_access, flags, _sanitized(attrs))

    def setstat(self, path: bytes, attrs: SFTPAttrs) -> None:
        return super().setstat(path, _sanitized(attrs))

    def fsetstat(self, file_obj: object, attrs: SFTPAttrs) -> None:
        return super().fsetstat(file_obj, _sanitized(attrs))

    def realpath(self, path: bytes) -> bytes:
        return self.reverse_map_path(self.map_path(path))

    # -- operations on the link itself -------------------------------------------------------------------------

    def lstat(self, path: bytes) -> os.stat_result:
        return os.lstat(self._map_nofollow(path))

    def lsetstat(self, path: bytes, attrs: SFTPAttrs) -> None:
        local = self._map_nofollow(path)
        if stat.S_ISLNK(os.lstat(local).st_mode):
            # Linux cannot chmod a symlink; refusing is simpler and safer than a partial update.
            raise asyncssh.SFTPOpUnsupported("attributes of a symlink cannot be set")
        return self.setstat(path, attrs)

    def readlink(self, path: bytes) -> bytes:
        # The raw target, not a rewritten one: the guest kernel resolves it inside the mount, like any symlink.
        return os.readlink(self._map_nofollow(path))

    def remove(self, path: bytes) -> None:
        os.remove(self._map_changeable(path))

    def rmdir(self, path: bytes) -> None:
        os.rmdir(self._map_changeable(path))

    def mkdir(self, path: bytes, attrs: SFTPAttrs) -> None:
        clean = _sanitized(attrs)
        mode = 0o777 if clean.permissions is None else stat.S_IMODE(clean.permissions)
        os.mkdir(self._map_changeable(path), mode)

    def rename(self, oldpath: bytes, newpath: bytes) -> None:
        old, new = self._map_moved(oldpath, newpath)
        if os.path.lexists(new):
            raise asyncssh.SFTPFileAlreadyExists("file already exists")
        os.rename(old, new)

    def posix_rename(self, oldpath: bytes, newpath: bytes) -> None:
        os.replace(*self._map_moved(oldpath, newpath))

    def link(self, oldpath: bytes, newpath: bytes) -> None:
        # link(2) semantics: a symlink source is linked itself, never the file it points to.
        os.link(*self._map_moved(oldpath, newpath, keep_root=True), follow_symlinks=False)

    def _map_moved(self, oldpath: bytes, newpath: bytes, keep_root: bool = False) -> tuple[bytes, bytes]:
        """Both ends of a rename or hard link; a symlink must still point inside from where it lands."""
        old = self._map_nofollow(oldpath) if keep_root else self._map_changeable(oldpath)
        new = self._map_changeable(newpath)
        if os.path.islink(old):
            # `../x` made in a/b/ is fine there but escapes once moved to the root.
            self._check_link_target(os.readlink(old), posixpath.dirname(new))
        elif os.path.isdir(old):
            self._check_links_moved_with(old, new)
        return old, new

    def _check_links_moved_with(self, old: bytes, new: bytes) -> None:
        """A moved directory re-aims the relative links inside it: refuse a move that would aim one out of the
        root, so the guest cannot leave a link to a host file in the workspace for host tools to follow. (Links
        that already point out, which only the host can have made, keep their meaning and are left alone.)"""
        for dirpath, _dirs, files in os.walk(old):  # never descends through a symlink
            for name in files + _dirs:
                here = posixpath.join(dirpath, name)
                if not os.path.islink(here):
                    continue
                target = os.readlink(here)
                if target.startswith(b"/"):
                    continue
                moved = posixpath.join(new, posixpath.relpath(here, old))
                before = posixpath.normpath(posixpath.join(posixpath.dirname(here), target))
                after = posixpath.normpath(posixpath.join(posixpath.dirname(moved), target))
                if self._inside(before) and not self._inside(after):
                    log.warning("refused SFTP move that aims a link out of the workspace: %r", here)
                    raise SFTPPermissionDenied("the move would make a symlink inside it point outside the workspace")

    def symlink(self, oldpath: bytes, newpath: bytes) -> None:
        """Create `newpath` pointing at `oldpath`; the target must be relative and stay inside the root."""
        local = self._map_changeable(newpath)
        self._check_link_target(oldpath, posixpath.dirname(local))
        os.symlink(oldpath, local)

    def _check_link_target(self, target: bytes, local_dir: bytes) -> None:
        if not target or b"\0" in target:
            raise asyncssh.SFTPInvalidParameter("invalid symlink target")
        if target.startswith(b"/"):
            # An absolute target means different files on host and guest; refuse rather than guess.
            raise SFTPPermissionDenied("absolute symlink targets are not allowed in the workspace")
        rel = posixpath.relpath(local_dir, self._root)
        depth = 0 if rel == b"." else len(rel.split(b"/"))
        # Lexical and real-path checks hold only at creation: the directories on the way can be swapped for links
        # later (`up/../x` once `up` becomes `..`). Only a leading run of `..`, no deeper than the link, stays in.
        if not link_stays_inside(os.fsdecode(target), depth):
            raise SFTPPermissionDenied("a workspace symlink may only climb with leading '..', and not above the root")
        joined = posixpath.join(local_dir, target)
        for candidate in (posixpath.normpath(joined), os.path.realpath(joined)):
            self._require_inside(candidate, target)


def _sanitized(attrs: SFTPAttrs) -> SFTPAttrs:
    """Attributes without ownership changes or set-id bits (files stay the host user's, plainly)."""
    attrs.uid = attrs.gid = None
    attrs.owner = attrs.group = None
    if attrs.permissions is not None:
        attrs.permissions &= ~_DROPPED_MODE_BITS
    return attrs


def confined_factory(root: str | os.PathLike[str]) -> Callable[[Any], ConfinedSFTPServer]:
    """An `sftp_factory` for asyncssh servers (used by tests and anything serving the subsystem normally)."""
    return lambda chan: ConfinedSFTPServer(chan, root)
