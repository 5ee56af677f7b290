"""Workspace modes as seen by the sandbox lifecycle: start/stop of the sftp daemon, copy in and out."""

from __future__ import annotations

import sys
import time
from pathlib import Path

from ai_sandbox import runner
from ai_sandbox.errors import VMError
from ai_sandbox.share import copy, syncback
from ai_sandbox.share.daemon import READY
from ai_sandbox.state import Files, Instance, Spec
from ai_sandbox.vmm import process


def sftp_start(inst: Instance, timeout: float = 60) -> None:
    """Start the share daemon and wait until the guest has mounted the workspace."""
    log = inst.path(Files.SHARE_LOG)
    log.write_text("")
    proc = runner.spawn([sys.executable, "-m", "ai_sandbox.share.daemon", str(inst.dir)], log_file=log)
    inst.path(Files.SHARE_PID).write_text(f"{proc.pid}\n")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if READY in log.read_text(errors="replace"):
            return
        if proc.poll() is not None:
            break
        time.sleep(0.2)
    sftp_stop(inst)
    said = [ln for ln in log.read_text(errors="replace")[-4096:].splitlines() if ln.strip()]
    why = "".join(c if c.isprintable() else "?" for c in said[-1])[:300] if said else "no word from the share daemon"
    raise VMError(f"the sftp workspace did not mount in the guest ({why})", log=str(log))


def sftp_stop(inst: Instance) -> None:
    pid = process.read_pid(inst.path(Files.SHARE_PID))
    if pid is not None and process.runs(pid, inst.dir):  # not a reused pid: ours was given the instance dir
        process.kill(pid, timeout=10)  # SIGTERM first: the daemon unmounts in the guest
    process.remove(inst.path(Files.SHARE_PID))


KEPT_IMAGE = "workspace-kept-{stamp}.ext4"  # a guest image with entries that were not synced back


def copy_in(inst: Instance, spec: Spec) -> Path:
    """Fill the workspace image from the host directory and remember what it held."""
    image = inst.path(Files.WORKSPACE_IMG)
    manifest = copy.create_image(Path(spec.workspace), image, spec.workspace_size_mib)
    copy.save_manifest(manifest, inst.path(Files.COPY_MANIFEST))
    return image


def copy_discard(inst: Instance) -> None:
    process.remove(inst.path(Files.WORKSPACE_IMG), inst.path(Files.COPY_MANIFEST))


def copy_out(inst: Instance, spec: Spec) -> copy.SyncReport | None:
    """Merge the guest's changes back (never deleting what the guest did not delete); None if nothing to sync."""
    manifest_path = inst.path(Files.COPY_MANIFEST)
    image = inst.path(Files.WORKSPACE_IMG)
    if not manifest_path.exists() or not image.exists():
        return None
    stamp = copy.conflict_stamp()
    report = syncback.sync_back(Path(spec.workspace), image, copy.load_manifest(manifest_path), stamp=stamp)
    if report.skipped:  # not every entry made it: the guest's image stays, under a name the next start keeps
        kept = inst.path(KEPT_IMAGE.format(stamp=stamp))
        image.rename(kept)
        report.kept = str(kept)
    copy_discard(inst)
    return report
