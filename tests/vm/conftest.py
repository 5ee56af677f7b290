"""VM tier: boots real guests (KVM where usable, TCG here). Every sandbox runs inside a network namespace the
test made, whose only uplink leads to a fake internet host (203.0.113.10) in another namespace."""

from __future__ import annotations

import json
import os
import pwd
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from ai_sandbox.net.netns import FakeInternet, fake_internet, wait_for

AI = str(Path(sys.executable).with_name("ai"))


def pytest_collection_modifyitems(items):
    for item in items:
        if "tests/vm/" in str(item.fspath):
            item.add_marker(pytest.mark.vm)


@pytest.fixture(scope="session", autouse=True)
def _root():
    if os.geteuid() != 0:
        pytest.skip("the vm tier needs root (TAP devices, nftables, network namespaces)")


@pytest.fixture(scope="session")
def minimal_image() -> dict[str, str]:
    """Built in the main namespace (it needs the Debian mirror); sandboxes then reuse it from the cache."""
    out = subprocess.run([AI, "build", "--image", "minimal", "--json"], capture_output=True, text=True, timeout=1800)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout)


@pytest.fixture(scope="module")
def topo():
    with fake_internet() as t:
        yield t


@pytest.fixture(scope="module")
def monkeypatch_module():
    """Environment changes for one module's shared sandbox, undone after it."""
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


@pytest.fixture(scope="module")
def state_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("state")


class Ai:
    """Runs the `ai` command as a user would, inside the test's sandbox-host namespace."""

    def __init__(self, topo: FakeInternet, state: Path, env: dict[str, str] | None = None) -> None:
        self.topo, self.state, self.env = topo, state, env or {}

    def __call__(self, *args: str, cwd: Path | None = None, check: bool = True, timeout: float = 600,
                 input: str | None = None) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, **self.env, "AI_SANDBOX_STATE": str(self.state), "COLUMNS": "200"}
        res = subprocess.run(["ip", "netns", "exec", self.topo.host.name, AI, *args], cwd=cwd, env=env, text=True,
                             capture_output=True, timeout=timeout, input=input)
        if check and res.returncode != 0:
            raise AssertionError(f"ai {' '.join(args)} exited {res.returncode}:\n{res.stdout}\n{res.stderr}")
        return res

    def host(self, *argv: str) -> str:
        return subprocess.run(["ip", "netns", "exec", self.topo.host.name, *argv], capture_output=True, text=True,
                              check=True).stdout

    def as_sudo(self, user: pwd.struct_passwd, *args: str, **kw) -> subprocess.CompletedProcess[str]:
        """`ai` as `sudo ./ai` run by `user` starts it: root, with that user's SUDO_UID/SUDO_GID/SUDO_USER."""
        sudo = {"SUDO_UID": str(user.pw_uid), "SUDO_GID": str(user.pw_gid), "SUDO_USER": user.pw_name,
                "SUDO_COMMAND": AI}
        return Ai(self.topo, self.state, {**self.env, **sudo})(*args, **kw)


@pytest.fixture(scope="module")
def ai(topo, state_dir) -> Ai:
    runner = Ai(topo, state_dir)
    yield runner
    runner("stop", "--all", check=False)


@pytest.fixture(scope="module")
def sudo_user() -> pwd.struct_passwd:
    """A real unprivileged user (no home, no login shell) standing behind `sudo ./ai`; removed after the module."""
    name = f"aisbt{os.getpid() % 100000}"
    subprocess.run(["useradd", "--no-create-home", "--shell", "/usr/sbin/nologin", name], check=True)
    try:
        yield pwd.getpwnam(name)
    finally:
        subprocess.run(["userdel", name], capture_output=True)


@dataclass
class DefaultBox:
    ai: Ai
    name: str
    artifacts: dict[str, str]
    provider_log: Path  # one JSON line per request the fake providers saw


@pytest.fixture(scope="session")
def default_box(tmp_path_factory) -> DefaultBox:
    """One sandbox of the default image in proxy mode, shared by test_default_image and test_agents (its boot is
    the dearest of the tier). Provider names lead to fake providers in the fake internet (fake_providers.py)."""
    import fake_providers as fp

    res = subprocess.run([AI, "build", "--skip-optional", "--json"], capture_output=True, text=True, timeout=3600)
    assert res.returncode == 0, res.stderr[-3000:]
    d = tmp_path_factory.mktemp("default-box")
    ca, leaf, key = fp.make_pki(d)
    log = d / "providers.jsonl"
    log.write_text("")
    with fake_internet() as topo:
        proc = topo.internet.python(fp.SERVER, str(leaf), str(key), str(log), fp.ANSWER, fp.ADDRESS,
                                    log_name="providers.log")
        try:
            wait_for(lambda: "listening" in (topo.internet.workdir / "providers.log").read_text(), "fake providers")
            runner = Ai(topo, d / "state", env=fp.proxy_env(ca))
            (d / "ws").mkdir()
            t0 = time.monotonic()
            runner("start", "--name", "dflt", "--workspace", str(d / "ws"), "--image", "default", "--skip-optional",
                   "--detach", "--cpus", "2", "--memory", "3072", "--network", "proxy", timeout=1200)
            print(f"default image: ai start took {time.monotonic() - t0:.0f}s")
            try:
                yield DefaultBox(runner, "dflt", json.loads(res.stdout), log)
            finally:
                runner("rm", "--force", "dflt", check=False)
        finally:
            proc.terminate()
            proc.wait(timeout=10)
