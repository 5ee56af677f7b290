"""Issue: the `default` recipe yields a guest where every listed tool prints a version at least the seed's (Go 1.22,
Rust 1.75, Node 22, Python 3.11), hello-world builds with go, cargo, npm and pip work with no network, and dockerd
runs a container and pulls through the sandbox's proxy. CI builds with --skip-optional: the ChatGPT CLI's Go
sources are outside the registries our machines reach. The sandbox is `default_box` (conftest.py), shared with
test_agents.py."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest

TOOLS = {
    "claude": "claude --version", "opencode": "opencode --version", "gemini": "gemini --version",
    "codex": "codex --version", "gh": "gh --version", "git": "git --version", "go": "go version",
    "python3": "python3 --version", "rustc": "rustc --version", "cargo": "cargo --version",
    "node": "node --version", "docker": "docker --version",
}
MINIMUM = {"go": (1, 22), "rustc": (1, 75), "node": (22, 0), "python3": (3, 11)}
# Builds must not need the network: the proxy is taken out of their environment and each tool is told to stay offline.
OFFLINE = "unset HTTP_PROXY HTTPS_PROXY http_proxy https_proxy; export GOPROXY=off GOTOOLCHAIN=local GOFLAGS=-mod=mod; "
HELLO_GO = 'package main\n\nimport "fmt"\n\nfunc main() { fmt.Println("hello from go") }\n'


def sh(box, cmd: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    """As the sandbox user in a login shell (the environment an agent or a developer gets)."""
    return box.ai("exec", "--name", box.name, "--", "bash", "-lc", cmd, check=False, timeout=timeout)


def version(text: str) -> tuple[int, int]:
    m = re.search(r"(\d+)\.(\d+)", text)
    assert m, text
    return int(m.group(1)), int(m.group(2))


def test_manifest_leaves_out_only_the_optional_tool(default_box):
    manifest = json.loads(Path(default_box.artifacts["manifest"]).read_text())
    assert manifest["missing_optional"] == ["chatgpt"] and manifest["suite"] == "trixie"


def test_every_tool_prints_a_version_at_least_the_seeds(default_box):
    failures, found = {}, {}
    for tool, cmd in TOOLS.items():
        res = sh(default_box, cmd, timeout=300)
        out = (res.stdout + res.stderr).strip()
        if res.returncode != 0 or not re.search(r"\d+\.\d+", out):
            failures[tool] = f"exit {res.returncode}: {out[-300:]}"
        else:
            found[tool] = out.splitlines()[0]
    assert failures == {}
    print("versions:", json.dumps(found, indent=1))
    low = {t: found[t] for t, least in MINIMUM.items() if version(found[t].replace("go version go", "")) < least}
    assert low == {}


def test_go_builds_hello_world_offline(default_box):
    res = sh(default_box, OFFLINE + f"mkdir -p /tmp/hw-go && cd /tmp/hw-go && printf %b {json.dumps(HELLO_GO)} > main.go"
                          " && go mod init example.com/hello && go build -o hello . && ./hello")
    assert res.returncode == 0 and res.stdout.strip().endswith("hello from go"), res.stdout + res.stderr


def test_cargo_builds_hello_world_offline(default_box):
    res = sh(default_box, OFFLINE + "cd /tmp && cargo new --vcs none --offline hw-rs && cd hw-rs"
                          " && cargo build --offline && ./target/debug/hw-rs")
    assert res.returncode == 0 and res.stdout.strip().endswith("Hello, world!"), res.stdout + res.stderr


def test_npm_packs_and_installs_hello_world_offline(default_box):
    res = sh(default_box, OFFLINE + "mkdir -p /tmp/hwnpm && cd /tmp/hwnpm && npm init -y >/dev/null"
                          " && echo 'module.exports = () => \"hello from npm\";' > index.js && npm pack --offline"
                          " && mkdir -p /tmp/hwnpm-use && cd /tmp/hwnpm-use && npm init -y >/dev/null"
                          " && npm install --offline --no-audit --no-fund /tmp/hwnpm/hwnpm-1.0.0.tgz"
                          " && node -e 'console.log(require(\"hwnpm\")())'")
    assert res.returncode == 0 and res.stdout.strip().endswith("hello from npm"), res.stdout + res.stderr


def test_pip_builds_and_installs_hello_world_offline(default_box):
    # A venv gets pip from Debian's bundled wheel, setuptools from the one Debian ships; nothing comes from an index.
    pyproject = ('[build-system]\\nrequires = [\\"setuptools\\"]\\nbuild-backend = \\"setuptools.build_meta\\"\\n'
                 '[project]\\nname = \\"hwpkg\\"\\nversion = \\"0.1\\"\\n')
    res = sh(default_box, OFFLINE + "mkdir -p /tmp/hw-py/hwpkg && cd /tmp/hw-py"
                          f' && printf "{pyproject}" > pyproject.toml'
                          " && echo 'def hello(): return \"hello from pip\"' > hwpkg/__init__.py"
                          " && python3 -m venv /tmp/hw-venv && . /tmp/hw-venv/bin/activate"
                          " && pip install -q --no-index /usr/share/python-wheels/setuptools-*.whl"
                          " && pip install -q --no-index --no-build-isolation . && cd /"
                          " && python -c 'import hwpkg; print(hwpkg.hello())'")
    assert res.returncode == 0 and res.stdout.strip().endswith("hello from pip"), res.stdout + res.stderr


@pytest.mark.parametrize("var", ["HTTPS_PROXY", "HTTP_PROXY"])
def test_dockerd_uses_the_sandbox_proxy(default_box, var):
    want = sh(default_box, "echo $https_proxy").stdout.strip()
    assert want.startswith("http://") and want.endswith(":3128")
    field = {"HTTPS_PROXY": "HTTPSProxy", "HTTP_PROXY": "HTTPProxy"}[var]
    res = sh(default_box, f"docker info --format '{{{{.{field}}}}}'", timeout=300)
    assert res.returncode == 0 and res.stdout.strip() == want, res.stdout + res.stderr


def test_docker_imports_and_runs_an_image_made_here(default_box):
    # The image is one static Go binary built in the guest: no registry is involved.
    res = sh(default_box, OFFLINE + "mkdir -p /tmp/hw-img/rootfs && cd /tmp/hw-img"
                          f" && printf %b {json.dumps(HELLO_GO)} > main.go && go mod init example.com/img"
                          " && CGO_ENABLED=0 go build -o rootfs/hello . && tar -C rootfs -cf hello.tar hello"
                          " && docker import hello.tar ai-sandbox-test/hello:1 >/dev/null"
                          " && docker run --rm ai-sandbox-test/hello:1 /hello", timeout=900)
    assert res.returncode == 0 and res.stdout.strip().endswith("hello from go"), res.stdout + res.stderr
    ps = sh(default_box, "systemctl is-active docker.service")
    assert ps.stdout.strip() == "active"
