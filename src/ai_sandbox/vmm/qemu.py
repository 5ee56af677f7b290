"""QEMU driver: `-M microvm` with virtio-mmio devices, serial console to a file, QMP for status and power-off.

The argv is built by small pure functions (golden-tested); KVM only where it is really usable, else TCG.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import time
from pathlib import Path

from qemu.qmp import QMPClient

from ai_sandbox import progress, runner
from ai_sandbox.errors import VMError
from ai_sandbox.vmm import process
from ai_sandbox.vmm.base import Capabilities, MachineSpec, State, Status, VMFiles
from ai_sandbox.vmm.kvm import kvm_unusable

BINARY = "qemu-system-x86_64"


def host_cpu_khz(cpuinfo: Path = Path("/proc/cpuinfo")) -> int | None:
    """The host CPU clock: under TCG the guest TSC runs at the host's rate, and telling the guest avoids a
    calibration hang seen in about 1 boot in 6."""
    for line in cpuinfo.read_text().splitlines():
        if line.startswith("cpu MHz"):
            return int(float(line.split(":")[1]) * 1000)
    return None


def machine_args(spec: MachineSpec, accel: str) -> list[str]:
    mem = ["-m", f"{spec.memory_mib}M"]
    machine = "microvm,acpi=on,pit=off,pic=off,rtc=on"
    if spec.shares:  # vhost-user-fs needs guest memory shared with virtiofsd
        mem += ["-object", f"memory-backend-memfd,id=mem,size={spec.memory_mib}M,share=on"]
        machine += ",memory-backend=mem"
    cpu = "host" if accel == "kvm" else "max"
    # Modern (v2) virtio-mmio: vhost-user devices such as virtiofs refuse the legacy layout.
    modern = ["-global", "virtio-mmio.force-legacy=false"]
    return ["-M", machine, "-accel", accel, "-cpu", cpu, "-smp", str(spec.vcpus), *mem, *modern]


def boot_args(spec: MachineSpec, accel: str) -> list[str]:
    cmdline = f"{spec.cmdline} console=ttyS0"
    khz = host_cpu_khz() if accel == "tcg" else None
    if khz:
        cmdline += f" tsc_early_khz={khz}"
    return ["-kernel", str(spec.kernel), "-initrd", str(spec.initrd), "-append", cmdline]


def disk_args(spec: MachineSpec) -> list[str]:
    out: list[str] = []
    for d in spec.disks:
        ro = ",readonly=on" if d.read_only else ""
        out += ["-drive", f"id={d.id},file={d.path},format=raw,if=none,cache=none,aio=threads{ro}",
                "-device", f"virtio-blk-device,drive={d.id}"]
    return out


def net_args(spec: MachineSpec) -> list[str]:
    if spec.net is None:
        return []
    return ["-netdev", f"tap,id=n0,ifname={spec.net.tap},script=no,downscript=no",
            "-device", f"virtio-net-device,netdev=n0,mac={spec.net.mac}"]


def share_args(spec: MachineSpec) -> list[str]:
    out: list[str] = []
    for i, s in enumerate(spec.shares):
        out += ["-chardev", f"socket,id=fs{i},path={s.socket}",
                "-device", f"vhost-user-fs-device,chardev=fs{i},tag={s.tag}"]
    return out


def io_args(files: VMFiles) -> list[str]:
    return [
        "-nodefaults", "-no-user-config", "-nographic", "-display", "none",
        "-chardev", f"file,id=con,path={files.console_log},append=on", "-serial", "chardev:con",
        "-qmp", f"unix:{files.api_socket},server=on,wait=off",
        "-pidfile", str(files.pid),
    ]


def argv(spec: MachineSpec, accel: str) -> list[str]:
    return [BINARY, "-name", spec.name, *machine_args(spec, accel), *boot_args(spec, accel), *disk_args(spec),
            *net_args(spec), *share_args(spec), *io_args(spec.files)]


def choose_accel(requested: str) -> str:
    problem = kvm_unusable()
    if requested == "kvm" and problem:
        raise VMError(f"KVM was asked for but is not usable: {problem}")
    if requested in ("kvm", "tcg"):
        return requested
    if problem:
        progress.info(f"KVM is not usable here ({problem}); using QEMU TCG emulation, which is slow")
        return "tcg"
    return "kvm"


async def _qmp(sock: Path, command: str, timeout: float = 5.0) -> dict:
    qmp = QMPClient("ai-sandbox")
    await asyncio.wait_for(qmp.connect(str(sock)), timeout)
    try:
        return await asyncio.wait_for(qmp.execute(command), timeout)
    finally:
        with contextlib.suppress(Exception):
            await qmp.disconnect()


def _ours(pid: int, files: VMFiles) -> bool:
    """Whether `pid` is still the QEMU we started: ours was given this sandbox's pid file (pid reuse guard)."""
    return process.runs(pid, files.pid)


