"""CONTRACT tests of the Firecracker driver against the published API spec.

No Firecracker can run here: `fc_fake` stands in for the process (spawned for real, serving the spec'd API on
its Unix socket), so these prove what we send and how we clean up — not that a guest boots.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import fc_fake
import pytest

from ai_sandbox.errors import VMError
from ai_sandbox.vmm import process
from ai_sandbox.vmm.base import Disk, MachineSpec, NetDevice, State, VMFiles
from ai_sandbox.vmm.fc_api import FirecrackerAPI
from ai_sandbox.vmm.fc_jail import direct_view
from ai_sandbox.vmm.fc_setup import Binaries
from ai_sandbox.vmm.firecracker import CONSOLE_ARGS, FirecrackerDriver, boot_args, boot_plan

pytestmark = pytest.mark.unit

HERE = Path(__file__).resolve().parent


def _spec_available() -> None:
    """The spec is not shipped with the project: a clone without it skips, saying so; one that names it (CI does,
    with AI_SANDBOX_FC_API_SPEC) must have it."""
    if fc_fake.SPEC_PATH.is_file():
        return
    if os.environ.get("AI_SANDBOX_FC_API_SPEC"):
        pytest.fail(f"AI_SANDBOX_FC_API_SPEC names {fc_fake.SPEC_PATH}, which is not a file")
    pytest.skip(f"the Firecracker API spec {fc_fake.SPEC_PATH} is not here (the project does not ship it); "
                "set AI_SANDBOX_FC_API_SPEC to a copy of firecracker's swagger/firecracker.yaml to run these")


@pytest.fixture
def inst() -> Iterator[Path]:
    """A short instance directory: Unix socket paths are limited to 107 bytes."""
    _spec_available()
    d = Path(tempfile.mkdtemp(prefix="fc", dir="/tmp"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def record(inst: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """Install the fake firecracker/jailer executables; yield the file they record calls in.

    Afterwards every fake process the test started must be gone; any survivor is killed and fails the test.
    """
    bindir = inst / "bin"
    bindir.mkdir()
    for role in ("firecracker", "jailer"):
        shim = bindir / role
        shim.write_text(
            f"#!{sys.executable}\nimport sys\nsys.path.insert(0, {str(HERE)!r})\nimport fc_fake\n"
            f"sys.exit(fc_fake.main({role!r}, sys.argv[1:]))\n"
        )
        shim.chmod(0o755)
    monkeypatch.setenv("AI_SANDBOX_FIRECRACKER", str(bindir / "firecracker"))
    monkeypatch.delenv("AI_SANDBOX_JAILER", raising=False)
    for knob in ("FC_FAKE_FAIL", "FC_FAKE_IGNORE_CAD", "FC_FAKE_EXIT", "FC_FAKE_DELAY"):
        monkeypatch.delenv(knob, raising=False)
    path = inst / "record.jsonl"
    monkeypatch.setenv("FC_FAKE_RECORD", str(path))
    yield path
    survivors = [pid for pid in {c["pid"] for c in fc_fake.read_record(path)} if process.alive(pid)]
    for pid in survivors:
        process.kill(pid)
    assert survivors == [], f"fake firecracker processes left running: {survivors}"


def make_spec(inst: Path, **extra: str) -> MachineSpec:
    for name in ("vmlinux", "initrd.img", "base.ext4", "data.ext4", "ws.ext4"):
        (inst / name).write_bytes(b"\0" * 512)
    files = VMFiles(
        pid=inst / "fc.pid",
        api_socket=inst / "api.sock",
        console_log=inst / "console.log",
        vmm_log=inst / "firecracker.log",
        vsock=inst / "v.sock",
    )
    return MachineSpec(
        name="box-1",
        vcpus=2,
        memory_mib=1024,
        kernel=inst / "bzImage",
        vmlinux=inst / "vmlinux",
        initrd=inst / "initrd.img",
        cmdline="quiet ai.root=LABEL=base",
        files=files,
        disks=(
            Disk("base", inst / "base.ext4", read_only=True),
            Disk("data", inst / "data.ext4"),
            Disk("workspace", inst / "ws.ext4"),
        ),
        net=NetDevice(tap="aitap0", mac="06:00:ac:10:00:02"),
        vsock_cid=3,
        extra=dict(extra),
    )


def driver() -> FirecrackerDriver:
    return FirecrackerDriver(kvm_check=lambda: None)


def puts(record: Path) -> list[dict]:
    return [c for c in fc_fake.read_record(record) if c.get("method") == "PUT"]


def fake_pid(record: Path) -> int:
    return next(c["pid"] for c in fc_fake.read_record(record) if c.get("event") == "listening")


def nothing_left(files: VMFiles) -> list[Path]:
    return [p for p in (files.pid, files.api_socket, files.vsock) if p.exists() or p.is_symlink()]


def assert_valid(call: dict) -> None:
    errors = fc_fake.spec_errors(call["method"], call["path"], call["body"])
    assert errors == [], f"{call['method']} {call['path']} breaks the spec: {errors}"


# -- pure: the bodies we render ---------------------------------------------------------------------------------


def test_contract_boot_plan_bodies_fit_the_spec(inst: Path) -> None:
    spec = make_spec(inst)
    plan = boot_plan(spec, direct_view(spec))
    for path, body in plan:
        assert_valid({"method": "PUT", "path": path, "body": body.body()})
    assert [p for p, _ in plan] == [
        "/logger",
        "/machine-config",
        "/boot-source",
        "/drives/base",
        "/drives/data",
        "/drives/workspace",
        "/network-interfaces/net0",
        "/vsock",
    ]
    for _, body in plan:
        assert None not in body.body().values()


def test_boot_args_keep_the_callers_values_once() -> None:
    # What a real Firecracker showed (tests/firecracker): the sandbox's `panic=-1` and ours both reached the kernel.
    assert boot_args("panic=-1 quiet") == "panic=-1 quiet console=ttyS0 reboot=k"
    assert boot_args("") == CONSOLE_ARGS
    assert boot_args("console=hvc0") == "console=hvc0 reboot=k panic=1"


def test_contract_spec_validation_is_strict(inst: Path) -> None:
    """The checker itself must reject what Firecracker rejects, or the other tests prove nothing."""
    assert fc_fake.spec_errors("PUT", "/drives/x", {"drive_id": "x", "is_root_device": False, "readonly": True})
    assert fc_fake.spec_errors("PUT", "/machine-config", {"vcpu_count": 33, "mem_size_mib": 128})
    assert fc_fake.spec_errors("PUT", "/actions", {"action_type": "Reboot"})
    assert fc_fake.spec_errors("PUT", "/vsock", {"guest_cid": 2, "uds_path": "/x"})


def test_contract_fake_answers_fit_the_spec() -> None:
    _spec_available()
    api = fc_fake.FakeAPI()
    status, body = api.handle("GET", "/", b"")
    assert status == 200 and fc_fake.response_errors("GET", "/", 200, body) == []
    status, body = api.handle("PUT", "/actions", b'{"action_type": "Nope"}')
    assert status == 400 and "fault_message" in body
    assert fc_fake.response_errors("PUT", "/actions", 400, body) == []


def test_contract_api_client_raises_fault_message() -> None:
    _spec_available()
    fake = fc_fake.FakeAPI(fail={"PUT /actions": "Cannot start microvm without kernel configuration."})
    with FirecrackerAPI(fc_fake.mock_transport(fake)) as api:
        assert api.describe().state == "Not started"
        with pytest.raises(VMError, match="without kernel configuration"):
            api.action("InstanceStart")


# -- through a spawned fake process -------------------------------------------------------------------------------


def test_contract_start_sends_spec_valid_requests_in_order(inst: Path, record: Path) -> None:
    spec = make_spec(inst)
    spec.files.vmm_log.write_text("stale log from an earlier run " * 20)
    drv = driver()
    drv.start(spec)
    try:
        calls = puts(record)
        for c in calls:
            assert_valid(c)
        paths = [c["path"] for c in calls]
        assert paths[0] == "/logger"
        assert paths[-1] == "/actions" and calls[-1]["body"] == {"action_type": "InstanceStart"}
        assert sorted(paths[1:-1]) == sorted(
            ["/machine-config", "/boot-source", "/drives/base", "/drives/data", "/drives/workspace",
             "/network-interfaces/net0", "/vsock"]
        )  # fmt: skip
        by_path = {c["path"]: c["body"] for c in calls}
        assert by_path["/machine-config"] == {"vcpu_count": 2, "mem_size_mib": 1024}
        assert by_path["/boot-source"] == {
            "kernel_image_path": str(spec.vmlinux),
            "initrd_path": str(spec.initrd),
            "boot_args": f"quiet ai.root=LABEL=base {CONSOLE_ARGS}",
        }
        drives = {p.rsplit("/", 1)[1]: b for p, b in by_path.items() if p.startswith("/drives/")}
        assert {k: (b["is_root_device"], b["is_read_only"]) for k, b in drives.items()} == {
            "base": (False, True),
            "data": (False, False),
            "workspace": (False, False),
        }
        assert drives["data"]["path_on_host"] == str(inst / "data.ext4")
        assert by_path["/network-interfaces/net0"] == {
            "iface_id": "net0",
            "host_dev_name": "aitap0",
            "guest_mac": "06:00:ac:10:00:02",
        }
        assert by_path["/vsock"] == {"guest_cid": 3, "uds_path": str(spec.files.vsock)}
        assert by_path["/logger"]["log_path"] == str(spec.files.vmm_log)
        # Firecracker writes its log from offset 0: the driver must have emptied the old one.
        assert spec.files.vmm_log.read_text() == "fake firecracker log\n"

        pid = process.read_pid(spec.files.pid)
        assert pid == fake_pid(record) and process.alive(pid)
        assert drv.status(spec.files).state is State.RUNNING
        console = spec.files.console_log.read_text()
        assert "serial console up" in console and "Traceback" not in console
    finally:
        drv.stop(spec.files, timeout=5)


def test_contract_stop_sends_ctrl_alt_del_and_removes_everything(inst: Path, record: Path) -> None:
    spec = make_spec(inst)
    drv = driver()
    drv.start(spec)
    pid = fake_pid(record)
    assert spec.files.vsock.exists()  # bound by the fake, as Firecracker does
    drv.stop(spec.files, timeout=5)
    last = puts(record)[-1]
    assert last["path"] == "/actions" and last["body"] == {"action_type": "SendCtrlAltDel"}
    assert_valid(last)
    assert not process.alive(pid)
    assert nothing_left(spec.files) == []
    assert "reboot: Restarting system" in spec.files.console_log.read_text()  # it exited on its own
    assert drv.status(spec.files).state is State.STOPPED
    drv.stop(spec.files, timeout=1)  # idempotent on a gone VM


def test_contract_stop_kills_a_guest_that_ignores_ctrl_alt_del(
    inst: Path, record: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FC_FAKE_IGNORE_CAD", "1")
    spec = make_spec(inst)
    drv = driver()
    drv.start(spec)
    pid = fake_pid(record)
    t0 = time.monotonic()
    drv.stop(spec.files, timeout=0.5)
    assert time.monotonic() - t0 < 5
    assert not process.alive(pid)
    assert "reboot" not in spec.files.console_log.read_text()  # it was killed, not shut down
    assert nothing_left(spec.files) == []


def test_contract_fault_during_configuration_leaves_nothing(
    inst: Path, record: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FC_FAKE_FAIL", '{"PUT /drives/data": "Unable to open the block device backing file."}')
    spec = make_spec(inst)
    with pytest.raises(VMError) as err:
        driver().start(spec)
    assert "Unable to open the block device backing file." in err.value.message
    assert "/drives/data" in err.value.message
    assert not process.alive(fake_pid(record))
    assert nothing_left(spec.files) == []
    assert all(c["path"] != "/actions" for c in puts(record))  # never started


def test_contract_firecracker_dying_early_is_reported(
    inst: Path, record: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FC_FAKE_EXIT", "Failed to open the API socket: Address in use")
    spec = make_spec(inst)
    with pytest.raises(VMError, match="Address in use") as err:
        driver().start(spec)
    assert "exited" in err.value.message
    assert nothing_left(spec.files) == []


def test_contract_bad_spec_is_refused_before_spawning(inst: Path, record: Path) -> None:
    spec = make_spec(inst)
    bad = MachineSpec(**{**spec.__dict__, "vcpus": 64})
    with pytest.raises(VMError, match="vcpu_count"):
        driver().start(bad)
    assert fc_fake.read_record(record) == []
    assert nothing_left(spec.files) == []


def test_contract_second_start_is_refused(inst: Path, record: Path) -> None:
    spec = make_spec(inst)
    drv = driver()
    drv.start(spec)
    try:
        with pytest.raises(VMError, match="already has a firecracker"):
            drv.start(spec)
        assert drv.status(spec.files).state is State.RUNNING  # the first VM is untouched
    finally:
        drv.stop(spec.files, timeout=5)


def test_contract_jailer_mode_links_files_into_the_jail(inst: Path, record: Path) -> None:
    spec = make_spec(inst, jailer="1")
    drv = driver()
    drv.start(spec)
    try:
        by_path = {c["path"]: c["body"] for c in puts(record)}
        assert by_path["/drives/data"]["path_on_host"] == "/data.img"
        assert by_path["/boot-source"]["kernel_image_path"] == "/vmlinux"
        assert by_path["/vsock"]["uds_path"] == "/v.sock"
        root = inst / "jail" / "firecracker" / "box-1" / "root"
        # A writable disk must be the same inode (a copy would lose the guest's writes).
        assert (root / "data.img").stat().st_ino == (inst / "data.ext4").stat().st_ino
        assert spec.files.api_socket.is_symlink()
        assert drv.status(spec.files).state is State.RUNNING
        assert spec.files.vmm_log.read_text() == "fake firecracker log\n"  # hard-linked log
    finally:
        drv.stop(spec.files, timeout=5)
    assert not (inst / "jail").exists()
    assert (inst / "data.ext4").exists()
    assert nothing_left(spec.files) == []


# -- status and availability --------------------------------------------------------------------------------------


def test_contract_status_is_derived_and_never_raises(inst: Path) -> None:
    spec = make_spec(inst)
    drv = driver()
    assert drv.status(spec.files).state is State.STOPPED
    dead = subprocess.Popen(["true"])
    dead.wait()
    spec.files.pid.write_text(f"{dead.pid}\n")
    st = drv.status(spec.files)
    assert st.state is State.BROKEN and st.reason == f"pid {dead.pid} gone"
    spec.files.pid.write_text(f"{os.getpid()}\n")  # alive, but not a firecracker for this VM
    st = drv.status(spec.files)
    assert st.state is State.BROKEN and "not this VM's firecracker" in st.reason
    spec.files.pid.write_text("garbage")
    assert drv.status(spec.files).state is State.BROKEN
    drv.stop(spec.files, timeout=0.1)  # must not kill the test runner (our own pid was in the file)
    assert nothing_left(spec.files) == []


def test_contract_unavailable_says_why_in_one_line(tmp_path: Path) -> None:
    fc = Binaries(Path("/x/firecracker"), None)
    no_kvm = FirecrackerDriver(kvm_check=lambda: "/proc/cpuinfo shows no vmx/svm", binaries=lambda: fc)
    assert no_kvm.unavailable() == "firecracker needs a usable KVM: /proc/cpuinfo shows no vmx/svm"
    missing = FirecrackerDriver(kvm_check=lambda: None, binaries=lambda: None)
    assert missing.unavailable() == "firecracker is not installed: run `ai setup firecracker`"
    assert FirecrackerDriver(kvm_check=lambda: None, binaries=lambda: fc).unavailable() is None
    with pytest.raises(VMError, match="usable KVM"):
        no_kvm.start(make_spec(tmp_path))


def test_contract_socket_path_too_long_is_refused(inst: Path, record: Path) -> None:
    deep = inst / ("d" * 100)
    deep.mkdir()
    spec = make_spec(deep)
    with pytest.raises(VMError, match="socket path too long"):
        driver().start(spec)
    assert fc_fake.read_record(record) == []
