"""Workspace speed: sequential write/read, 5,000 small files created and read, `git status` on a 10,000-file tree,
on the host vs inside a sandbox with virtiofs, sftp and copy — measured side by side in one run, as ratios.

Usage (root): python benchmarks/workspace.py [--image minimal]. Sandboxes run in test network namespaces.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from ai_sandbox.net.netns import fake_internet

AI = str(Path(sys.executable).with_name("ai"))
# Runs the same way on the host and in the guest; prints one JSON line of seconds.
PROBE = r"""
import json, os, subprocess, sys, time
root = sys.argv[1]; out = {}
def t(name, fn):
    t0 = time.monotonic(); fn(); out[name] = round(time.monotonic() - t0, 3)
big = os.path.join(root, "big.bin"); block = os.urandom(1 << 20)
def write():
    with open(big, "wb") as f:
        for _ in range(64): f.write(block)
        f.flush(); os.fsync(f.fileno())
def read():
    with open(big, "rb") as f:
        while f.read(1 << 20): pass
small = os.path.join(root, "small")
def create():
    os.makedirs(small, exist_ok=True)
    for i in range(5000):
        with open(os.path.join(small, f"f{i}"), "w") as f: f.write("x" * 100)
def read_small():
    for i in range(5000):
        with open(os.path.join(small, f"f{i}")) as f: f.read()
def git_status():
    subprocess.run(["git", "-C", os.path.join(root, "repo"), "status", "--porcelain"], check=True,
                   stdout=subprocess.DEVNULL)
t("seq_write_64MiB", write); t("seq_read_64MiB", read); t("create_5000", create); t("read_5000", read_small)
if os.path.isdir(os.path.join(root, "repo")): t("git_status_10000", git_status)
print(json.dumps(out))
"""


def make_repo(ws: Path) -> None:
    repo = ws / "repo"
    for i in range(10000):
        d = repo / f"d{i // 500}"
        d.mkdir(parents=True, exist_ok=True)
        (d / f"f{i}.txt").write_text(f"{i}\n")
    env = {**os.environ, "GIT_AUTHOR_NAME": "b", "GIT_AUTHOR_EMAIL": "b@example.invalid",
           "GIT_COMMITTER_NAME": "b", "GIT_COMMITTER_EMAIL": "b@example.invalid"}
    for cmd in (["init", "-q"], ["add", "-A"], ["commit", "-q", "-m", "tree"]):
        subprocess.run(["git", "-C", str(repo), *cmd], check=True, env=env)
    subprocess.run(["git", "config", "--global", "--add", "safe.directory", "*"], check=False)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--image", default="minimal")
    image = ap.parse_args().image
    subprocess.run([AI, "build", "--image", image], check=True, capture_output=True)
    results: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory(prefix="ai-bench-ws-", dir="/var/tmp") as tmp:
        host_ws = Path(tmp, "host")
        host_ws.mkdir()
        make_repo(host_ws)
        probe = subprocess.run([sys.executable, "-c", PROBE, str(host_ws)], capture_output=True, text=True, check=True)
        results["host"] = json.loads(probe.stdout)
        state = Path(tmp, "state")
        env = {**os.environ, "AI_SANDBOX_STATE": str(state)}
        with fake_internet() as topo:
            for mode in ("virtiofs", "sftp", "copy"):
                ws = Path(tmp, mode)
                ws.mkdir()
                make_repo(ws)
                (ws / "probe.py").write_text(PROBE)
                base = ["ip", "netns", "exec", topo.host.name, AI]
                subprocess.run([*base, "start", "--name", f"b-{mode}", "--workspace", str(ws), "--image", image,
                                "--share", mode, "--detach", "--memory", "1024", "--network", "offline"],
                               check=True, capture_output=True, env=env)
                try:
                    res = subprocess.run([*base, "exec", "--name", f"b-{mode}", "--", "sh", "-c",
                                          "git config --global --add safe.directory '*'; "
                                          "python3 /workspace/probe.py /workspace"],
                                         capture_output=True, text=True, env=env)
                    results[mode] = json.loads(res.stdout.strip().splitlines()[-1]) if res.returncode == 0 else {
                        "error": res.stderr[-300:]}
                finally:
                    subprocess.run([*base, "rm", "--force", f"b-{mode}"], capture_output=True, env=env)
    ratios = {mode: {k: round(v / results["host"][k], 1) for k, v in r.items() if k in results["host"]}
              for mode, r in results.items() if mode != "host" and "error" not in r}
    print(json.dumps({"machine": f"{os.uname().machine} {os.cpu_count()} CPUs", "seconds": results,
                      "slowdown_vs_host": ratios}, indent=2))


if __name__ == "__main__":
    main()