class QemuDriver:
    name = "qemu"
    capabilities = Capabilities(share_directory=True, vsock=False, needs_kvm=False, elf_kernel=False)

    def unavailable(self) -> str | None:
        if shutil.which(BINARY) is None:
            return f"{BINARY} is not installed (apt-get install qemu-system-x86)"
        return None

    def start(self, spec: MachineSpec) -> None:
        files = spec.files
        accel = choose_accel(spec.accel)
        process.remove(files.pid, files.api_socket)
        proc = runner.spawn(argv(spec, accel), log_file=files.vmm_log)
        try:
            self._wait_started(proc, files)
        except BaseException:
            process.kill(proc.pid)
            with contextlib.suppress(Exception):
                proc.wait(timeout=5)
            process.remove(files.pid, files.api_socket)
            raise

    @staticmethod
    def _wait_started(proc, files: VMFiles, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                tail = files.vmm_log.read_text(errors="replace").strip().splitlines()[-1:] or ["no output"]
                raise VMError(f"qemu exited at start: {tail[0]}", log=str(files.vmm_log))
            if files.api_socket.exists() and files.pid.exists():
                return
            time.sleep(0.05)
        raise VMError("qemu did not open its QMP socket in time", log=str(files.vmm_log))

    def stop(self, files: VMFiles, timeout: float = 30.0) -> None:
        pid = process.read_pid(files.pid)
        if pid is not None and process.alive(pid) and not _ours(pid, files):
            progress.info(f"stale pid file {files.pid}: pid {pid} is not this sandbox's qemu; left it alone")
        elif pid is not None and process.alive(pid):
            with contextlib.suppress(Exception):
                asyncio.run(_qmp(files.api_socket, "system_powerdown"))
            if not process.wait_gone(pid, timeout):
                with contextlib.suppress(Exception):
                    asyncio.run(_qmp(files.api_socket, "quit"))
                process.kill(pid)
        process.remove(files.pid, files.api_socket)

    def status(self, files: VMFiles) -> Status:
        pid = process.read_pid(files.pid)
        if pid is None:
            return Status(State.STOPPED)
        if not process.alive(pid):
            return Status(State.BROKEN, f"qemu (pid {pid}) is gone without a clean stop", pid)
        if not _ours(pid, files):
            return Status(State.BROKEN, f"qemu is gone without a clean stop (stale pid file: pid {pid} is another "
                          "process now)")
        try:
            st = asyncio.run(_qmp(files.api_socket, "query-status", timeout=3))
        except Exception as e:  # noqa: BLE001 - any QMP failure is a status, not a crash
            return Status(State.BROKEN, f"qemu (pid {pid}) does not answer on QMP: {e or type(e).__name__}", pid)
        if st.get("status") == "running":
            return Status(State.RUNNING, pid=pid)
        return Status(State.BROKEN, f"guest is {st.get('status')}", pid)
