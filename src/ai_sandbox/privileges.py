"""Giving up root for good: the one way host code that reads guest-controlled data leaves root.

After the drop the process may no longer read its own interpreter's files (a Python under /root, as pyenv puts it,
is root's alone), so modules that libraries import lazily are imported first.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import pkgutil
from collections.abc import Iterable

# Standard-library modules that asyncio, ssl, asyncssh, dnspython and h11 import on first use, not at import time.
LAZY_STDLIB = ("encodings.idna", "encodings.ascii", "encodings.latin_1", "concurrent.futures.thread", "uuid",
               "secrets", "pty", "tty", "getpass", "hmac", "zlib", "bz2", "lzma", "email.utils", "calendar",
               "unicodedata", "stringprep", "netrc", "shlex", "glob", "fnmatch")


def preload(packages: Iterable[str] = ()) -> None:
    """Import the lazy standard-library modules and every submodule of `packages` (ones that fail are skipped)."""
    for name in LAZY_STDLIB:
        with contextlib.suppress(ImportError):
            importlib.import_module(name)
    for pkg in packages:
        mod = importlib.import_module(pkg)
        for info in pkgutil.walk_packages(getattr(mod, "__path__", []), f"{pkg}."):
            with contextlib.suppress(Exception):  # optional extras (a missing C library) are not ours to need
                importlib.import_module(info.name)


def drop_to(uid: int, gid: int, *, packages: Iterable[str] = ()) -> None:
    """Become uid:gid for good (real, effective and saved ids; no supplementary groups), checked; no-op unless
    we are root and `uid` is not 0 (a root-owned workspace only root can write)."""
    if os.geteuid() != 0 or uid == 0:
        return
    preload(packages)
    os.setgroups([])
    os.setresgid(gid, gid, gid)
    os.setresuid(uid, uid, uid)
    try:
        os.setuid(0)
    except PermissionError:
        return
    raise PermissionError(f"privileges could not be dropped to {uid}:{gid}")
