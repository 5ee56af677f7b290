"""Pid files and process checks shared by the drivers (status is derived, never stored)."""

from __future__ import annotations

import contextlib
import os
import signal
import time
from pathlib import Path


def read_pid(pid_file: Path) -> int | None:
    try:
        return int(pid_file.read_text().strip())
    except (OSError, ValueError):
        return None


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie child still answers signal 0; treat it as gone.
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def alive_from(pid_file: Path) -> bool:
    """True when the pid file names a live process."""
    pid = read_pid(pid_file)
    return pid is not None and alive(pid)


def runs(pid: int, marker: str | Path) -> bool:
    """True when `pid` is alive and its command line has `marker` (a path only that process was given, such as
    its own pid file) as one argument or inside one: a pid file can outlive its process, and the pid be reused."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            args = fh.read().split(b"\0")
    except OSError:
        return False
    mark = os.fsencode(marker)
    return alive(pid) and any(mark in a for a in args)


def wait_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not alive(pid):
            return True
        with contextlib.suppress(ChildProcessError, OSError):
            os.waitpid(pid, os.WNOHANG)
        time.sleep(0.05)
    return not alive(pid)


def kill(pid: int, timeout: float = 5.0) -> None:
    """SIGTERM, then SIGKILL; idempotent, and checks that the process is gone afterwards."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
        if wait_gone(pid, timeout):
            return


def remove(*paths: Path) -> None:
    for p in paths:
        with contextlib.suppress(FileNotFoundError):
            p.unlink()


def read_tail(path: Path, limit: int) -> bytes:
    """The last `limit` bytes of a file written from guest output (never through a symlink); b"" if missing."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except (FileNotFoundError, NotADirectoryError):
        return b""
    with os.fdopen(fd, "rb") as fh:
        size = os.fstat(fd).st_size
        fh.seek(max(0, size - limit))
        return fh.read(limit)


def cap_log(path: Path, limit: int, keep: int) -> bool:
    """Cut a log that grew past `limit` bytes down to its last `keep` bytes, in place; True when it did.

    The writers (QEMU's console chardev with append=on, the runner's "ab" log files) append with O_APPEND, so
    they carry on at the new end instead of leaving a hole."""
    try:
        if os.lstat(path).st_size <= limit:
            return False
    except FileNotFoundError:
        return False
    tail = read_tail(path, keep)
    fd = os.open(path, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        os.ftruncate(fd, 0)
        os.write(fd, tail)
    finally:
        os.close(fd)
    return True
