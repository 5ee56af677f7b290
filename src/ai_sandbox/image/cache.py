"""A content-addressed stage cache: each stage output lives under a key derived from a manifest of its inputs.

A stage is built in a temporary directory and renamed into place only after it succeeded, with its manifest
written last, so a failed stage never leaves an entry that a later build could reuse (mkosi-style).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

MANIFEST = "manifest.json"


def digest(inputs: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:20]


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def tree_digest(root: Path) -> str:
    """Digest of a small directory of files (names, modes and contents)."""
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            h.update(f"{p.relative_to(root)}:{p.stat().st_mode & 0o777:o}:".encode())
            h.update(file_digest(p).encode())
    return h.hexdigest()


class Cache:
    def __init__(self, root: Path) -> None:
        self.root = root

    def entry(self, stage: str, inputs: dict[str, Any]) -> Path:
        return self.root / "stages" / f"{stage}-{digest(inputs)}"

    def lookup(self, stage: str, inputs: dict[str, Any]) -> Path | None:
        path = self.entry(stage, inputs)
        return path if (path / MANIFEST).is_file() else None

    def log_file(self, recipe: str, stage: str) -> Path:
        return self.root / "logs" / f"{recipe}-{stage}.log"

    @contextlib.contextmanager
    def build(self, stage: str, inputs: dict[str, Any]) -> Iterator[Path]:
        """Yield an empty work directory; on success it becomes the stage's entry, on failure it is removed."""
        final = self.entry(stage, inputs)
        if final.exists():  # an entry without a manifest is a leftover of a failed build
            shutil.rmtree(final)
        work = final.with_name(f".{final.name}.tmp-{os.getpid()}")
        if work.exists():
            shutil.rmtree(work)
        work.mkdir(parents=True)
        try:
            yield work
            (work / MANIFEST).write_text(json.dumps({"stage": stage, "inputs": inputs}, indent=2, sort_keys=True))
            work.rename(final)
        finally:
            if work.exists():
                shutil.rmtree(work, ignore_errors=True)

    # The reason for a rebuild: compare with the inputs this recipe's stage was last built from.
    def _last(self, recipe: str, stage: str) -> Path:
        return self.root / "recipes" / recipe / f"{stage}.json"

    def record(self, recipe: str, stage: str, inputs: dict[str, Any]) -> None:
        path = self._last(recipe, stage)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(inputs, sort_keys=True))

    def why(self, recipe: str, stage: str, inputs: dict[str, Any]) -> str:
        """One line saying what changed since the last build of this stage."""
        try:
            old = json.loads(self._last(recipe, stage).read_text())
        except (OSError, ValueError):
            return "never built"
        changed = sorted(k for k in set(old) | set(inputs) if old.get(k) != inputs.get(k))
        return "changed: " + ", ".join(changed) if changed else "entry missing from the cache"

    def clean(self) -> None:
        if self.root.exists():
            shutil.rmtree(self.root)
