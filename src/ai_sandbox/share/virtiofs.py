"""virtiofs workspace (QEMU): a virtiofsd per sandbox serving the workspace on a vhost-user socket.

virtiofsd creates files with the uid/gid the guest asks for. Run as root it never runs as host root with the
guest's ids: it runs as the workspace's owner (`share.owner`), in a user namespace of its own where the owner's
uid/gid are the guest user's and NO other id exists. Guest root (uid 0) and every other guest id are unmapped
there, so guest root cannot create, chown to or setuid anything but the owner's files; the user namespace gives
no right to make device nodes, and the capabilities virtiofsd keeps lose mknod, setfcap and fsetid. The guest's
`security.*` xattrs never reach the host (`XATTRMAP`). We bind the socket and hand virtiofsd its fd (the owner
may not be able to write the instance directory).
"""

from __future__ import annotations

import os
import shutil
import socket as sockets
import time
from contextlib import closing
from pathlib import Path

from ai_sandbox import runner
from ai_sandbox.errors import SandboxError, VMError
from ai_sandbox.share import owner
from ai_sandbox.vmm import process

CANDIDATES = ("/usr/libexec/virtiofsd", "/usr/lib/qemu/virtiofsd")
TAG = "workspace"
# First matching rule wins; every name must match one. Guests' `security.` names are refused (EPERM) and the
# host's hidden, except that `security.capability` must map to itself: virtiofsd will not start if it cannot
# map it, and a renamed one makes every path-based chown fail (it then removes the renamed xattr through an O_PATH
# fd: EBADF). Setting the real one stays impossible: no setfcap (MODCAPS), and a file capability written from a
# user namespace names that namespace's root, which is unmapped (EINVAL).
XATTRMAP = ":ok:client:security.capability:::bad:all:security.:::ok:all:::"
MODCAPS = "-mknod:-setfcap:-fsetid"  # from virtiofsd's default set (chown, dac_override, fowner, setuid/gid, ...)
MARK = "AI_SANDBOX_VIRTIOFS"  # env var naming the socket: with --fd, virtiofsd's argv has no path to know it by
READY = b"Waiting for vhost-user socket connection"


def binary() -> str | None:
    found = shutil.which("virtiofsd")
    return found or next((c for c in CANDIDATES if os.access(c, os.X_OK)), None)


def _daemon(source: Path) -> list[str]:
    exe = binary()
    if exe is None:
        raise SandboxError("virtiofsd is not installed", hint="apt-get install qemu-system-x86 (or virtiofsd)")
    return [exe, "-o", f"source={source}", "-o", "cache=auto", "-o", "no_posix_lock", "-o", f"xattrmap={XATTRMAP}",
            "-o", f"modcaps={MODCAPS}"]


def confine(guest: tuple[int, int], files: tuple[int, int]) -> list[str]:
    """The argv prefix run as root: become `files` (the workspace owner; root stays root), then a new user
    namespace where that uid/gid is the guest user's and the only ids mapped (`--map-user` maps the caller's own
    ids: no subuid ranges needed), keeping the namespace's capabilities across exec for virtiofsd."""
    become = [f"--reuid={files[0]}", f"--regid={files[1]}"] if files[0] != 0 else []
    return ["setpriv", *become, "--clear-groups", "--",
            "unshare", "--user", f"--map-user={guest[0]}", f"--map-group={guest[1]}", "--keep-caps", "--"]


def argv(source: Path, guest: tuple[int, int], files: tuple[int, int], *, fd: int | None = None,
         socket: Path | None = None) -> list[str]:
    """virtiofsd's argv: as root (`fd`, a listening socket we bound) confined as above; else (`socket`, the path
    it binds) as the invoking user, whose own ids are all it has."""
    if fd is not None:
        return [*confine(guest, files), *_daemon(source), f"--fd={fd}"]
    return [*_daemon(source), f"--socket-path={socket}"]


def _listen(path: Path) -> sockets.socket:
    sock = sockets.socket(sockets.AF_UNIX, sockets.SOCK_STREAM)
    try:
        sock.bind(str(path))
        os.chmod(path, 0o600)  # only root (QEMU) connects
        sock.listen(1)
    except OSError:
        sock.close()
        raise
    return sock


def _logged_since(log_file: Path, offset: int, limit: int = 65536) -> bytes:
    fd = os.open(log_file, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    with os.fdopen(fd, "rb") as fh:
        fh.seek(offset)
        return fh.read(limit)


def start(source: Path, socket: Path, pid_file: Path, log_file: Path, guest: tuple[int, int]) -> int:
    process.remove(socket)
    files = owner.files_owner(source, guest)
    if os.geteuid() != 0:
        proc = runner.spawn(argv(source, guest, files, socket=socket), log_file=log_file)
        ready = socket.exists
    else:
        start_at = log_file.stat().st_size if log_file.exists() else 0
        with closing(_listen(socket)) as sock:
            try:
                proc = runner.spawn(argv(source, guest, files, fd=sock.fileno()), log_file=log_file,
                                    pass_fds=(sock.fileno(),), extra_env={MARK: str(socket)})
            except BaseException:
                process.remove(socket)
                raise

        def ready() -> bool:
            return READY in _logged_since(log_file, start_at)

    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            process.remove(socket)
            raise VMError("virtiofsd exited at start", log=str(log_file))
        if ready():
            pid_file.write_text(f"{proc.pid}\n")
            return proc.pid
        time.sleep(0.05)
    process.kill(proc.pid)
    process.remove(socket)
    raise VMError("virtiofsd did not open its socket", log=str(log_file))


def _ours(pid: int, socket: Path) -> bool:
    """`pid` is the virtiofsd given this socket (not a reused pid): by its argv, or by the MARK in its env."""
    if process.runs(pid, socket):
        return True
    try:
        with open(f"/proc/{pid}/environ", "rb") as fh:
            env = fh.read(1 << 20).split(b"\0")
    except OSError:
        return False
    return process.alive(pid) and os.fsencode(f"{MARK}={socket}") in env


def stop(socket: Path, pid_file: Path) -> None:
    pid = process.read_pid(pid_file)
    if pid is not None and _ours(pid, socket):
        process.kill(pid, timeout=3)
    process.remove(socket, pid_file)
