"""Read a guest-written ext4 image into a staging tree without trusting its names, links or sizes.

debugfs (e2fsprogs, the reference ext4 code) reads the image, but only ever by inode number (`<12>`) and only into
file names this module chooses; guest names never reach a debugfs command or a host path unchecked. Directories
are dumped raw and their entries parsed here (exact bytes: a name with `/`, a newline or NUL cannot forge a line),
inodes are read with `idump` (hex, so nothing the guest wrote is parsed as text). Every name is checked, every file
is created relative to its directory's fd with O_NOFOLLOW, file bytes are capped near the image's used size, files
that are sparse in the image stay sparse, hard links stay links, symlinks are created (never followed) and anything
that cannot be placed is listed with the reason. Meant to run as an unprivileged user (see `copy_worker`).
"""

from __future__ import annotations

import contextlib
import os
import re
import stat
import struct
from dataclasses import dataclass, field
from pathlib import Path

from ai_sandbox import runner
from ai_sandbox.share.copy import copy_sparse, walk_fd

NAME_MAX = 255
PATH_MAX = 4000  # bytes of a workspace-relative path
DEPTH_MAX = 200
SLACK = 1 << 20  # on top of the image's used bytes
ROOT_INO = 2
_NOFOLLOW_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


class Refused(Exception):
    """An entry the host will not create; the message says why."""


def check_name(raw: bytes) -> str:
    """One directory-entry name as a host file name, or Refused."""
    if not raw or raw in (b".", b".."):
        raise Refused("empty, '.' or '..' as a name")
    if b"/" in raw or b"\0" in raw:
        raise Refused("name contains '/' or NUL")
    if len(raw) > NAME_MAX:
        raise Refused(f"name longer than {NAME_MAX} bytes")
    return os.fsdecode(raw)


def check_link_target(raw: bytes) -> str:
    if not raw or b"\0" in raw or len(raw) > PATH_MAX:
        raise Refused("symlink target empty, too long or containing NUL")
    return os.fsdecode(raw)


# -- the image's own structures -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Super:
    block_size: int
    blocks: int
    free_blocks: int
    inode_size: int

    @property
    def used_bytes(self) -> int:
        return max(0, self.blocks - self.free_blocks) * self.block_size


def read_super(image: Path) -> Super:
    with image.open("rb") as fh:
        fh.seek(1024)
        sb = fh.read(1024)
    if len(sb) < 1024 or struct.unpack_from("<H", sb, 0x38)[0] != 0xEF53:
        raise Refused("not an ext2/3/4 filesystem")
    log_block, = struct.unpack_from("<I", sb, 0x18)
    if log_block > 6:
        raise Refused("block size out of range")
    is64 = struct.unpack_from("<I", sb, 0x60)[0] & 0x80
    blocks = struct.unpack_from("<I", sb, 0x04)[0] | ((struct.unpack_from("<I", sb, 0x150)[0] << 32) if is64 else 0)
    free = struct.unpack_from("<I", sb, 0x0C)[0] | ((struct.unpack_from("<I", sb, 0x158)[0] << 32) if is64 else 0)
    inode_size = struct.unpack_from("<H", sb, 0x58)[0] if struct.unpack_from("<I", sb, 0x4C)[0] else 128
    return Super(1024 << log_block, blocks, free, inode_size or 128)


@dataclass(frozen=True)
class Inode:
    mode: int
    size: int
    blocks512: int
    mtime_ns: int
    i_block: bytes

    @classmethod
    def parse(cls, raw: bytes) -> Inode:
        if len(raw) < 128:
            raise Refused("inode unreadable")
        mode, = struct.unpack_from("<H", raw, 0)
        size = struct.unpack_from("<I", raw, 4)[0] | (struct.unpack_from("<I", raw, 0x6C)[0] << 32)
        mtime, = struct.unpack_from("<i", raw, 0x10)
        nsec = 0
        if len(raw) >= 0x8C and struct.unpack_from("<H", raw, 0x80)[0] >= 0x0C:
            extra, = struct.unpack_from("<I", raw, 0x88)
            mtime += (extra & 3) << 32
            nsec = min(extra >> 2, 999_999_999)
        blocks = struct.unpack_from("<I", raw, 0x1C)[0] | (struct.unpack_from("<H", raw, 0x74)[0] << 32)
        return cls(mode, size, blocks * 512, mtime * 1_000_000_000 + nsec, raw[0x28:0x28 + 60])


_HEX_LINE = re.compile(r"([0-7]{4,8})  ((?:[0-9a-f]{4} ){8})")


def parse_idump(lines: list[str], inode_size: int) -> bytes:
    """debugfs `idump` output (octal offset, 16 bytes as hex, `*` for repeats) back into the raw inode."""
    out = bytearray()
    last = b""
    repeat = False
    for line in lines:
        if line.strip() == "*":
            repeat = True
            continue
        m = _HEX_LINE.match(line)
        if not m:
            continue
        offset = int(m.group(1), 8)
        if repeat:
            while len(out) < offset:
                out += last
            repeat = False
        if offset != len(out):
            raise Refused("inode dump out of order")
        last = bytes.fromhex(m.group(2).replace(" ", ""))
        out += last
    if repeat:
        while len(out) < inode_size:
            out += last
    return bytes(out[:inode_size])


