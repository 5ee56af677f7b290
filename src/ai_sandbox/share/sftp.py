"""Workspace mode `sftp`: reverse sshfs over the sandbox's own SSH connection; works with any VMM.

The host runs `sshfs -o slave` *in the guest* through the control connection and answers that process's
stdin/stdout with an in-process SFTP server confined to the workspace (`sftp_server.ConfinedSFTPServer`). No
network port, no guest credential: the guest can only reach what that server allows, and every file it creates is
created by the host user running the server, so ownership on the host is naturally right.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import shlex
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import asyncssh

from ai_sandbox.errors import CommandError, SandboxError, UsageError
from ai_sandbox.share.sftp_server import ConfinedSFTPServer

log = logging.getLogger(__name__)

GUEST_MOUNTPOINT = "/workspace"
SFTP_VERSION = 3  # what sshfs speaks
_POLL_SECONDS = 0.1
_STOP_SECONDS = 5.0


# -- guest command line (pure) ---------------------------------------------------------------------------------


def sshfs_options(
    *,
    uid: int | None = None,
    gid: int | None = None,
    allow_other: bool = False,
    relative_symlinks: bool = False,
    cache_timeout: int = 1,
) -> list[str]:
    """The `-o` options for sshfs in slave mode."""
    # `slave` (not its newer alias `passive`): every sshfs 2.x/3.x knows it. SFTP then runs on stdin/stdout.
    opts = ["slave", "idmap=user"]
    opts += [f"uid={uid}"] if uid is not None else []
    opts += [f"gid={gid}"] if gid is not None else []
    # Host-side edits must show up in the guest quickly; sshfs caches names and attributes for 20 s by default.
    opts += [f"dcache_timeout={cache_timeout}"]
    # Root (and Docker) in the guest need this; it needs `user_allow_other` in the guest's /etc/fuse.conf.
    opts += ["allow_other"] if allow_other else []
    # Newer sshfs refuses symlinks containing `..` by default, which breaks node_modules/.bin and similar.
    # That check protects a guest from a hostile server; here the server is the trusted host.
    opts += ["no_contain_symlinks"] if relative_symlinks else []
    return opts


def sshfs_argv(mountpoint: str = GUEST_MOUNTPOINT, *, sshfs: str = "sshfs", **options: Any) -> list[str]:
    """argv of the guest's sshfs: serve `/` of our SFTP server at `mountpoint`."""
    return [sshfs, "-o", ",".join(sshfs_options(**options)), ":/", mountpoint]


def unmount_argv(mountpoint: str = GUEST_MOUNTPOINT, fusermount: str = "fusermount3") -> list[str]:
    """Lazy unmount: detaches even a dead mount (ENOTCONN) or one a shell still has as its cwd."""
    return [fusermount, "-u", "-z", mountpoint]


def _quiet_unmount(mountpoint: str) -> str:
    # fuse3 ships fusermount3; older guests only have fusermount. "not mounted" is the normal case: stay quiet.
    tools = ("fusermount3", "fusermount")
    return " || ".join(f"{shlex.join(unmount_argv(mountpoint, tool))} 2>/dev/null" for tool in tools)


def guest_command(argv: Sequence[str], mountpoint: str = GUEST_MOUNTPOINT) -> str:
    """The remote command line: clear a stale mount left by a dead session, then become sshfs."""
    return f"{_quiet_unmount(mountpoint)}; exec {shlex.join(argv)}"


def stop_command(mountpoint: str = GUEST_MOUNTPOINT) -> str:
    return f"{_quiet_unmount(mountpoint)}; true"


MOUNTS_COMMAND = "cat /proc/self/mounts"


def is_mounted(mounts: str, mountpoint: str) -> bool:
    """Whether /proc/self/mounts text shows a FUSE filesystem at `mountpoint`."""
    for line in mounts.splitlines():
        fields = line.split()
        if len(fields) >= 3 and _unescape(fields[1]) == mountpoint and fields[2].startswith("fuse"):
            return True
    return False


def _unescape(field: str) -> str:
    # The kernel writes space, tab, newline and backslash in mount paths as octal escapes.
    for code in ("\\040", "\\011", "\\012", "\\134"):
        field = field.replace(code, chr(int(code[1:], 8)))
    return field


# -- the one place that uses asyncssh internals -----------------------------------------------------------------


def make_sftp_handler(server: asyncssh.SFTPServer, reader: Any, writer: Any) -> Any:
    """An asyncssh SFTP server session on an arbitrary reader/writer pair.

    PRIVATE asyncssh API (`asyncssh.sftp.SFTPServerHandler`, checked by tests/unit/test_share_sftp.py): asyncssh
    serves SFTP only as an SSH *server* subsystem, but here we are the SSH client and the SFTP client (sshfs) is a
    command we started. We also force OpenSSH's swapped SYMLINK argument order, which sshfs uses; asyncssh would
    only detect it from the SSH peer's version string, and our peer is the guest's sshd, not sshfs.
    """
    from asyncssh.sftp import SFTPServerHandler

    handler = SFTPServerHandler(server, reader, writer, SFTP_VERSION)
    handler._nonstandard_symlink = True
    return handler


# -- the share -----------------------------------------------------------------------------------------------------


