"""Copy mode's pure half: what a path was (`Entry`), what to do (`Action`), what happened (`SyncReport`), and the
three-way plan from the manifest taken at start, the host's now and the guest's now. No I/O here (see `copy`)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Literal

CONFLICT_TAG = ".guest-conflict-"
Kind = Literal["file", "link", "dir"]


@dataclass(frozen=True)
class Entry:
    """One path as recorded: `digest` is the sha256 of a file's content or of a link's target ("" for dirs)."""

    kind: Kind
    size: int = 0
    mtime_ns: int = 0
    digest: str = ""
    mode: int = 0  # permission bits of a file: `chmod +x` in the guest is a change too

    def same(self, other: Entry | None) -> bool:
        return other is not None and (self.kind, self.digest, self.mode) == (other.kind, other.digest, other.mode)


Manifest = dict[str, Entry]  # workspace-relative POSIX path -> entry


@dataclass(frozen=True)
class Action:
    """One step of a sync: `path` in the guest tree, `dest` on the host (differs only for conflict copies)."""

    op: Literal["copy", "delete", "conflict"]
    path: str
    kind: Kind
    dest: str
    expect: Entry | None = None  # what the host had when planned; checked again right before changing it


@dataclass
class SyncReport:
    copied: list[str] = field(default_factory=list)
    deleted: list[str] = field(default_factory=list)
    conflicts: list[tuple[str, str]] = field(default_factory=list)  # (path, where the guest version was put)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, why)
    kept: str = ""  # where the guest's image was kept because entries were skipped

    def summary(self) -> str:
        counts = (len(self.copied), len(self.deleted), len(self.conflicts), len(self.skipped))
        text = "{} copied, {} deleted, {} conflicts, {} skipped".format(*counts)
        if self.skipped:
            names = ", ".join(_shown(p) for p, _ in self.skipped[:5]) + (", ..." if len(self.skipped) > 5 else "")
            text += f" ({names})"
        if self.kept:
            text += f"; the guest's image is kept at {self.kept}"
        return text


def _shown(text: str) -> str:
    """A guest name on one line: control characters and undecodable bytes shown as escapes (the CLI escapes
    markup when it prints, for every message alike)."""
    text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


# -- planning (pure) ------------------------------------------------------------------------------------------------


def conflict_stamp(now: float | None = None) -> str:
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(time.time() if now is None else now))


def _same(a: Entry | None, b: Entry | None) -> bool:
    return (a is None and b is None) or (a is not None and a.same(b))


def _conflict_name(path: str, stamp: str, taken: set[str]) -> str:
    base = f"{path}{CONFLICT_TAG}{stamp}"
    name, n = base, 1
    while name in taken:
        n += 1
        name = f"{base}-{n}"
    taken.add(name)
    return name


def plan_sync(start: Manifest, host_now: Manifest, guest_now: Manifest, *, stamp: str | None = None) -> list[Action]:
    """The three-way merge of the guest's changes into the host, as actions in path order (parents first)."""
    stamp = stamp or conflict_stamp()
    taken = set(host_now) | set(guest_now)
    moved: dict[str, str] = {}  # guest dirs that cannot land in place -> where their changed contents go
    actions: list[Action] = []
    for path in sorted(set(start) | set(host_now) | set(guest_now)):
        s, h, g = start.get(path), host_now.get(path), guest_now.get(path)
        if _same(s, g):
            continue  # the guest left it alone: the host's version wins, even a deletion
        under = next((p for p in ancestors(path) if p in moved), None)
        if under is None and g is not None and (blocked := _blocked(path, start, host_now, guest_now)):
            under = blocked
            moved[blocked] = _conflict_name(blocked, stamp, taken)
            actions.append(Action("conflict", blocked, "dir", moved[blocked]))
        if under is not None:
            if g is not None:
                actions.append(Action("conflict", path, g.kind, moved[under] + path[len(under) :]))
        elif _same(h, g):
            continue  # both made the same change
        elif _same(s, h):  # only the guest changed it
            if h is not None and (g is None or g.kind != h.kind):
                actions.append(Action("delete", path, h.kind, path, h))
            if g is not None:
                actions.append(Action("copy", path, g.kind, path, h if h and h.kind == g.kind else None))
        elif g is not None:  # both changed it, differently (a host deletion counts): keep both
            dest = _conflict_name(path, stamp, taken)
            actions.append(Action("conflict", path, g.kind, dest))
            if g.kind == "dir":
                moved[path] = dest
        # else: the guest deleted what the host changed; the host's version stays
    return actions


def _blocked(path: str, start: Manifest, host_now: Manifest, guest_now: Manifest) -> str | None:
    """The topmost ancestor the host turned into a non-directory, which the guest's change cannot go through."""
    for parent in reversed(ancestors(path)):
        h = host_now.get(parent)
        if h is None or h.kind == "dir":
            continue
        g = guest_now.get(parent)
        if not (_same(start.get(parent), h) and g is not None and g.kind == "dir"):  # else the plan swaps in a dir
            return parent
    return None


def ancestors(path: str) -> list[str]:
    return [str(p) for p in PurePosixPath(path).parents if str(p) != "."]
