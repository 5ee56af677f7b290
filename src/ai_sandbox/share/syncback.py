"""Copy-mode sync-back as the host runs it: the guest's image is read and merged by unprivileged workers.

Who does what (root only prepares a private scratch directory and a read-only copy of the image):
- the reader, which parses the hostile image, is never root: the workspace's owner, or for a root-owned
  workspace the user behind sudo (SUDO_UID/SUDO_GID), else `nobody`;
- the writer, which merges into the workspace, is the workspace's owner, so files the guest made belong to them.
  A root-owned workspace can only be written by root; then the merge runs as root, but on a tree the reader
  already built with checked names, and only through fd-relative, O_NOFOLLOW opens.
The image is deleted by the caller only when every entry was accounted for (`SyncReport.skipped` empty).
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import sys
import tempfile
from pathlib import Path

from ai_sandbox import runner
from ai_sandbox.errors import CommandError, SandboxError
from ai_sandbox.share import copy

Ids = tuple[int, int]


def _sudo_user() -> Ids | None:
    try:
        uid, gid = int(os.environ["SUDO_UID"]), int(os.environ["SUDO_GID"])
    except (KeyError, ValueError):
        return None
    return (uid, gid) if uid > 0 and gid > 0 else None


def _nobody() -> Ids:
    try:
        entry = pwd.getpwnam("nobody")
        return entry.pw_uid, entry.pw_gid
    except KeyError:
        return 65534, 65534


def identities(workspace: Path) -> tuple[Ids, Ids]:
    """(reader, writer): who parses the image, who writes the workspace."""
    if os.geteuid() != 0:
        me = (os.geteuid(), os.getegid())
        return me, me
    st = os.stat(workspace)
    owner = (st.st_uid, st.st_gid)
    if owner[0] != 0:
        return owner, owner
    return _sudo_user() or _nobody(), owner


def _worker(verb: str, ids: Ids, args: list[str], image: Path, timeout: float) -> dict:
    argv = [sys.executable, "-m", "ai_sandbox.share.copy_worker", verb, str(ids[0]), str(ids[1]), *args]
    try:
        result = runner.run(argv, timeout=timeout, cwd="/")
        out = json.loads(result.stdout.strip().splitlines()[-1])
    except (CommandError, ValueError, IndexError) as e:
        why = e.message if isinstance(e, CommandError) else "no result"
        raise SandboxError(f"could not sync back the workspace image {image}: {why}",
                           hint=f"the guest's files are kept in {image}") from e
    if not isinstance(out, dict):
        raise SandboxError(f"could not sync back the workspace image {image}: bad result",
                           hint=f"the guest's files are kept in {image}")
    return out


def _pairs(value: object) -> list[tuple[str, str]]:
    return [(str(a), str(b)) for a, b in value] if isinstance(value, list) else []  # type: ignore[misc]


def sync_back(workspace: Path, image: Path, start: copy.Manifest, *, stamp: str | None = None,
              timeout: float = 1800) -> copy.SyncReport:
    """Merge the guest's changes from `image` into `workspace`; entries that could not be placed are `skipped`."""
    stamp = stamp or copy.conflict_stamp()
    reader, writer = identities(workspace)
    # Next to the image, not in /tmp: a tmpfs there may be smaller than the workspace.
    work = Path(tempfile.mkdtemp(prefix=".sync-", dir=image.parent))
    try:
        copy.save_manifest(start, work / "start.json")
        ex = work / "ex"
        ex.mkdir(mode=0o700)
        runner.run(["cp", "--sparse=always", "--reflink=auto", image, ex / "image.ro"], timeout=timeout)
        os.chmod(ex / "image.ro", 0o400)
        if os.geteuid() == 0:
            os.chown(ex / "image.ro", *reader)
            os.chown(ex, *reader)
            os.chown(work / "start.json", *writer)
            os.chown(work, *writer)
        extracted = _worker("extract", reader, [str(ex)], image, timeout)
        merged = _worker("merge", writer, [str(workspace), str(work), stamp], image, timeout)
    finally:
        shutil.rmtree(work, ignore_errors=True)  # fd-based on Linux: links the workers left are not followed
    return copy.SyncReport(
        copied=[str(p) for p in merged.get("copied", [])],
        deleted=[str(p) for p in merged.get("deleted", [])],
        conflicts=_pairs(merged.get("conflicts")),
        skipped=_pairs(extracted.get("skipped")) + _pairs(merged.get("skipped")),
    )