def parse_dirents(data: bytes, block_size: int) -> list[tuple[int, bytes]]:
    """The (inode, name) pairs of a raw ext2/3/4 directory; htree index blocks read as empty entries."""
    entries = []
    for start in range(0, len(data), block_size):
        pos, end = start, min(start + block_size, len(data))
        while pos + 8 <= end:
            ino, rec_len, name_len = struct.unpack_from("<IHB", data, pos)
            if rec_len == 0 or rec_len == 65535:
                rec_len = block_size  # 64 KiB blocks encode their length this way
            if rec_len < 8 or pos + rec_len > end or 8 + name_len > rec_len:
                raise Refused("directory block is corrupt")
            if ino:
                entries.append((ino, bytes(data[pos + 8:pos + 8 + name_len])))
            pos += rec_len
    return entries


# -- debugfs, by inode number only ----------------------------------------------------------------------------------


def debugfs(image: Path, commands: list[str], cwd: Path, timeout: float = 600) -> dict[str, list[str]]:
    """Run a batch of requests; returns each request's output lines, keyed by the request."""
    if not commands:
        return {}
    script = cwd / "requests"
    script.write_text("\n".join(commands) + "\n")
    result = runner.run(["debugfs", "-f", script.name, str(image)], cwd=cwd, timeout=timeout)
    sections: dict[str, list[str]] = {}
    current: list[str] = []
    for line in result.stdout.splitlines():
        if line.startswith("debugfs: "):
            current = sections.setdefault(line[len("debugfs: "):], [])
        else:
            current.append(line)
    return sections


# -- building the staging tree --------------------------------------------------------------------------------------


@dataclass
class Extraction:
    skipped: list[tuple[str, str]] = field(default_factory=list)
    files: int = 0
    bytes_written: int = 0


def _kind(mode: int) -> str:
    fmt = stat.S_IFMT(mode)
    names = {stat.S_IFDIR: "dir", stat.S_IFREG: "file", stat.S_IFLNK: "link", stat.S_IFIFO: "fifo",
             stat.S_IFCHR: "character device", stat.S_IFBLK: "block device", stat.S_IFSOCK: "socket"}
    return names.get(fmt, "unknown type")


class _Reader:
    def __init__(self, image: Path, work: Path, sb: Super, budget: int) -> None:
        self.image, self.work, self.sb, self.budget = image, work, sb, budget
        self.blobs = work / "blobs"
        self.blobs.mkdir(mode=0o700)
        self.inodes: dict[int, Inode] = {}
        self.placed: dict[int, str] = {}  # regular-file inode -> its blob's name
        self.refused: dict[int, str] = {}  # inode -> why none of its names is created
        self.spent = 0
        self.out = Extraction()

    def load_inodes(self, inos: list[int]) -> None:
        wanted = [i for i in dict.fromkeys(inos) if i not in self.inodes]
        got = debugfs(self.image, [f"idump <{i}>" for i in wanted], self.work)
        for ino in wanted:
            with contextlib.suppress(Refused, struct.error):
                self.inodes[ino] = Inode.parse(parse_idump(got.get(f"idump <{ino}>", []), self.sb.inode_size))

    def take(self, ino: int, size: int) -> None:
        if self.spent + size > self.budget:
            raise Refused(f"{size} bytes would pass the cap of {self.budget} (the image's used size)")
        self.spent += size

    def dump(self, inos: list[int]) -> None:
        """Dump regular files, slow symlinks and directories, each into blobs/<ino>, within the budget."""
        batch = []
        for ino in inos:
            if ino in self.placed or ino in self.refused:
                continue
            try:
                self.take(ino, self.inodes[ino].size)
            except Refused as e:
                self.refused[ino] = str(e)
                continue
            batch.append(ino)
        debugfs(self.image, [f"dump <{i}> blobs/{i}" for i in batch], self.work)
        for ino in batch:
            inode = self.inodes[ino]
            try:
                fd = os.open(str(ino), os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=self._blobs_fd())
            except OSError:
                self.refused[ino] = "could not be read from the image"
                continue
            try:
                if os.fstat(fd).st_size != inode.size or not stat.S_ISREG(os.fstat(fd).st_mode):
                    self.refused[ino] = "could not be read from the image (short or corrupt)"
                    continue
                if stat.S_ISREG(inode.mode) and inode.blocks512 < inode.size:
                    self._make_sparse(ino, fd)
                if stat.S_ISREG(inode.mode):
                    os.fchmod(fd, (stat.S_IMODE(inode.mode) & 0o777) | 0o400)
                    os.utime(fd, ns=(inode.mtime_ns, inode.mtime_ns))
                    self.out.bytes_written += os.fstat(fd).st_blocks * 512
                self.placed[ino] = str(ino)
            finally:
                os.close(fd)

    def _make_sparse(self, ino: int, fd: int) -> None:
        tmp = os.open(f"{ino}.sparse", os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600,
                      dir_fd=self._blobs_fd())
        try:
            os.lseek(fd, 0, os.SEEK_SET)
            copy_sparse(fd, tmp, self.sb.block_size)
        finally:
            os.close(tmp)
        os.replace(f"{ino}.sparse", str(ino), src_dir_fd=self._blobs_fd(), dst_dir_fd=self._blobs_fd())

    _bfd: int | None = None

    def _blobs_fd(self) -> int:
        if self._bfd is None:
            self._bfd = os.open(self.blobs, _NOFOLLOW_DIR)
        return self._bfd

    def read_blob(self, ino: int, limit: int) -> bytes:
        fd = os.open(self.placed[ino], os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=self._blobs_fd())
        try:
            return os.read(fd, limit + 1)
        finally:
            os.close(fd)

    def entries(self, ino: int) -> list[tuple[int, bytes]]:
        if ino not in self.placed:
            raise Refused(self.refused.get(ino, "directory could not be read"))
        data = self.read_blob(ino, self.inodes[ino].size)
        return parse_dirents(data, self.sb.block_size)


