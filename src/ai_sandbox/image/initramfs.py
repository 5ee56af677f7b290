"""Our busybox initramfs, written as a newc cpio archive in Python (no cpio tool, no root-owned staging tree)."""

from __future__ import annotations

import gzip
import io
import stat
from dataclasses import dataclass
from pathlib import Path

# What the init needs to find and join the disks; everything else loads later from the real root.
MODULES = ("virtio_mmio", "virtio_blk", "overlay")


@dataclass(frozen=True)
class Entry:
    path: str  # inside the archive, without a leading slash
    mode: int  # including the file type bits
    data: bytes = b""
    rdev: tuple[int, int] = (0, 0)


def _header(ino: int, e: Entry) -> bytes:
    name = e.path.encode() + b"\0"
    fields = [ino, e.mode, 0, 0, 1, 0, len(e.data), 0, 0, e.rdev[0], e.rdev[1], len(name), 0]
    hdr = b"070701" + b"".join(f"{v:08x}".encode() for v in fields)
    pad = (4 - (len(hdr) + len(name)) % 4) % 4
    return hdr + name + b"\0" * pad


def cpio(entries: list[Entry]) -> bytes:
    out = io.BytesIO()
    for ino, e in enumerate([*entries, Entry("TRAILER!!!", 0)], start=1):
        out.write(_header(ino, e))
        out.write(e.data)
        out.write(b"\0" * ((4 - len(e.data) % 4) % 4))
    return out.getvalue()


def module_closure(modules_dir: Path, wanted: tuple[str, ...]) -> list[str]:
    """Module paths (relative to modules_dir) for `wanted` and their dependencies, dependencies first."""
    deps: dict[str, list[str]] = {}
    by_name: dict[str, str] = {}
    for line in (modules_dir / "modules.dep").read_text().splitlines():
        mod, _, rest = line.partition(":")
        deps[mod] = rest.split()
        by_name[Path(mod).name.split(".ko")[0].replace("-", "_")] = mod
    order: list[str] = []

    def visit(mod: str) -> None:
        for d in deps.get(mod, []):
            visit(d)
        if mod not in order:
            order.append(mod)

    for name in wanted:
        if name in by_name:
            visit(by_name[name])
        elif not (modules_dir / "modules.builtin").exists() or name not in (modules_dir / "modules.builtin").read_text():
            raise FileNotFoundError(f"kernel module {name} not found in {modules_dir}")
    return order


def _dirs(*paths: str) -> list[Entry]:
    return [Entry(p, stat.S_IFDIR | 0o755) for p in paths]


def build(init: Path, busybox: Path, modules_dir: Path, out: Path) -> Path:
    mods = module_closure(modules_dir, MODULES)
    entries = _dirs("bin", "dev", "etc", "lib", "lib/modules", "mnt", "mnt/base", "mnt/data", "newroot", "proc",
                    "sys", "run", "tmp")
    entries += [
        Entry("dev/console", stat.S_IFCHR | 0o600, rdev=(5, 1)),
        Entry("dev/null", stat.S_IFCHR | 0o666, rdev=(1, 3)),
        Entry("init", stat.S_IFREG | 0o755, init.read_bytes()),
        Entry("bin/busybox", stat.S_IFREG | 0o755, busybox.read_bytes()),
        Entry("bin/sh", stat.S_IFLNK | 0o777, b"busybox"),
    ]
    order = []
    for rel in mods:
        name = Path(rel).name
        data = (modules_dir / rel).read_bytes()
        if name.endswith(".xz"):  # trixie compresses modules; busybox insmod wants them plain
            import lzma

            data, name = lzma.decompress(data), name.removesuffix(".xz")
        entries.append(Entry(f"lib/modules/{name}", stat.S_IFREG | 0o644, data))
        order.append(name)
    entries.append(Entry("etc/modules.order", stat.S_IFREG | 0o644, "".join(f"{m}\n" for m in order).encode()))
    out.write_bytes(gzip.compress(cpio(entries), compresslevel=6, mtime=0))
    return out
