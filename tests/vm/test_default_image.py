"""Issue: the `default` recipe yields a guest where every listed tool prints a version (CI builds it with
--skip-optional: the ChatGPT CLI's Go sources are outside the registries our machines reach)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

AI = str(Path(sys.executable).with_name("ai"))
TOOLS = {
    "claude": "claude --version", "opencode": "opencode --version", "gemini": "gemini --version",
    "codex": "codex --version", "gh": "gh --version", "git": "git --version", "go": "go version",
    "python3": "python3 --version", "rustc": "rustc --version", "cargo": "cargo --version",
    "node": "node --version", "docker": "docker --version",
}


@pytest.fixture(scope="module")
def default_image():
    res = subprocess.run([AI, "build", "--skip-optional", "--json"], capture_output=True, text=True, timeout=3600)
    assert res.returncode == 0, res.stderr[-3000:]
    arts = json.loads(res.stdout)
    manifest = json.loads(Path(arts["manifest"]).read_text())
    assert manifest["missing_optional"] == ["chatgpt"]
    return arts


def test_every_tool_prints_a_version(ai, default_image, tmp_path):
    ai("start", "--name", "dflt", "--workspace", str(tmp_path), "--image", "default", "--skip-optional", "--detach",
       "--cpus", "2", "--memory", "3072")
    try:
        failures = {}
        for tool, cmd in TOOLS.items():
            res = ai("exec", "--name", "dflt", "--", "bash", "-lc", cmd, check=False, timeout=300)
            out = (res.stdout + res.stderr).strip()
            if res.returncode != 0 or not re.search(r"\d+\.\d+", out):
                failures[tool] = f"exit {res.returncode}: {out[-300:]}"
            if tool == "node":
                assert int(out.lstrip("v").split(".")[0]) >= 22, out
        assert failures == {}
    finally:
        ai("rm", "--force", "dflt", check=False)