def extract(image: Path, work: Path, tree: Path) -> Extraction:
    """Fill the new directory `tree` from `image`; `work` is a private scratch directory beside it."""
    sb = read_super(image)
    budget = min(sb.used_bytes, image.stat().st_size) + SLACK
    reader = _Reader(image, work, sb, budget)
    os.mkdir(tree, 0o700)
    root_fd = os.open(tree, _NOFOLLOW_DIR)
    seen_dirs = {ROOT_INO}
    level = [(ROOT_INO, "")]
    reader.load_inodes([ROOT_INO])
    try:
        while level:
            reader.dump([ino for ino, _ in level if ino in reader.inodes])
            listing: list[tuple[str, list[tuple[int, bytes]]]] = []
            for ino, rel in level:
                try:
                    listing.append((rel, reader.entries(ino)))
                except Refused as e:
                    reader.out.skipped.append((rel or ".", f"directory not read: {e}"))
            reader.load_inodes([i for _, ents in listing for i, _ in ents])
            reader.dump([i for _, ents in listing for i, _ in ents
                         if i in reader.inodes and (stat.S_ISREG(reader.inodes[i].mode) or _slow_link(reader.inodes[i]))])
            level = []
            for rel, ents in listing:
                level += _place(reader, root_fd, rel, ents, seen_dirs)
    finally:
        os.close(root_fd)
        if reader._bfd is not None:
            os.close(reader._bfd)
    return reader.out


def _slow_link(inode: Inode) -> bool:
    return stat.S_ISLNK(inode.mode) and inode.size >= 60


def _place(reader: _Reader, root_fd: int, rel_dir: str, ents: list[tuple[int, bytes]], seen_dirs: set[int]
           ) -> list[tuple[int, str]]:
    """Create one directory's entries in the staging tree; returns the subdirectories to read next."""
    subdirs = []
    dir_fd = walk_fd(root_fd, rel_dir)
    try:
        for ino, raw in ents:
            if raw in (b".", b".."):
                continue  # structure, not content
            shown_rel = f"{rel_dir}/{os.fsdecode(raw)}" if rel_dir else os.fsdecode(raw)
            try:
                name = check_name(raw)
                rel = f"{rel_dir}/{name}" if rel_dir else name
                if len(os.fsencode(rel)) > PATH_MAX or rel.count("/") >= DEPTH_MAX:
                    raise Refused("path too long or too deep")
                inode = reader.inodes.get(ino)
                if inode is None:
                    raise Refused("inode unreadable")
                if ino in reader.refused:
                    raise Refused(reader.refused[ino])
                kind = _kind(inode.mode)
                if kind == "dir":
                    if ino in seen_dirs:
                        raise Refused("directory linked a second time")
                    seen_dirs.add(ino)
                    os.mkdir(name, 0o700, dir_fd=dir_fd)
                    subdirs.append((ino, rel))
                elif kind == "file":
                    os.link(reader.placed[ino], name, src_dir_fd=reader._blobs_fd(), dst_dir_fd=dir_fd,
                            follow_symlinks=False)  # a second name of the same inode: a hard link, as in the guest
                    reader.out.files += 1
                elif kind == "link":
                    target = reader.read_blob(ino, PATH_MAX) if _slow_link(inode) else inode.i_block[: inode.size]
                    os.symlink(check_link_target(target), name, dir_fd=dir_fd)
                else:
                    raise Refused(f"{kind} not copied")
            except FileExistsError:
                reader.out.skipped.append((shown_rel, "a second entry with the same name"))
            except (Refused, OSError, KeyError) as e:
                reader.out.skipped.append((shown_rel, str(e) or type(e).__name__))
    finally:
        os.close(dir_fd)
    return subdirs
