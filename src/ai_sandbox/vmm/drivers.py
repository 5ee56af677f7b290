"""Driver registry: by name, and `auto` = Firecracker where it can run, else QEMU."""

from __future__ import annotations

from ai_sandbox.errors import UsageError
from ai_sandbox.vmm.base import Driver


def get(name: str) -> Driver:
    if name == "qemu":
        from ai_sandbox.vmm.qemu import QemuDriver

        return QemuDriver()
    if name == "firecracker":
        from ai_sandbox.vmm.firecracker import FirecrackerDriver

        return FirecrackerDriver()
    raise UsageError(f"unknown VMM {name!r}", hint="use auto, qemu or firecracker")


def choose(requested: str) -> Driver:
    """The driver to use; one line saying why when the requested one cannot run here."""
    if requested == "auto":
        fc = get("firecracker")
        return fc if fc.unavailable() is None else get("qemu")
    driver = get(requested)
    problem = driver.unavailable()
    if problem:
        raise UsageError(f"--vmm {requested} cannot run here: {problem}")
    return driver
