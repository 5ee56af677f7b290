"""The VMM protocol: what every driver (QEMU, Firecracker) offers, and what it is given.

Callers ask a driver's `capabilities` ("can you share a directory?") instead of checking which driver it is.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol


@dataclass(frozen=True)
class Disk:
    """A block device. Guests find disks by filesystem label, so order does not matter to them."""

    id: str  # short and stable: "base", "data", "config", "workspace"
    path: Path
    read_only: bool = False


@dataclass(frozen=True)
class NetDevice:
    tap: str
    mac: str


@dataclass(frozen=True)
class DirShare:
    """A vhost-user-fs share: the virtiofsd socket and the tag the guest mounts."""

    tag: str
    socket: Path


@dataclass(frozen=True)
class VMFiles:
    """Files of one running VM inside its instance directory (names come from state.Files)."""

    pid: Path
    api_socket: Path  # QMP for QEMU, the API socket for Firecracker
    console_log: Path  # guest serial console
    vmm_log: Path  # the VMM's own output
    vsock: Path  # Firecracker's vsock Unix socket (unused by QEMU)


@dataclass(frozen=True)
class MachineSpec:
    name: str
    vcpus: int
    memory_mib: int
    kernel: Path  # compressed image (bzImage), used by QEMU
    vmlinux: Path  # uncompressed ELF, used by Firecracker
    initrd: Path
    cmdline: str  # arguments common to all VMMs; drivers append their own console settings
    files: VMFiles
    disks: tuple[Disk, ...] = ()
    net: NetDevice | None = None
    shares: tuple[DirShare, ...] = ()
    vsock_cid: int | None = None
    accel: str = "auto"  # "kvm", "tcg" or "auto" (QEMU only; Firecracker always needs KVM)
    extra: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Capabilities:
    share_directory: bool  # virtio-fs through virtiofsd
    vsock: bool
    needs_kvm: bool
    elf_kernel: bool  # boots the ELF vmlinux rather than the compressed image
    snapshots: bool = False


class State(enum.Enum):
    RUNNING = "running"
    STOPPED = "stopped"
    BROKEN = "broken"


@dataclass(frozen=True)
class Status:
    state: State
    reason: str = ""
    pid: int | None = None


class Driver(Protocol):
    """A VMM driver.

    Contracts:
    - `unavailable()` returns None when the driver can run here, else one line saying why not.
    - `start()` returns once the VMM process runs the guest; on any failure it MUST leave no process,
      socket or pid file behind and raise `VMError`.
    - `stop()` asks the guest to power off, kills the VMM after `timeout` seconds, and removes the pid file and
      sockets. It MUST succeed on a VM that is already gone.
    - `status()` is derived from the pid file, the process and the API socket; it never raises.
    """

    name: str
    capabilities: Capabilities

    def unavailable(self) -> str | None: ...

    def start(self, spec: MachineSpec) -> None: ...

    def stop(self, files: VMFiles, timeout: float = 30.0) -> None: ...

    def status(self, files: VMFiles) -> Status: ...
