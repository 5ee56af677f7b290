"""Issue: the built artifacts boot under QEMU microvm with a blank data disk, reach multi-user, and keep a file
written on the first boot across a second boot. Also: cache reuse and which stages a change re-runs."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ai_sandbox.guest import LABEL_DATA, files_dir
from ai_sandbox.image import pipeline
from ai_sandbox.image.disk import make_ext4
from ai_sandbox.vmm.base import Disk, MachineSpec, VMFiles
from ai_sandbox.vmm.qemu import QemuDriver

AI = str(Path(sys.executable).with_name("ai"))


def _boot(arts: dict[str, str], data: Path, work: Path, tag: str) -> str:
    files = VMFiles(*(work / f"{tag}.{n}" for n in ("pid", "sock", "console", "vmm", "vsock")))
    spec = MachineSpec(tag, 2, 768, Path(arts["kernel"]), Path(arts["vmlinux"]), Path(arts["initrd"]), "panic=-1",
                       files, disks=(Disk("base", Path(arts["rootfs"]), True), Disk("data", data)), accel="auto")
    drv = QemuDriver()
    drv.start(spec)
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            text = files.console_log.read_text(errors="replace")
            if "Reached target multi-user.target" in text or "Multi-User System" in text:
                break
            time.sleep(1)
        else:
            raise AssertionError("multi-user.target not reached:\n" + text[-3000:])
        time.sleep(2)
    finally:
        drv.stop(files, timeout=60)
    assert not files.pid.exists() and not files.api_socket.exists()
    return text


def _debugfs_cat(image: Path, path: str) -> str:
    return subprocess.run(["debugfs", "-R", f"cat {path}", str(image)], capture_output=True, text=True).stdout


def test_boots_overlay_root_and_keeps_first_boot_file(minimal_image, tmp_path):
    for key in ("kernel", "vmlinux", "initrd", "rootfs", "manifest"):
        assert Path(minimal_image[key]).is_file()
    assert Path(minimal_image["vmlinux"]).read_bytes()[:4] == b"\x7fELF"
    data = make_ext4(tmp_path / "data.ext4", 1024, LABEL_DATA)
    first = _boot(minimal_image, data, tmp_path, "first")
    assert "root is overlay of" in first
    # systemd writes the machine id on the first boot; it lands in the overlay's upper layer on the data disk.
    machine_id = _debugfs_cat(data, "/upper/etc/machine-id").strip()
    assert len(machine_id) == 32, machine_id
    second = _boot(minimal_image, data, tmp_path, "second")
    assert "Multi-User System" in second
    assert _debugfs_cat(data, "/upper/etc/machine-id").strip() == machine_id
    assert _debugfs_cat(Path(minimal_image["rootfs"]), "/etc/machine-id").strip() == ""  # the base stays clean


def test_rebuild_reuses_and_guest_change_reruns_only_guest_and_disk(minimal_image, tmp_path):
    t0 = time.monotonic()
    again = pipeline.build("minimal")
    assert again.ran == [] and sorted(again.reused) == sorted(pipeline.STAGES)
    assert time.monotonic() - t0 < 30
    assert again.artifacts.as_dict()["rootfs"] == minimal_image["rootfs"]
    changed = tmp_path / "guest-files"
    shutil.copytree(files_dir(), changed)
    with (changed / "sshd-ai-sandbox.conf").open("a") as fh:
        fh.write("# a change of the guest stage only\n")
    result = pipeline.build("minimal", guest_files=changed)
    assert result.ran == ["guest", "disk"]
    assert result.artifacts.rootfs != Path(minimal_image["rootfs"])
    conf = _debugfs_cat(result.artifacts.rootfs, "/etc/ssh/sshd_config.d/ai-sandbox.conf")
    assert "a change of the guest stage only" in conf


@pytest.mark.parametrize("case", ["no-mirror", "no-such-package"])
def test_bad_build_input_is_one_line_and_leaves_nothing(case, tmp_path):
    env = {"AI_SANDBOX_CACHE": str(tmp_path / "cache")}
    recipe = "minimal"
    if case == "no-mirror":
        env["AI_SANDBOX_MIRROR"] = "http://127.0.0.1:9/debian"
    else:
        recipe = str(tmp_path / "bad.toml")
        Path(recipe).write_text('name = "bad"\npackages = ["ai-sandbox-no-such-package"]\n')
    res = subprocess.run([AI, "build", "--image", recipe], capture_output=True, text=True, env={**os.environ, **env},
                         timeout=600)
    assert res.returncode == 2
    lines = [ln for ln in res.stderr.strip().splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "build step base failed" in lines[0] and "see " in lines[0], res.stderr
    log = Path(lines[0].rsplit("see ", 1)[1].split(";")[0].strip())
    assert log.is_file() and log.stat().st_size > 0
    stages = tmp_path / "cache" / "stages"
    assert not stages.exists() or list(stages.iterdir()) == []


def test_unreachable_optional_tool_is_left_out_and_recorded(minimal_image, tmp_path):
    minimal = (files_dir().parent.parent / "image/builtin/minimal.toml").read_text()
    recipe = tmp_path / "opt.toml"
    recipe.write_text(minimal.replace('name = "minimal"', 'name = "optprobe"') + "\n[[tools]]\n"
                      'name = "ghost"\nkind = "npm"\npackages = ["ai-sandbox-no-such-npm-package-zz"]\n'
                      'bins = ["ghost"]\noptional = true\n')
    res = subprocess.run([AI, "build", "--image", str(recipe), "--json"], capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-2000:]
    manifest = json.loads(Path(json.loads(res.stdout)["manifest"]).read_text())
    assert manifest["missing_optional"] == ["ghost"] and "ghost" not in manifest["tools"]
    assert "optional tool ghost left out" in res.stderr
    skipped = subprocess.run([AI, "build", "--image", str(recipe), "--skip-optional", "--json"], capture_output=True,
                             text=True, timeout=900)
    assert skipped.returncode == 0
    assert json.loads(Path(json.loads(skipped.stdout)["manifest"]).read_text())["missing_optional"] == ["ghost"]
