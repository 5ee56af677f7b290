"""The `guest` stage: our integration on top of the tools tree.

User `sandbox` (uid 1000, passwordless sudo), sshd for keys only, the config-drive unit, /workspace.
Every write replaces a file (never edits in place), so the tree can start as hardlinks of the tools tree.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from ai_sandbox.guest import UID, USER

_UNIT = "ai-sandbox-config.service"
# Each agent's settings for life in the sandbox, by file under files/agents → path under the user's home:
# keys are the broker's placeholders, /workspace is trusted, update checks and telemetry are off.
AGENT_FILES = {
    "claude-settings.json": ".claude/settings.json",
    "claude.json": ".claude.json",
    "codex-config.toml": ".codex/config.toml",
    "codex-auth.json": ".codex/auth.json",
    "gemini-settings.json": ".gemini/settings.json",
    "gemini-trustedFolders.json": ".gemini/trustedFolders.json",
    "opencode.json": ".config/opencode/opencode.json",
}
# Units that would start at every boot for nothing: docker starts on first use (docker.socket), the host key
# comes from the config drive (no keygen), time sync and apt timers only add noise (and traffic) in a sandbox.
_MASKED = ("apt-daily.timer", "apt-daily-upgrade.timer", "systemd-timesyncd.service", "e2scrub_reap.service",
           "sshd-keygen.service")
_ON_DEMAND = ("docker.service", "containerd.service")


def _replace(path: Path, data: str, mode: int = 0o644, uid: int = 0, gid: int = 0) -> None:
    tmp = path.with_name(f".{path.name}.new")
    tmp.write_text(data)
    os.chown(tmp, uid, gid)
    os.chmod(tmp, mode)
    os.replace(tmp, path)


def _append_line(path: Path, line: str, key: str) -> None:
    """Add `line` unless an entry named `key` exists; keep the file's mode and owner."""
    text = path.read_text() if path.exists() else ""
    if any(ln.split(":", 1)[0] == key for ln in text.splitlines()):
        return
    st = path.stat()
    _replace(path, text + ("" if text.endswith("\n") or not text else "\n") + line + "\n", st.st_mode & 0o7777,
             st.st_uid, st.st_gid)


def _group_add_member(path: Path, group: str, member: str) -> None:
    lines = path.read_text().splitlines()
    out = []
    for ln in lines:
        parts = ln.split(":")
        if parts[0] == group and member not in parts[-1].split(","):
            parts[-1] = ",".join(p for p in (parts[-1], member) if p)
        out.append(":".join(parts))
    st = path.stat()
    _replace(path, "\n".join(out) + "\n", st.st_mode & 0o7777, st.st_uid, st.st_gid)


def add_user(root: Path) -> None:
    etc = root / "etc"
    _append_line(etc / "group", f"{USER}:x:{UID}:", USER)
    _append_line(etc / "gshadow", f"{USER}:!::", USER)
    _append_line(etc / "passwd", f"{USER}:x:{UID}:{UID}:AI sandbox:/home/{USER}:/bin/bash", USER)
    _append_line(etc / "shadow", f"{USER}:!:19000:0:99999:7:::", USER)  # locked: no password logins
    for group in ("sudo", "docker", "kvm"):
        for f in ("group", "gshadow"):
            _group_add_member(etc / f, group, USER)
    home = root / "home" / USER
    if not home.exists():
        shutil.copytree(etc / "skel", home, symlinks=True)
    for p in [home, *home.rglob("*")]:
        os.lchown(p, UID, UID)
    home.chmod(0o750)


def install_files(root: Path, files: Path) -> None:
    sbin = root / "usr/local/sbin"
    sbin.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(files / "ai-sandbox-config", sbin / "ai-sandbox-config")
    (sbin / "ai-sandbox-config").chmod(0o755)
    units = root / "etc/systemd/system"
    shutil.copyfile(files / _UNIT, units / _UNIT)
    wants = units / "sysinit.target.wants"
    wants.mkdir(exist_ok=True)
    (wants / _UNIT).unlink(missing_ok=True)
    (wants / _UNIT).symlink_to(f"/etc/systemd/system/{_UNIT}")
    sshd = root / "etc/ssh/sshd_config.d"
    sshd.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(files / "sshd-ai-sandbox.conf", sshd / "ai-sandbox.conf")
    sudoers = root / "etc/sudoers.d/ai-sandbox"
    sudoers.unlink(missing_ok=True)
    shutil.copyfile(files / "sudoers-sandbox", sudoers)
    sudoers.chmod(0o440)
    for unit in _MASKED:
        (units / unit).unlink(missing_ok=True)
        (units / unit).symlink_to("/dev/null")
    for unit in _ON_DEMAND:
        (units / "multi-user.target.wants" / unit).unlink(missing_ok=True)
    if (root / "usr/sbin/dockerd").exists():
        dropin = units / "docker.service.d"
        dropin.mkdir(exist_ok=True)
        shutil.copyfile(files / "docker-proxy.conf", dropin / "ai-sandbox-proxy.conf")
    (root / "workspace").mkdir(exist_ok=True)
    os.chown(root / "workspace", UID, UID)
    (root / "etc/fstab").unlink(missing_ok=True)
    (root / "etc/fstab").write_text("# root is an overlay assembled by the ai-sandbox initramfs\n")


def install_agent_config(root: Path, files: Path) -> None:
    home = root / "home" / USER
    for src, rel in AGENT_FILES.items():
        dst = home / rel
        for d in reversed(dst.relative_to(home).parents[:-1]):
            (home / d).mkdir(mode=0o700, exist_ok=True)
            os.lchown(home / d, UID, UID)
        _replace(dst, (files / "agents" / src).read_text(), 0o600, UID, UID)


def build_guest(tools_root: Path, out: Path, files: Path) -> Path:
    root = out / "root"
    from ai_sandbox.image.rootfs import copy_tree

    copy_tree(tools_root, root, hardlink=True)
    add_user(root)
    install_files(root, files)
    install_agent_config(root, files)
    return root
