"""The one rule for symlinks the guest leaves in a host workspace (copy merge and sftp share alike)."""

from __future__ import annotations


def link_stays_inside(target: str, depth: int) -> bool:
    """A symlink `depth` directories below the workspace root resolves inside it, whatever the other links are.

    Only a leading run of `..` is allowed, no deeper than the link itself: a `..` after a name could climb out of
    a directory that is itself a link (`x -> .`, then `x/../..`), and an absolute target leaves at once.
    """
    if not target or target.startswith("/") or "\0" in target:
        return False
    parts = [p for p in target.split("/") if p not in ("", ".")]
    ups = 0
    for i, part in enumerate(parts):
        if part == "..":
            if i != ups:
                return False
            ups += 1
    return ups <= depth
