"""Who owns, on the host, the files the guest user writes into the workspace.

Run unprivileged, the share helpers act as the invoking user and nothing else is possible. Run as root (for
example `sudo ./ai`), the guest user has the uid/gid of the user behind sudo (see `sandbox.guest_ids`), and the
files it writes must belong to that user, not to root. Only a workspace that root itself owns keeps root's files;
one owned by somebody else (root without sudo in another user's directory) gets that user's files. The share
helpers then run as that owner (virtiofsd in a user namespace where it is the guest user, see `share.virtiofs`),
never as root with the guest's choice of ids.
"""

from __future__ import annotations

import os
from pathlib import Path

from ai_sandbox import privileges


def files_owner(workspace: Path, guest: tuple[int, int]) -> tuple[int, int]:
    """The host uid/gid that the guest user's new workspace files get."""
    if os.geteuid() != 0:
        return os.getuid(), os.getgid()
    st = os.stat(workspace)
    if st.st_uid == 0:
        return 0, 0
    if st.st_uid == guest[0]:
        return guest
    return st.st_uid, st.st_gid  # the owner can reach it; the guest's uid on the host may not even exist


def drop_to(owner: tuple[int, int]) -> None:
    """Become `owner` for good (see `ai_sandbox.privileges`), asyncssh fully loaded first (the share serves SFTP)."""
    privileges.drop_to(*owner, packages=("asyncssh",))
