"""Helpers of the firecracker tier: the host's `ai` in the test namespace, the outer VM, timings."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from ai_sandbox.net.netns import FakeInternet

AI = str(Path(sys.executable).with_name("ai"))
OUTER = "fco"
INNER_STATE = "/root/.local/state/ai-sandbox"  # `ai` run as root in the outer guest keeps its sandboxes here

TIMINGS: dict[str, str] = {}  # stage → what was measured; printed in the terminal summary


def timed(stage: str, seconds: float, note: str = "") -> None:
    TIMINGS[stage] = f"{seconds:7.1f} s" + (f"  ({note})" if note else "")


def step_seconds(stderr: str) -> dict[str, float]:
    """The timed steps `ai` prints: '✓ boot (firecracker) (100.7s)' → {'boot (firecracker)': 100.7}."""
    return {m[1]: float(m[2]) for m in re.finditer(r"^[✓✗] (.+) \(([\d.]+)s\)$", stderr, re.M)}


class HostAi:
    """The host's `ai`, run inside the test's sandbox-host namespace."""

    def __init__(self, topo: FakeInternet, state: Path) -> None:
        self.topo, self.state = topo, state

    def __call__(self, *args: str, check: bool = True, timeout: float = 900) -> subprocess.CompletedProcess[str]:
        # The outer VM runs under TCG: its boot takes minutes on a busy host.
        env = {**os.environ, "AI_SANDBOX_STATE": str(self.state), "COLUMNS": "200", "AI_SANDBOX_BOOT_TIMEOUT": "900"}
        res = subprocess.run(["ip", "netns", "exec", self.topo.host.name, AI, *args], env=env, text=True,
                             capture_output=True, timeout=timeout)
        if check and res.returncode != 0:
            raise AssertionError(f"host: ai {' '.join(args)} exited {res.returncode}:\n{res.stdout}\n{res.stderr}")
        return res


class Outer:
    """The outer test VM: commands run there as root through the host's `ai exec`."""

    def __init__(self, host_ai: HostAi) -> None:
        self.host_ai = host_ai

    @property
    def console_log(self) -> Path:
        return self.host_ai.state / OUTER / "console.log"

    def sh(self, script: str, *, check: bool = True, timeout: float = 900) -> subprocess.CompletedProcess[str]:
        """A shell script as root in the outer guest."""
        res = self.host_ai("exec", "--name", OUTER, "--", "sudo", "sh", "-c", script, check=False, timeout=timeout)
        if check and res.returncode != 0:
            raise AssertionError(f"outer guest: {script!r} exited {res.returncode}:\n{res.stdout}\n{res.stderr}")
        return res

    def ai(self, *args: str, check: bool = True, timeout: float = 900) -> subprocess.CompletedProcess[str]:
        """The project's `ai`, run by root in the outer guest (the inner sandboxes need TAP and nftables)."""
        res = self.host_ai("exec", "--name", OUTER, "--", "sudo", "ai", *args, check=False, timeout=timeout)
        if check and res.returncode != 0:
            raise AssertionError(f"outer guest: ai {' '.join(args)} exited {res.returncode}:\n{res.stdout}\n{res.stderr}")
        return res

    def inner_logs(self) -> str:
        """Firecracker's log, the guest console and the share log of every inner sandbox."""
        script = (f"for d in {INNER_STATE}/*/; do for f in vmm.log console.log share.log; do "
                  '[ -f "$d$f" ] && { echo "===== $d$f"; tail -c 12000 "$d$f"; echo; }; done; done; true')
        res = self.sh(script, check=False, timeout=300)
        return res.stdout + res.stderr
