"""Sandbox start: time from `ai start` to the first `ai exec` answer, and the VMM's host memory (RSS, PSS).

Usage (root): python benchmarks/start.py [--image minimal]. Runs inside throwaway test network namespaces (the
uplink leads only to a fake internet namespace), names the machine and accelerator, removes the sandbox after.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ai_sandbox.net.netns import fake_internet
from ai_sandbox.vmm.kvm import kvm_unusable

AI = str(Path(sys.executable).with_name("ai"))


def _mem_kib(pid: int) -> dict[str, int]:
    out = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        key, _, val = line.partition(":")
        if key in ("Rss", "Pss"):
            out[key.lower() + "_mib"] = int(val.split()[0]) // 1024
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--image", default="minimal")
    ap.add_argument("--memory", default="1024")
    args = ap.parse_args()
    subprocess.run([AI, "build", "--image", args.image], check=True, capture_output=True)
    topo_cm = fake_internet()  # the sandbox host namespace; its only uplink leads to a test namespace
    ns = topo_cm.__enter__().host.name
    state = tempfile.mkdtemp(prefix="ai-bench-state-")
    ws = tempfile.mkdtemp(prefix="ai-bench-ws-")
    env = {**os.environ, "AI_SANDBOX_STATE": state}

    def ai(*a: str) -> None:
        res = subprocess.run(["ip", "netns", "exec", ns, AI, *a], capture_output=True, text=True, env=env)
        if res.returncode != 0:
            raise SystemExit(f"ai {' '.join(a)} failed: {res.stderr.strip()}")

    try:
        t0 = time.monotonic()
        ai("start", "--name", "bench", "--workspace", ws, "--image", args.image, "--detach", "--memory", args.memory)
        ai("exec", "--name", "bench", "--", "true")
        first_exec = time.monotonic() - t0
        t1 = time.monotonic()
        ai("exec", "--name", "bench", "--", "true")
        warm_exec = time.monotonic() - t1
        pid = int(Path(state, "bench", "vmm.pid").read_text())
        mem = _mem_kib(pid)
    finally:
        subprocess.run(["ip", "netns", "exec", ns, AI, "rm", "--force", "bench"], env=env, capture_output=True)
        topo_cm.__exit__(None, None, None)
    print(json.dumps({
        "machine": f"{os.uname().machine} {os.cpu_count()} CPUs", "accelerator": "tcg" if kvm_unusable() else "kvm",
        "guest_memory_mib": int(args.memory), "start_to_first_exec_s": round(first_exec, 1),
        "warm_exec_s": round(warm_exec, 2), "first_over_warm": round(first_exec / warm_exec, 1),
        "vmm_" + "rss_mib": mem.get("rss_mib"), "vmm_pss_mib": mem.get("pss_mib"),
        "vmm_rss_over_guest_memory": round(mem.get("rss_mib", 0) / int(args.memory), 2),
    }, indent=2))


if __name__ == "__main__":
    main()
