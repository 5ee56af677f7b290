"""Optional jailer mode: Firecracker in a chroot under the instance directory, as another uid.

The jailer builds `<base>/<exec name>/<id>/root` and pivots into it, so every file Firecracker opens must be
linked into that root, and the sockets it creates live there too; the host-side socket paths of VMFiles become
symlinks into the jail (connect(2) follows symlinks).
"""

from __future__ import annotations

import contextlib
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from ai_sandbox.errors import VMError
from ai_sandbox.vmm.base import MachineSpec, VMFiles


@dataclass(frozen=True)
class Seen:
    """The paths of the files Firecracker opens, as the Firecracker process names them."""

    kernel: str
    initrd: str
    log: str
    vsock: str
    disks: dict[str, str] = field(default_factory=dict)


def direct_view(spec: MachineSpec) -> Seen:
    """Unjailed, Firecracker sees the host paths."""
    return Seen(
        kernel=str(spec.vmlinux),
        initrd=str(spec.initrd),
        log=str(spec.files.vmm_log),
        vsock=str(spec.files.vsock),
        disks={d.id: str(d.path) for d in spec.disks},
    )


def wanted(spec: MachineSpec) -> bool:
    return spec.extra.get("jailer", "") in ("1", "true", "yes")


def jail_base(files: VMFiles) -> Path:
    """--chroot-base-dir: inside the instance directory, so removing the sandbox removes the jail."""
    return files.pid.parent / "jail"


def jail_root(spec: MachineSpec, firecracker: Path) -> Path:
    # The jailer names the directory after the canonical exec file name.
    return jail_base(spec.files) / firecracker.resolve().name / spec.name / "root"


def argv(spec: MachineSpec, jailer: Path, firecracker: Path) -> list[str]:
    """jailer argv; extra keys jailer_uid, jailer_gid, jailer_netns tune it."""
    args = [
        str(jailer),
        "--id", spec.name,
        "--exec-file", str(firecracker),
        "--uid", spec.extra.get("jailer_uid", str(os.getuid())),
        "--gid", spec.extra.get("jailer_gid", str(os.getgid())),
        "--chroot-base-dir", str(jail_base(spec.files)),
    ]  # fmt: skip
    if netns := spec.extra.get("jailer_netns"):
        args += ["--netns", netns]
    # No --daemonize: the jailer then execs Firecracker in place, so the pid we spawn is Firecracker's and its
    # stdout (the guest serial console) stays ours.
    return [*args, "--", "--api-sock", "/" + spec.files.api_socket.name]


def _link(src: Path, dst: Path, writable: bool) -> None:
    try:
        os.link(src, dst)
    except OSError as e:
        if writable:
            # A copy of a writable disk would silently drop every guest write when the jail is removed.
            msg = f"cannot hard-link {src} into the jail ({e.strerror})"
            raise VMError(msg, hint="keep writable disks on the instance directory's filesystem") from e
        shutil.copy2(src, dst)


def _symlink(link: Path, target: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        link.unlink()
    link.symlink_to(target)


def populate(spec: MachineSpec, firecracker: Path) -> Seen:
    """Link kernel, initrd, disks and the log into a fresh jail root; point the host socket paths into it."""
    root = jail_root(spec, firecracker)
    remove(spec.files)
    root.mkdir(parents=True)
    _link(spec.vmlinux, root / "vmlinux", writable=False)
    _link(spec.initrd, root / "initrd", writable=False)
    disks = {}
    for d in spec.disks:
        _link(d.path, root / f"{d.id}.img", writable=not d.read_only)
        disks[d.id] = f"/{d.id}.img"
    _link(spec.files.vmm_log, root / "firecracker.log", writable=True)
    _symlink(spec.files.api_socket, root / spec.files.api_socket.name)
    if spec.vsock_cid is not None:
        _symlink(spec.files.vsock, root / spec.files.vsock.name)
    return Seen("/vmlinux", "/initrd", "/firecracker.log", "/" + spec.files.vsock.name, disks)


def remove(files: VMFiles) -> None:
    """Remove the jail (links only: the originals stay); jailer-made device nodes need the same root we ran as."""
    shutil.rmtree(jail_base(files), ignore_errors=True)
