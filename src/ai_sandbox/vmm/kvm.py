"""Honest KVM detection: a /dev/kvm node is not proof that KVM can run a guest.

Some hosts (nested setups without exposed virtualization) offer a /dev/kvm whose guests hang instead of failing,
so we require the CPU flags, read-write access and a successful KVM_CREATE_VM before calling KVM usable.
"""

from __future__ import annotations

import errno
import fcntl
import functools
import os
import platform
from collections.abc import Callable
from pathlib import Path

CPUINFO = Path("/proc/cpuinfo")
KVM_DEVICE = Path("/dev/kvm")

# From <linux/kvm.h>: _IO(KVMIO=0xAE, 0x00) and _IO(KVMIO, 0x01); the stable API version has been 12 since 2007.
KVM_GET_API_VERSION = 0xAE00
KVM_CREATE_VM = 0xAE01
KVM_API_VERSION = 12

Probe = Callable[[int], str | None]


def cpu_flags_problem(cpuinfo: Path, machine: str | None = None) -> str | None:
    """None if the CPU flags show hardware virtualization (vmx/svm), else why not."""
    machine = machine or platform.machine()
    if machine not in ("x86_64", "amd64", "i686", "i386"):
        # ARM's /proc/cpuinfo has no virtualization flag to read; the KVM_CREATE_VM probe decides alone there.
        return None
    try:
        text = cpuinfo.read_text()
    except OSError as e:
        return f"cannot read {cpuinfo}: {e.strerror}"
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags" and {"vmx", "svm"} & set(value.split()):
            return None
    return f"{cpuinfo} shows no vmx/svm (the CPU offers no hardware virtualization to this host)"


def probe_fd(fd: int) -> str | None:
    """Ask an open /dev/kvm for its API version and to create (then drop) a VM."""
    version = fcntl.ioctl(fd, KVM_GET_API_VERSION, 0)
    if version != KVM_API_VERSION:
        return f"KVM API version is {version}, expected {KVM_API_VERSION}"
    try:
        vm_fd = fcntl.ioctl(fd, KVM_CREATE_VM, 0)
    except OSError as e:
        return f"KVM_CREATE_VM failed: {e.strerror}"
    os.close(vm_fd)
    return None


def device_problem(device: Path, probe: Probe = probe_fd) -> str | None:
    """None if `device` opens read-write and passes `probe`, else why not."""
    try:
        fd = os.open(device, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        return f"{device} does not exist (load the kvm_intel or kvm_amd module)"
    except PermissionError:
        return f"{device} is not readable and writable by you (add yourself to the kvm group)"
    except OSError as e:
        return f"cannot open {device}: {e.strerror or errno.errorcode.get(e.errno, e.errno)}"
    try:
        return probe(fd)
    except OSError as e:
        return f"{device} does not answer KVM ioctls: {e.strerror}"
    finally:
        os.close(fd)


def diagnose(cpuinfo: Path, device: Path, probe: Probe = probe_fd, machine: str | None = None) -> str | None:
    """Uncached check: CPU flags first (cheap, and they catch the hosts whose KVM hangs), then the device."""
    return cpu_flags_problem(cpuinfo, machine) or device_problem(device, probe)


@functools.cache
def kvm_unusable() -> str | None:
    """None if KVM can really run guests here, else one line why not (cached per process)."""
    return diagnose(CPUINFO, KVM_DEVICE)
