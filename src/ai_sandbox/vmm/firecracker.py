"""The Firecracker driver: one `firecracker` process per VM, configured over its API socket.

The guest serial console is Firecracker's stdout (→ console_log); Firecracker's own log goes to vmm_log.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import httpx
from pydantic import ValidationError

from ai_sandbox import runner
from ai_sandbox.errors import SandboxError, VMError
from ai_sandbox.vmm import fc_jail, process
from ai_sandbox.vmm.base import Capabilities, MachineSpec, State, Status, VMFiles
from ai_sandbox.vmm.fc_api import (
    BootSource,
    Drive,
    FirecrackerAPI,
    Logger,
    MachineConfiguration,
    NetworkInterface,
    Request,
    Vsock,
    send,
)
from ai_sandbox.vmm.fc_jail import Seen
from ai_sandbox.vmm.fc_setup import Binaries, find_binaries
from ai_sandbox.vmm.kvm import kvm_unusable

# Firecracker's serial port is ttyS0; reboot=k makes a guest reboot end the Firecracker process (our "stopped").
# (pci=off, as in Firecracker's examples, was tried on a real Firecracker: the Debian kernel probes the PCI ports
# early anyway, so it changed nothing and is left out.)
CONSOLE_ARGS = "console=ttyS0 reboot=k panic=1"
IFACE_ID = "net0"
SUN_PATH_MAX = 107  # sockaddr_un.sun_path is 108 bytes including the NUL

TransportFactory = Callable[[Path], httpx.BaseTransport]


def unix_transport(socket: Path) -> httpx.BaseTransport:
    return httpx.HTTPTransport(uds=str(socket))


def boot_args(cmdline: str) -> str:
    """The caller's arguments, then ours for those it did not set (one `panic=`, not two that disagree)."""
    given = {arg.split("=", 1)[0] for arg in cmdline.split()}
    ours = [arg for arg in CONSOLE_ARGS.split() if arg.split("=", 1)[0] not in given]
    return " ".join([*cmdline.split(), *ours])


def _drive(disk_id: str, path: str, read_only: bool) -> Request:
    # Every drive is a plain data drive: our initramfs finds the root by filesystem label. Writable disks use
    # Writeback so a guest fsync reaches the host disk (Firecracker's default "Unsafe" drops flushes).
    body = Drive(
        drive_id=disk_id,
        path_on_host=path,
        is_root_device=False,
        is_read_only=read_only,
        cache_type=None if read_only else "Writeback",
    )
    return f"/drives/{disk_id}", body


def boot_plan(spec: MachineSpec, seen: Seen) -> list[Request]:
    """The pre-boot PUTs, in order (logger first so later faults are logged); InstanceStart is not included."""
    plan: list[Request] = [
        ("/logger", Logger(log_path=seen.log, level="Info", show_level=True)),
        ("/machine-config", MachineConfiguration(vcpu_count=spec.vcpus, mem_size_mib=spec.memory_mib)),
        (
            "/boot-source",
            BootSource(kernel_image_path=seen.kernel, initrd_path=seen.initrd, boot_args=boot_args(spec.cmdline)),
        ),
    ]
    plan += [_drive(d.id, seen.disks[d.id], d.read_only) for d in spec.disks]
    if spec.net is not None:
        iface = NetworkInterface(iface_id=IFACE_ID, host_dev_name=spec.net.tap, guest_mac=spec.net.mac)
        plan.append((f"/network-interfaces/{IFACE_ID}", iface))
    if spec.vsock_cid is not None:
        plan.append(("/vsock", Vsock(guest_cid=spec.vsock_cid, uds_path=seen.vsock)))
    return plan


def _one_line(e: Exception) -> str:
    if isinstance(e, ValidationError):
        errs = "; ".join(f"{'.'.join(map(str, x['loc']))}: {x['msg']}" for x in e.errors())
        return f"invalid {e.title}: {errs}"
    if isinstance(e, SandboxError):
        return e.message
    return str(e)


