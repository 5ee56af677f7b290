"""A content-addressed stage cache: each stage output lives under a key derived from a manifest of its inputs.

A stage is built in a temporary directory and renamed into place only after it succeeded, with its manifest
written last, so a failed stage never leaves an entry that a later build could reuse (mkosi-style).
"""

from __future__ import annotations

import ast
import contextlib
import hashlib
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

MANIFEST = "manifest.json"
PACKAGE = "ai_sandbox"
_PACKAGE_DIR = Path(__file__).resolve().parents[1]


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


def _module_file(name: str) -> Path | None:
    """The source file of an ai_sandbox module (None for names that are not modules of the package)."""
    rel = Path(*name.split(".")[1:])
    for path in (_PACKAGE_DIR / rel / "__init__.py", (_PACKAGE_DIR / rel).with_suffix(".py")):
        if path.is_file():
            return path
    return None


def _imports(name: str, path: Path) -> set[str]:
    """The ai_sandbox modules (and packages) one module's source imports, read with ast, never executed."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_bytes(), str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                parent = ".".join(parts[: len(parts) - node.level + 1])
                base = f"{parent}.{base}" if base else parent
            found.add(base)
            found.update(f"{base}.{a.name}" for a in node.names)  # `from pkg import mod` names a module
    out = set()
    for mod in found:
        parts = mod.split(".")
        if parts[0] == PACKAGE:  # the module and the packages it sits in, whose __init__ runs first
            out.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))
    return out


def module_closure(*names: str) -> dict[str, Path]:
    """The named ai_sandbox modules and every ai_sandbox module they import, transitively."""
    todo, seen = [".".join(n.split(".")[:i]) for n in names for i in range(1, n.count(".") + 2)], {}
    while todo:
        name = todo.pop()
        path = _module_file(name) if name not in seen else None
        if path is not None:
            seen[name] = path
            todo.extend(_imports(name, path) - set(seen))
    return seen


def code_digest(*names: str) -> str:
    """Digest of the source of these modules and all the package code they import: a stage's code as an input."""
    return digest({name: file_digest(path) for name, path in sorted(module_closure(*names).items())})


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
