"""KVM detection: /dev/kvm alone is not enough; flags, access and a probe must all agree."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest

from ai_sandbox.vmm import kvm

pytestmark = pytest.mark.unit

INTEL = "processor\t: 0\nflags\t\t: fpu vme de pse tsc msr pae vmx ept\n\nprocessor\t: 1\nflags\t\t: fpu vmx\n"
NESTED_NO_VIRT = "processor\t: 0\nflags\t\t: fpu vme de pse tsc hypervisor svm_lock\n"


def cpuinfo(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "cpuinfo"
    p.write_text(text)
    return p


def fake_device(tmp_path: Path) -> Path:
    dev = tmp_path / "kvm"
    dev.write_bytes(b"")
    return dev


def test_flags_without_vmx_or_svm_are_refused_even_with_a_working_device(tmp_path: Path) -> None:
    probed: list[int] = []
    why = kvm.diagnose(cpuinfo(tmp_path, NESTED_NO_VIRT), fake_device(tmp_path), probed.append, "x86_64")
    assert why is not None and "shows no vmx/svm" in why
    assert probed == []  # the probe is not even tried: this is the host whose KVM hangs guests
    assert "\n" not in why


@pytest.mark.parametrize("flag", ["vmx", "svm"])
def test_vmx_or_svm_with_passing_probe_is_usable(tmp_path: Path, flag: str) -> None:
    info = cpuinfo(tmp_path, f"flags\t: fpu {flag} sse\n")
    assert kvm.diagnose(info, fake_device(tmp_path), lambda fd: None, "x86_64") is None


def test_missing_device(tmp_path: Path) -> None:
    why = kvm.diagnose(cpuinfo(tmp_path, INTEL), tmp_path / "nope", lambda fd: None, "x86_64")
    assert why is not None and "does not exist" in why


def test_device_not_openable_read_write(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def denied(path: object, flags: int, *a: object) -> int:
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(kvm.os, "open", denied)
    why = kvm.diagnose(cpuinfo(tmp_path, INTEL), fake_device(tmp_path), lambda fd: None, "x86_64")
    assert why is not None and "kvm group" in why


def test_probe_failure_is_reported(tmp_path: Path) -> None:
    why = kvm.diagnose(cpuinfo(tmp_path, INTEL), fake_device(tmp_path), lambda fd: "KVM_CREATE_VM failed: x", "x86_64")
    assert why == "KVM_CREATE_VM failed: x"


def test_probe_on_a_non_kvm_file_fails_cleanly(tmp_path: Path) -> None:
    """The real probe against a plain file: the ioctl errors turn into a line, not an exception."""
    why = kvm.diagnose(cpuinfo(tmp_path, INTEL), fake_device(tmp_path), machine="x86_64")
    assert why is not None and "does not answer KVM ioctls" in why


def test_probe_checks_api_version_and_closes_the_vm_fd(monkeypatch: pytest.MonkeyPatch) -> None:
    answers = {kvm.KVM_GET_API_VERSION: 12, kvm.KVM_CREATE_VM: 99}
    closed: list[int] = []
    monkeypatch.setattr(kvm.fcntl, "ioctl", lambda fd, req, arg: answers[req])
    monkeypatch.setattr(kvm.os, "close", closed.append)
    assert kvm.probe_fd(5) is None
    assert closed == [99]
    answers[kvm.KVM_GET_API_VERSION] = 11
    assert kvm.probe_fd(5) == "KVM API version is 11, expected 12"


def test_arm_has_no_flags_to_read_so_the_probe_decides(tmp_path: Path) -> None:
    info = cpuinfo(tmp_path, "Features\t: fp asimd evtstrm\n")
    assert kvm.diagnose(info, fake_device(tmp_path), lambda fd: None, "aarch64") is None


def test_result_is_cached_per_process(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    kvm.kvm_unusable.cache_clear()
    monkeypatch.setattr(kvm, "CPUINFO", cpuinfo(tmp_path, NESTED_NO_VIRT))
    monkeypatch.setattr(kvm.platform, "machine", lambda: "x86_64")
    try:
        first = kvm.kvm_unusable()
        monkeypatch.setattr(kvm, "CPUINFO", cpuinfo(tmp_path, INTEL))
        assert kvm.kvm_unusable() == first and first is not None and "no vmx/svm" in first
    finally:
        kvm.kvm_unusable.cache_clear()


def test_this_host() -> None:
    """Whatever the host, the answer is None or one line; here (no vmx/svm) it must name the flags."""
    kvm.kvm_unusable.cache_clear()
    why = kvm.kvm_unusable()
    assert why is None or "\n" not in why
    text = kvm.CPUINFO.read_text() if kvm.CPUINFO.exists() else ""
    if kvm.platform.machine() == "x86_64" and not ({"vmx", "svm"} & set(text.split())):
        assert why is not None and "no vmx/svm" in why