def _last_line(path: Path) -> str:
    try:
        with path.open("rb") as fh:
            fh.seek(max(0, fh.seek(0, os.SEEK_END) - 2048))
            lines = fh.read().decode(errors="replace").strip().splitlines()
    except OSError:
        return ""
    return lines[-1].strip() if lines else ""


def owns(pid: int, files: VMFiles) -> bool:
    """True if `pid` runs with our API socket (guards against a recycled pid); jailed, the name is in the jail."""
    try:
        args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    name = os.fsencode(files.api_socket.name)
    return any(a == b"--api-sock" and b.rsplit(b"/", 1)[-1] == name for a, b in itertools.pairwise(args))


def _reap(pid: int) -> None:
    """Collect the exit status if the VM is our own child (a driver used by a long-lived process)."""
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)


def _check_socket_paths(files: VMFiles) -> None:
    for sock in (files.api_socket, files.vsock):
        if len(os.fsencode(sock)) > SUN_PATH_MAX:
            raise VMError(
                f"socket path too long for a Unix socket ({len(os.fsencode(sock))} > {SUN_PATH_MAX} bytes): {sock}",
                hint="use a shorter state directory (AI_SANDBOX_STATE)",
            )


def clear(files: VMFiles) -> None:
    """Remove everything a VM leaves on disk besides its logs: pid file, sockets, jail."""
    process.remove(files.pid, files.api_socket, files.vsock)
    fc_jail.remove(files)


