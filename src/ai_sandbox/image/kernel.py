"""The `kernel` stage: the Debian cloud kernel of the base tree → compressed image, ELF vmlinux, initramfs."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from ai_sandbox import runner
from ai_sandbox.errors import BuildError
from ai_sandbox.image import initramfs

# Compressed payloads a bzImage may carry, and the tool that unpacks each (as Linux's extract-vmlinux does).
_PAYLOADS = (
    (b"\x1f\x8b\x08", ["gzip", "-dc"]),
    (b"\xfd7zXZ\x00", ["xz", "-dc"]),
    (b"\x02\x21\x4c\x18", ["lz4", "-dc"]),
    (b"\x28\xb5\x2f\xfd", ["zstd", "-dc"]),
)
ELF_MAGIC = b"\x7fELF"


def find_kernel(root: Path) -> tuple[Path, Path]:
    """The newest /boot/vmlinuz-* of the tree and its /lib/modules/<version> directory."""
    images = sorted((root / "boot").glob("vmlinuz-*"))
    if not images:
        raise BuildError(f"no kernel in {root}/boot: is the recipe's kernel package installed?")
    version = images[-1].name.removeprefix("vmlinuz-")
    return images[-1], root / "lib/modules" / version


def extract_vmlinux(bzimage: Path, out: Path) -> Path:
    """Unpack the ELF kernel from a compressed image (Firecracker boots ELF only on x86_64)."""
    blob = bzimage.read_bytes()
    with tempfile.TemporaryDirectory() as tmp:
        for magic, tool in _PAYLOADS:
            start = blob.find(magic)
            while start != -1:
                part = Path(tmp) / "payload"
                part.write_bytes(blob[start:])
                # Trailing bytes after the payload make the tools complain; the ELF check decides.
                runner.run([*tool, str(part)], stdout_file=out, check=False)
                if out.read_bytes()[:4] == ELF_MAGIC:
                    return out
                start = blob.find(magic, start + 1)
    out.unlink(missing_ok=True)
    raise BuildError(f"could not find an ELF kernel inside {bzimage}")


def build_kernel(base_root: Path, out: Path, init: Path, busybox: Path) -> dict[str, Path]:
    image, modules = find_kernel(base_root)
    kernel = out / "vmlinuz"
    shutil.copyfile(image, kernel)
    vmlinux = extract_vmlinux(kernel, out / "vmlinux")
    initrd = initramfs.build(init, busybox, modules, out / "initrd.img")
    return {"kernel": kernel, "vmlinux": vmlinux, "initrd": initrd}
