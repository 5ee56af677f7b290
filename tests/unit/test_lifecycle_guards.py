"""Issue 10 and 9 guards of the lifecycle, without root or a VM: flags on an existing sandbox, stale pid files
(pid reuse), the capped console log, and the host owner of guest-written files behind sudo."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from ai_sandbox import config, sandbox, state
from ai_sandbox.errors import UsageError
from ai_sandbox.share import owner, virtiofs
from ai_sandbox.vmm import process, qemu
from ai_sandbox.vmm.base import State, VMFiles

pytestmark = pytest.mark.unit


@pytest.fixture
def existing(tmp_path, monkeypatch):
    """A sandbox made earlier (share sftp, network nat, 2 vCPUs, 1024 MiB) in a state dir of the test's own."""
    monkeypatch.setenv("AI_SANDBOX_STATE", str(tmp_path / "state"))
    for k in ("FC_VCPU", "FC_MEM", "AI_VMM", "AI_IMAGE", "AI_SHARE", "AI_NETWORK"):
        monkeypatch.delenv(k, raising=False)
    ws = tmp_path / "ws"
    ws.mkdir()
    inst = state.Instance("old")
    inst.save(state.Spec(name="old", workspace=str(ws), image="minimal", vmm="qemu", cpus=2, memory_mib=1024,
                         share="sftp", network="nat"))
    return inst, ws


def _create(ws, **flags):
    s = config.Settings(**{k: v for k, v in flags.items()})
    return sandbox.create(sandbox.Options("old", ws, s, given=frozenset(flags)))[1]


def test_cpus_and_memory_change_only_when_given(existing):
    _, ws = existing
    spec = _create(ws)  # no flag: what the sandbox had, not the defaults
    assert (spec.cpus, spec.memory_mib) == (2, 1024)
    spec = _create(ws, vcpus=1)
    assert (spec.cpus, spec.memory_mib) == (1, 1024)
    spec = _create(ws, memory_mib=512)
    assert (spec.cpus, spec.memory_mib) == (2, 512)


@pytest.mark.parametrize(("flag", "value", "have"), [("share", "copy", "sftp"), ("network", "proxy", "nat"),
                                                      ("image", "default", "minimal"), ("vmm", "firecracker", "qemu")])
def test_fixed_settings_that_differ_are_refused_in_one_line(existing, flag, value, have):
    _, ws = existing
    with pytest.raises(UsageError) as e:
        _create(ws, **{flag: value})
    line = e.value.line()
    assert "\n" not in line and f"--{flag} {have}" in line and "ai rm old" in line
    assert _create(ws, **{flag: have}).share == "sftp"  # the same value is fine
    if flag in ("share", "vmm"):
        assert _create(ws, **{flag: "auto"}).share == "sftp"  # "auto" asks for nothing in particular


@pytest.fixture
def sleeper():
    proc = subprocess.Popen(["sleep", "60"])
    yield proc
    proc.kill()
    proc.wait()


def test_qemu_stop_leaves_a_reused_pid_alone(tmp_path, sleeper, monkeypatch):
    files = VMFiles(tmp_path / "vmm.pid", tmp_path / "api.sock", tmp_path / "console.log", tmp_path / "vmm.log",
                    tmp_path / "v.sock")
    files.pid.write_text(f"{sleeper.pid}\n")  # QEMU died long ago; its pid now belongs to an unrelated process
    notes = []
    monkeypatch.setattr(qemu.progress, "info", notes.append)
    st = qemu.QemuDriver().status(files)
    assert st.state is State.BROKEN and "stale pid file" in st.reason and st.pid is None
    qemu.QemuDriver().stop(files, timeout=1)
    assert sleeper.poll() is None  # not killed
    assert not files.pid.exists() and any("stale pid file" in n for n in notes)


def test_runs_matches_only_the_process_given_the_marker(tmp_path, sleeper):
    marker = tmp_path / "marker.pid"
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", str(marker)])
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not process.runs(proc.pid, marker):
            time.sleep(0.05)  # between fork and exec the child still shows pytest's command line
        assert process.runs(proc.pid, marker)
        assert not process.runs(sleeper.pid, marker)
        assert not process.runs(2**22 + 7, marker)  # no such pid
    finally:
        proc.kill()
        proc.wait()