class FirecrackerDriver:
    """Driver protocol (vmm/base.py) for Firecracker; `transport` lets tests stand in for the API socket."""

    name = "firecracker"
    capabilities = Capabilities(share_directory=False, vsock=True, needs_kvm=True, elf_kernel=True)

    def __init__(
        self,
        *,
        transport: TransportFactory = unix_transport,
        kvm_check: Callable[[], str | None] = kvm_unusable,
        binaries: Callable[[], Binaries | None] = find_binaries,
        ready_timeout: float = 5.0,
    ) -> None:
        self._transport = transport
        self._kvm_check = kvm_check
        self._binaries = binaries
        self._ready_timeout = ready_timeout

    def _api(self, files: VMFiles, timeout: float = 10.0) -> FirecrackerAPI:
        return FirecrackerAPI(self._transport(files.api_socket), timeout)

    def unavailable(self) -> str | None:
        """None if Firecracker can run here, else one line why not."""
        if why := self._kvm_check():
            return f"firecracker needs a usable KVM: {why}"
        if self._binaries() is None:
            return "firecracker is not installed: run `ai setup firecracker`"
        return None

    # -- start -----------------------------------------------------------------------------------------------

    def start(self, spec: MachineSpec) -> None:
        """Spawn Firecracker, configure it over the API, start the guest; on failure leave nothing behind."""
        if why := self.unavailable():
            raise VMError(why)
        bins = self._binaries()
        if bins is None:  # checked by unavailable(); narrows the type
            raise VMError("firecracker is not installed: run `ai setup firecracker`")
        files = spec.files
        _check_socket_paths(files)
        current = self.status(files)
        if current.state is State.RUNNING or (current.pid and process.alive(current.pid) and owns(current.pid, files)):
            why = f": {current.reason}" if current.reason else ""
            raise VMError(f"{spec.name} already has a firecracker (pid {current.pid}){why}", hint="stop it first")
        clear(files)
        proc: subprocess.Popen[bytes] | None = None
        try:
            argv, seen = self._prepare(spec, bins)
            plan = boot_plan(spec, seen)
            proc = runner.spawn(argv, log_file=files.console_log)
            files.pid.write_text(f"{proc.pid}\n")
            with self._api(files) as api:
                self._wait_ready(api, proc)
                send(api, plan)
                api.action("InstanceStart")
        except BaseException as e:  # Ctrl-C included: a half-started VM must not outlive us
            note = self._exit_note(proc, files)
            self._abort(files, proc)
            if not isinstance(e, SandboxError | ValidationError | OSError):
                raise
            msg = f"firecracker could not start {spec.name}: {_one_line(e)}{note}"
            log = files.console_log if note else files.vmm_log if proc is not None else None
            raise VMError(msg, log=str(log) if log else None) from e

    def _prepare(self, spec: MachineSpec, bins: Binaries) -> tuple[list[str], Seen]:
        """A fresh vmm_log, and the argv plus the paths Firecracker will see (jailed or not)."""
        # Firecracker opens its log without O_APPEND or truncation: an old log would be overwritten piecewise.
        spec.files.vmm_log.parent.mkdir(parents=True, exist_ok=True)
        spec.files.vmm_log.write_bytes(b"")
        if not fc_jail.wanted(spec):
            argv = [str(bins.firecracker), "--api-sock", str(spec.files.api_socket), "--id", spec.name]
            return argv, fc_jail.direct_view(spec)
        if bins.jailer is None:
            raise VMError("jailer mode was asked for but no jailer binary was found", hint="run `ai setup firecracker`")
        seen = fc_jail.populate(spec, bins.firecracker)
        return fc_jail.argv(spec, bins.jailer, bins.firecracker), seen

    def _wait_ready(self, api: FirecrackerAPI, proc: subprocess.Popen[bytes]) -> None:
        """Wait until the API answers GET / (the socket file alone may exist before Firecracker listens)."""
        deadline = time.monotonic() + self._ready_timeout
        while True:
            if proc.poll() is not None:
                raise VMError(f"firecracker exited ({proc.returncode}) before its API socket answered")
            try:
                api.describe()
                return
            except VMError:
                if time.monotonic() > deadline:
                    raise VMError(f"the API socket did not answer within {self._ready_timeout:g}s") from None
                time.sleep(0.02)

    @staticmethod
    def _exit_note(proc: subprocess.Popen[bytes] | None, files: VMFiles) -> str:
        """Firecracker's last words when it died on its own (its stderr shares the console log)."""
        if proc is None or proc.poll() is None:
            return ""
        last = _last_line(files.console_log)
        return f" (firecracker said: {last})" if last and not last.startswith("+ ") else ""

    @staticmethod
    def _abort(files: VMFiles, proc: subprocess.Popen[bytes] | None) -> None:
        if proc is not None:
            process.kill(proc.pid)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=1.0)  # reap: process.alive() already calls a zombie gone
        clear(files)

    # -- stop / status ---------------------------------------------------------------------------------------

    def stop(self, files: VMFiles, timeout: float = 30.0) -> None:
        """Ctrl-Alt-Del, wait up to `timeout`, then kill; remove pid file and sockets. Fine on a gone VM."""
        pid = process.read_pid(files.pid)
        if pid is not None and process.alive(pid) and owns(pid, files):
            try:
                with self._api(files, timeout=2.0) as api:
                    api.action("SendCtrlAltDel")
                asked = True
            except VMError:
                asked = False  # no API answer (or aarch64, which has no Ctrl-Alt-Del): no point in waiting
            if not (asked and process.wait_gone(pid, timeout)):
                process.kill(pid)
            _reap(pid)
        clear(files)

    def status(self, files: VMFiles) -> Status:
        """Derived from the pid file, the process and GET /; never raises."""
        try:
            return self._status(files)
        except Exception as e:  # status must describe any trouble, not raise it
            return Status(State.BROKEN, f"status check failed: {e}")

    def _status(self, files: VMFiles) -> Status:
        pid = process.read_pid(files.pid)
        if pid is None:
            if files.pid.exists():
                return Status(State.BROKEN, f"unreadable pid file {files.pid}")
            return Status(State.STOPPED)
        if not process.alive(pid):
            return Status(State.BROKEN, f"pid {pid} gone", pid)
        if not owns(pid, files):
            return Status(State.BROKEN, f"pid {pid} is not this VM's firecracker", pid)
        try:
            with self._api(files, timeout=2.0) as api:
                info = api.describe()
        except VMError as e:
            return Status(State.BROKEN, f"pid {pid} runs but its API does not answer: {e.message}", pid)
        if info.state == "Running":
            return Status(State.RUNNING, pid=pid)
        if info.state == "Paused":
            return Status(State.RUNNING, "paused", pid)
        return Status(State.BROKEN, f"pid {pid} runs but the guest was never started", pid)
