"""virtiofs workspace (QEMU): a virtiofsd per sandbox serving the workspace on a vhost-user socket.

virtiofsd creates files with the requesting guest uid, and the guest user has the invoking user's uid,
so files keep their owner on both sides; as root, `argv` maps the guest user to the right host owner.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

from ai_sandbox import runner
from ai_sandbox.errors import SandboxError, VMError
from ai_sandbox.share import owner
from ai_sandbox.vmm import process

CANDIDATES = ("/usr/libexec/virtiofsd", "/usr/lib/qemu/virtiofsd")
TAG = "workspace"


def binary() -> str | None:
    found = shutil.which("virtiofsd")
    return found or next((c for c in CANDIDATES if os.access(c, os.X_OK)), None)


def argv(source: Path, socket: Path, guest: tuple[int, int], owner: tuple[int, int]) -> list[str]:
    """virtiofsd's argv; the guest user's files get `owner`'s uid/gid on the host (see share.owner)."""
    exe = binary()
    if exe is None:
        raise SandboxError("virtiofsd is not installed", hint="apt-get install qemu-system-x86 (or virtiofsd)")
    cmd = [exe, f"--socket-path={socket}", "-o", f"source={source}", "-o", "cache=auto", "-o", "no_posix_lock",
           "-o", "xattr"]
    if owner != guest:
        # virtiofsd creates files with the requester's uid/gid and this virtiofsd has no id mapping of its own, so
        # it runs in a user namespace where the guest user's ids *are* the owner's (root: the guest user is 1000).
        cmd = ["unshare", "--user", f"--map-users={owner[0]},{guest[0]},1", f"--map-groups={owner[1]},{guest[1]},1",
               "--keep-caps", "--", *cmd]
    return cmd


def start(source: Path, socket: Path, pid_file: Path, log_file: Path, guest: tuple[int, int]) -> int:
    process.remove(socket)
    proc = runner.spawn(argv(source, socket, guest, owner.files_owner(source, guest)), log_file=log_file)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise VMError("virtiofsd exited at start", log=str(log_file))
        if socket.exists():
            pid_file.write_text(f"{proc.pid}\n")
            return proc.pid
        time.sleep(0.05)
    process.kill(proc.pid)
    raise VMError("virtiofsd did not open its socket", log=str(log_file))


def stop(socket: Path, pid_file: Path) -> None:
    pid = process.read_pid(pid_file)
    if pid is not None and process.runs(pid, socket):  # not a reused pid: ours was given this socket
        process.kill(pid, timeout=3)
    process.remove(socket, pid_file)