def test_console_log_is_capped_in_place_and_read_from_its_tail(tmp_path):
    log = tmp_path / "console.log"
    with open(log, "ab") as writer:  # the writer appends, as QEMU's chardev (append=on) does
        writer.write(b"old line\n" * 1000)
        writer.flush()
        assert process.cap_log(log, limit=4096, keep=100)
        writer.write(b"after the cut\n")
        writer.flush()
    data = log.read_bytes()
    assert len(data) == 100 + len(b"after the cut\n") and b"\0" not in data  # no hole where the file was
    assert not process.cap_log(log, limit=4096, keep=100)
    assert process.read_tail(log, 14) == b"after the cut\n"
    (tmp_path / "link").symlink_to(log)
    with pytest.raises(OSError):
        process.read_tail(tmp_path / "link", 10)  # never through a link


def test_console_tail_starts_at_a_whole_line(existing, monkeypatch):
    inst, _ = existing
    monkeypatch.setattr(sandbox, "LOGS_TAIL", 64)
    inst.path(state.Files.CONSOLE).write_bytes(b"x" * 50 + b"\n" + b"line two\n" * 20)
    assert sandbox.console_tail(inst).startswith("line two\n")


def test_virtiofsd_as_root_is_the_owner_in_a_namespace_of_one_id(tmp_path, monkeypatch):
    monkeypatch.setattr(virtiofs, "binary", lambda: "/usr/libexec/virtiofsd")
    sudo = virtiofs.argv(tmp_path, (1001, 1002), (1001, 1002), fd=7)  # behind sudo: never host root
    assert sudo[:11] == ["setpriv", "--reuid=1001", "--regid=1002", "--clear-groups", "--", "unshare", "--user",
                         "--map-user=1001", "--map-group=1002", "--keep-caps", "--"]
    assert sudo[11] == "/usr/libexec/virtiofsd" and sudo[-1] == "--fd=7" and "xattr" not in sudo
    assert not any(a.startswith("--socket-path") or a.startswith("--map-users") for a in sudo)
    rooted = virtiofs.argv(tmp_path, (1000, 1000), (0, 0), fd=7)  # root's own workspace: root, guest user 1000
    assert rooted[:8] == ["setpriv", "--clear-groups", "--", "unshare", "--user", "--map-user=1000",
                          "--map-group=1000", "--keep-caps"]
    other = virtiofs.argv(tmp_path, (1000, 1005), (1001, 1002), fd=7)
    assert "--regid=1002" in other and "--map-group=1005" in other  # the gid maps to the gid, not to the uid
    for cmd in (sudo, rooted, other):
        opts = [cmd[i + 1] for i, a in enumerate(cmd) if a == "-o"]
        assert "modcaps=-mknod:-setfcap:-fsetid" in opts
        rules = next(o for o in opts if o.startswith("xattrmap=")).removeprefix("xattrmap=")
        assert rules.index(":bad:all:security.:") < rules.index(":ok:all:::")  # first match wins
        assert ":ok:client:security.capability::" in rules  # renamed, it breaks chown (see XATTRMAP)


def test_virtiofsd_unprivileged_binds_its_own_socket(tmp_path, monkeypatch):
    monkeypatch.setattr(virtiofs, "binary", lambda: "/usr/libexec/virtiofsd")
    cmd = virtiofs.argv(tmp_path, (1001, 1002), (1001, 1002), socket=tmp_path / "s")
    assert cmd[0] == "/usr/libexec/virtiofsd" and cmd[-1] == f"--socket-path={tmp_path / 's'}"


def test_virtiofsd_stop_knows_its_daemon_by_the_env_mark(tmp_path):
    sock, pid_file = tmp_path / "fs.sock", tmp_path / "fs.pid"
    for mark, killed in ((tmp_path / "other.sock", False), (sock, True)):
        proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"],
                                env={**os.environ, virtiofs.MARK: str(mark)})
        try:
            pid_file.write_text(f"{proc.pid}\n")
            virtiofs.stop(sock, pid_file)
            assert (proc.wait(timeout=5) is not None) if killed else proc.poll() is None
            assert not pid_file.exists()
        finally:
            proc.kill()
            proc.wait()


def test_files_owner_behind_sudo(tmp_path, monkeypatch):
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    monkeypatch.setattr(os, "stat", lambda p: os.stat_result((0o40755, 0, 0, 1, 1001, 1001, 0, 0, 0, 0)))
    assert owner.files_owner(tmp_path, (1001, 1002)) == (1001, 1002)
    monkeypatch.setattr(os, "stat", lambda p: os.stat_result((0o40755, 0, 0, 1, 0, 0, 0, 0, 0, 0)))
    assert owner.files_owner(tmp_path, (1000, 1000)) == (0, 0)
    # root without sudo in another user's directory: that user's, whom virtiofsd then runs as
    monkeypatch.setattr(os, "stat", lambda p: os.stat_result((0o40755, 0, 0, 1, 1005, 1006, 0, 0, 0, 0)))
    assert owner.files_owner(tmp_path, (1000, 1000)) == (1005, 1006)
