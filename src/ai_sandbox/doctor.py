"""`ai doctor`: what this host has and lacks for building images and running sandboxes, each with its fix."""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from ai_sandbox.image import pipeline
from ai_sandbox.share import virtiofs
from ai_sandbox.vmm import drivers
from ai_sandbox.vmm.kvm import kvm_unusable

# command → Debian package that provides it (what scripts/host-packages installs)
TOOLS = {
    "qemu-system-x86_64": "qemu-system-x86", "mmdebstrap": "mmdebstrap", "mkfs.ext4": "e2fsprogs",
    "debugfs": "e2fsprogs", "lz4": "lz4", "nft": "nftables", "ip": "iproute2", "ssh": "openssh-client",
    "ssh-keygen": "openssh-client", "unshare": "util-linux", "newuidmap": "uidmap", "npm": "npm",
}


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str
    fix: str = ""
    required: bool = True


def checks() -> list[Check]:
    out = [Check(cmd, shutil.which(cmd) is not None, shutil.which(cmd) or "missing", f"apt-get install {pkg}")
           for cmd, pkg in TOOLS.items()]
    bb = pipeline.BUSYBOX
    out.append(Check("busybox (static)", bb.exists() and pipeline.is_static(bb), str(bb), "apt-get install busybox-static"))
    fsd = virtiofs.binary()
    out.append(Check("virtiofsd", fsd is not None, fsd or "missing", "apt-get install qemu-system-x86 (or virtiofsd)"))
    kvm = kvm_unusable()
    out.append(Check("KVM", kvm is None, kvm or "usable", "sandboxes run under QEMU TCG (slow)", required=False))
    fc = drivers.get("firecracker").unavailable()
    out.append(Check("firecracker", fc is None, fc or "ready", "ai setup firecracker (needs a usable KVM)", required=False))
    root = os.geteuid() == 0
    out.append(Check("root", root, "yes" if root else f"uid {os.geteuid()}",
                     "sandbox networking (TAP, nftables) needs root: run with sudo"))
    out.append(Check("/dev/net/tun", Path("/dev/net/tun").exists(), "present" if Path("/dev/net/tun").exists()
                     else "missing", "modprobe tun"))
    return out