class SftpShare:
    """The workspace mounted in the guest through reverse sshfs; `ensure` re-mounts after a reconnect."""

    def __init__(
        self,
        workspace: str | os.PathLike[str],
        *,
        mountpoint: str = GUEST_MOUNTPOINT,
        uid: int | None = None,
        gid: int | None = None,
        allow_other: bool = False,
        sshfs: str = "sshfs",
        mount_timeout: float = 15.0,
    ) -> None:
        self.workspace = Path(workspace)
        self.mountpoint = mountpoint
        self._options: dict[str, Any] = {"uid": uid, "gid": gid, "allow_other": allow_other}
        self._sshfs = sshfs
        self._mount_timeout = mount_timeout
        self._conn: asyncssh.SSHClientConnection | None = None
        self._proc: asyncssh.SSHClientProcess[bytes] | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._stderr: collections.deque[str] = collections.deque(maxlen=20)

    @property
    def active(self) -> bool:
        """True while the guest's sshfs and our server for it are both alive."""
        proc, conn = self._proc, self._conn
        return (
            proc is not None
            and conn is not None
            and not conn.is_closed()
            and proc.exit_status is None
            and all(not t.done() for t in self._tasks)
        )

    def stderr_tail(self) -> str:
        """The last lines sshfs wrote to stderr (for error messages)."""
        return "\n".join(self._stderr)

    async def start(self, conn: asyncssh.SSHClientConnection) -> None:
        """Mount the workspace in the guest; returns once the mount is visible there."""
        if self._proc is not None:
            await self.stop()
        if not self.workspace.is_dir():
            raise UsageError(f"workspace {self.workspace} is not a directory")
        relative_symlinks = await self._probe(conn)
        argv = sshfs_argv(self.mountpoint, sshfs=self._sshfs, **self._options, relative_symlinks=relative_symlinks)
        # sshfs starts talking at once; its first packets wait in the channel until the handler below reads them.
        proc = await conn.create_process(guest_command(argv, self.mountpoint), encoding=None)
        server = ConfinedSFTPServer(proc.channel, self.workspace)
        self._conn, self._proc = conn, proc
        self._stderr.clear()
        self._tasks = [
            asyncio.create_task(make_sftp_handler(server, proc.stdout, proc.stdin).run()),
            asyncio.create_task(self._drain_stderr(proc)),
        ]
        try:
            await self._wait_mounted(conn, argv)
        except BaseException:
            await self.stop()
            raise
        log.info("workspace %s mounted at %s over sftp", self.workspace, self.mountpoint)

    async def ensure(self, conn: asyncssh.SSHClientConnection) -> bool:
        """Mount again if `conn` is a new connection or the guest's sshfs died; True when it re-mounted."""
        if conn is self._conn and self.active:
            return False
        await self.stop()
        await self.start(conn)
        return True

    async def stop(self) -> None:
        """Unmount in the guest (best effort), end sshfs and our server. Idempotent."""
        conn, proc, tasks = self._conn, self._proc, self._tasks
        self._conn, self._proc, self._tasks = None, None, []
        if proc is None:
            return
        if conn is not None and not conn.is_closed():
            with contextlib.suppress(Exception):
                await asyncio.wait_for(conn.run(stop_command(self.mountpoint), check=False), _STOP_SECONDS)
        proc.close()  # sshfs sees EOF on stdin and exits
        with contextlib.suppress(Exception):
            await asyncio.wait_for(proc.wait_closed(), _STOP_SECONDS)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _probe(self, conn: asyncssh.SSHClientConnection) -> bool:
        """Whether the guest's sshfs knows `no_contain_symlinks` (sshfs builds with the contain_symlinks default)."""
        result = await conn.run(shlex.join([self._sshfs, "-h"]), check=False)
        return "no_contain_symlinks" in f"{result.stdout}{result.stderr}"

    async def _drain_stderr(self, proc: asyncssh.SSHClientProcess[bytes]) -> None:
        # Unread stderr would fill the channel window and stall the SFTP stream that shares it.
        async for line in proc.stderr:
            text = line.decode(errors="replace").rstrip()
            self._stderr.append(text)
            log.debug("guest sshfs: %s", text)

    async def _wait_mounted(self, conn: asyncssh.SSHClientConnection, argv: list[str]) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._mount_timeout
        while True:
            if not self.active:
                await asyncio.sleep(_POLL_SECONDS)  # let stderr arrive before we quote it
                status = self._proc.exit_status if self._proc else None
                raise CommandError(argv, -1 if status is None else status, self.stderr_tail(), self._failed(status))
            result = await conn.run(MOUNTS_COMMAND, check=False)
            if is_mounted(str(result.stdout or ""), self.mountpoint):
                return
            if loop.time() > deadline:
                raise SandboxError(
                    f"the workspace did not appear at {self.mountpoint} in the guest within {self._mount_timeout:g}s",
                    hint="check that the guest has sshfs and /dev/fuse, or use the copy workspace mode",
                )
            await asyncio.sleep(_POLL_SECONDS)

    def _failed(self, status: int | None) -> str:
        tail = self.stderr_tail().splitlines()
        detail = f": {tail[-1]}" if tail else ""
        if status == 127:
            detail = ": sshfs is not installed in the guest"
        return f"mounting the workspace in the guest failed{detail}"
