"""Issue 6: a real Firecracker boots the product's `minimal` image (ELF vmlinux, initramfs, overlay root, config
drive, data disk, TAP); SSH answers with the pinned host key; the sftp workspace works both ways; `ai stop` ends the
VM through SendCtrlAltDel; nothing is left behind; `--vmm auto` picks Firecracker where KVM works.

Everything below runs inside the outer test VM (conftest.py), by root, with the project's own `ai`.
"""

from __future__ import annotations

import json
import re
import time
from datetime import datetime

import pytest
from fc_tier import INNER_STATE, Outer, step_seconds, timed

from ai_sandbox.net.pool import sandbox_id, tap_name

INNER = "fc1"
AUTO = "fc2"
WS = "/root/ws"  # the inner sandbox's workspace, a directory of the outer guest
CAD_TIMEOUT = 30  # `ai stop`'s wait for the guest after SendCtrlAltDel
_TS = re.compile(r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6})\d* \[[^]]*\] (.*)$")


def _events(log: str) -> list[tuple[datetime, str]]:
    """Timestamped lines of Firecracker's output (nanoseconds cut to what datetime holds)."""
    return [(datetime.fromisoformat(m[1]), m[2]) for line in log.splitlines() if (m := _TS.match(line))]


def _first(events: list[tuple[datetime, str]], needle: str) -> datetime:
    return next(t for t, text in events if needle in text)


def _cat(outer: Outer, name: str, filename: str) -> str:
    return outer.sh(f"cat {INNER_STATE}/{name}/{filename}").stdout


def _ps(outer: Outer) -> dict[str, dict]:
    return {r["name"]: r for r in json.loads(outer.ai("ps", "--json").stdout)}


def _leftovers(outer: Outer, name: str) -> dict[str, str]:
    """What of the sandbox is still there in the outer guest: processes, TAP, nft objects, sockets, pid files."""
    script = (
        'echo "firecracker=$(pgrep -x firecracker | tr \'\\n\' \' \')"; '
        f'echo "tap=$(ip -o link show | grep -o {tap_name(name)})"; '
        f'echo "nft=$(nft list ruleset | grep -c {sandbox_id(name)})"; '
        f'echo "sockets=$(find {INNER_STATE}/{name} -type s 2>/dev/null | tr \'\\n\' \' \')"; '
        'echo "helpers=$(pgrep -f \'[a]i_sandbox[.](share[.]daemon|proxy)\' | tr \'\\n\' \' \')"; '
        f'echo "pid_files=$(for f in {INNER_STATE}/{name}/*.pid; do [ -f "$f" ] && echo "$f"; done | tr \'\\n\' \' \')"'
    )
    found = dict(line.split("=", 1) for line in outer.sh(script).stdout.splitlines() if "=" in line)
    return {k: v.strip() for k, v in found.items() if v.strip() not in ("", "0")}


@pytest.fixture(scope="module")
def started(outer: Outer) -> str:
    outer.sh(f"rm -rf {WS} && mkdir -p {WS} && echo 'hello from the outer guest' > {WS}/FILE")
    t0 = time.monotonic()
    res = outer.ai("start", "--name", INNER, "--workspace", WS, "--image", "minimal", "--vmm", "firecracker",
                   "--share", "sftp", "--detach", "--cpus", "1", "--memory", "768")
    wall = time.monotonic() - t0
    steps = step_seconds(res.stderr)
    assert not [s for s in steps if s.startswith("minimal: ")], f"the outer guest built the image: {res.stderr}"
    console, vmm_log = _cat(outer, INNER, "console.log"), _cat(outer, INNER, "vmm.log")
    # The boot step runs from spawning Firecracker to SSH answering; take off what came before InstanceStart.
    before = _first(_events(vmm_log), "InstanceStart") - _first(_events(console), "Running Firecracker")
    boot = steps["boot (firecracker)"]
    timed("inner ai start (command, from the host)", wall, ", ".join(f"{k} {v:.1f} s" for k, v in steps.items()))
    timed("inner InstanceStart → SSH ready", boot - before.total_seconds(), f"boot step {boot:.1f} s")
    return INNER


def test_real_firecracker_boots_the_minimal_image(outer: Outer, started: str):
    console, vmm_log = _cat(outer, started, "console.log"), _cat(outer, started, "vmm.log")
    assert "Running Firecracker v" in console
    boot_source = next(line for line in vmm_log.splitlines() if '"/boot-source"' in line)
    assert "/vmlinux" in boot_source and "initrd.img" in boot_source  # the ELF kernel and our initramfs
    assert "panic=-1" in boot_source and "panic=1" not in boot_source  # one panic setting, the sandbox's
    # Our initramfs found the base and the data disk by label and joined them; the config drive was applied.
    assert re.search(r"root is overlay of /dev/vd\w \(ro\) and /dev/vd\w \(rw\)", console), console[-3000:]
    assert "ai-sandbox-config: applied" in console
    row = _ps(outer)[started]
    assert (row["status"], row["vmm"]) == ("running", "firecracker"), row
    # `ai exec` itself proves the SSH host key matched the pinned one (StrictHostKeyChecking, no TOFU).
    out = outer.ai("exec", "--name", started, "--", "sh", "-c",
                   "findmnt -n -o FSTYPE /; hostname; cat /run/ai-sandbox/applied; ip -o -4 addr show eth0").stdout
    fstype, hostname, applied, addr = out.splitlines()[:4]
    assert (fstype, hostname, applied) == ("overlay", started, "ok")
    assert f"inet {row['address']}/" in addr  # the address the host planned, over the TAP


def test_exec_passes_stdout_stderr_and_status(outer: Outer, started: str):
    res = outer.ai("exec", "--name", started, "--", "sh", "-c", "cat /workspace/FILE; echo oops >&2; exit 7",
                   check=False)
    assert res.returncode == 7, res
    assert res.stdout == "hello from the outer guest\n"
    assert "oops" in res.stderr


def test_sftp_workspace_round_trip(outer: Outer, started: str):
    outer.ai("exec", "--name", started, "--", "sh", "-c", "echo 'written by the guest' > /workspace/from-guest.txt")
    assert outer.sh(f"cat {WS}/from-guest.txt").stdout == "written by the guest\n"
    outer.sh(f"echo 'written while it runs' > {WS}/live.txt")  # live: no sync step
    assert outer.ai("exec", "--name", started, "--", "cat", "/workspace/live.txt").stdout == "written while it runs\n"


def test_stop_ends_the_vm_through_ctrl_alt_del(outer: Outer, started: str):
    t0 = time.monotonic()
    res = outer.ai("stop", started)
    timed("inner ai stop (command, from the host)", time.monotonic() - t0)
    assert "stopped" in res.stderr
    events = _events(_cat(outer, started, "vmm.log"))
    asked = _first(events, "SendCtrlAltDel")
    # Only a guest-initiated exit (reboot=k after systemd's shutdown) logs this; a killed Firecracker does not.
    exited = _first(events, "Firecracker exiting successfully")
    assert asked < exited
    took = (exited - asked).total_seconds()
    timed("inner stop: SendCtrlAltDel → exit", took, f"limit {CAD_TIMEOUT} s")
    assert took < CAD_TIMEOUT
    assert _ps(outer)[started]["status"] == "stopped"
    assert _leftovers(outer, started) == {}


def test_rm_leaves_nothing_behind(outer: Outer, started: str):
    outer.ai("rm", started)
    assert outer.sh(f"test -e {INNER_STATE}/{started} && echo present || echo gone").stdout.strip() == "gone"
    assert started not in _ps(outer)
    assert _leftovers(outer, started) == {}
    assert outer.sh(f"cat {WS}/FILE").stdout == "hello from the outer guest\n"  # never the workspace


def test_auto_chooses_firecracker_where_kvm_works(outer: Outer):
    res = outer.ai("start", "--name", AUTO, "--workspace", WS, "--image", "minimal", "--vmm", "auto", "--detach",
                   "--cpus", "1", "--memory", "768")
    try:
        assert "boot (firecracker)" in step_seconds(res.stderr), res.stderr
        row = _ps(outer)[AUTO]
        assert (row["status"], row["vmm"]) == ("running", "firecracker"), row
        assert outer.ai("exec", "--name", AUTO, "--", "cat", "/workspace/FILE").stdout == "hello from the outer guest\n"
    finally:
        outer.ai("rm", "--force", AUTO, check=False)
    assert _leftovers(outer, AUTO) == {}
