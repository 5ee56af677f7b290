"""Firecracker tier: a real Firecracker runs our `minimal` image, nested in an outer test VM.

Our hosts' /dev/kvm cannot run guests, but QEMU TCG with `-cpu max` gives its guest AMD SVM, and nested KVM works
there. So this tier builds an outer VM with the project's own machinery (recipe `fc-outer`), starts it with the host's
`ai` on QEMU inside a test network namespace, brings in the project, the Firecracker binary and the prebuilt inner
image through its workspace share (fc_payload.py), and runs `ai` inside it, as root, the way a user would.

Needs AI_TEST_FIRECRACKER_BIN (a Firecracker binary; AI_TEST_JAILER_BIN optional) and root; skipped otherwise.
Timings of each stage are printed at the end of the run; after a failure the inner sandboxes' Firecracker log,
guest console and share log and the outer console are printed, and also kept in $AI_TEST_FC_KEEP_LOGS if set.

    sudo AI_TEST_FIRECRACKER_BIN=/path/to/firecracker tests/run -m firecracker     # 10-20 min under TCG
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from ai_sandbox import paths
from ai_sandbox.net.netns import fake_internet

sys.path.insert(0, str(Path(__file__).resolve().parent))
import fc_payload  # noqa: E402
from fc_tier import AI, OUTER, TIMINGS, HostAi, Outer, step_seconds, timed  # noqa: E402

FC_ENV = "AI_TEST_FIRECRACKER_BIN"
JAILER_ENV = "AI_TEST_JAILER_BIN"
OUTER_CPUS, OUTER_MEMORY = "2", "3072"


def pytest_collection_modifyitems(items):
    for item in items:
        if "tests/firecracker/" in str(item.fspath):
            item.add_marker(pytest.mark.firecracker)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    setattr(item, f"rep_{rep.when}", rep)


def pytest_terminal_summary(terminalreporter):
    if TIMINGS:
        terminalreporter.section("firecracker tier: timings")
        for stage, value in TIMINGS.items():
            terminalreporter.write_line(f"{stage:38} {value}")


@dataclass(frozen=True)
class Binaries:
    firecracker: Path
    jailer: Path | None
    version: str


@pytest.fixture(scope="session", autouse=True)
def fc_binaries() -> Binaries:
    fc = os.environ.get(FC_ENV)
    if not fc:
        pytest.skip(f"{FC_ENV} is not set: the firecracker tier needs a Firecracker binary (and root) to run")
    if os.geteuid() != 0:
        pytest.skip("the firecracker tier needs root (network namespaces, TAP devices, nftables)")
    path = Path(fc)
    if not (path.is_file() and os.access(path, os.X_OK)):
        pytest.fail(f"{FC_ENV}={fc} is not an executable file")
    version = subprocess.run([str(path), "--version"], capture_output=True, text=True, timeout=30).stdout
    jailer = Path(os.environ[JAILER_ENV]) if os.environ.get(JAILER_ENV) else None
    TIMINGS["firecracker"] = version.splitlines()[0] if version else "(no --version output)"
    return Binaries(path, jailer, TIMINGS["firecracker"])


def _build(image: str) -> tuple[dict[str, str], float, str]:
    t0 = time.monotonic()
    out = subprocess.run([AI, "build", "--image", image, "--json"], capture_output=True, text=True, timeout=3600)
    assert out.returncode == 0, out.stderr[-3000:]
    ran = [s for s in step_seconds(out.stderr) if s.startswith(f"{image}: ")]
    return json.loads(out.stdout), time.monotonic() - t0, f"built {len(ran)} stages" if ran else "all reused"


@pytest.fixture(scope="session")
def images() -> dict[str, dict[str, str]]:
    """Both images, built in the main namespace (they need the Debian mirror); the VMs then only use them."""
    inner, secs, note = _build("minimal")
    timed("inner image build (minimal)", secs, note)
    outer, secs, note = _build("fc-outer")
    timed("outer image build (fc-outer)", secs, note)
    return {"minimal": inner, "fc-outer": outer}


@pytest.fixture(scope="session")
def workspace(tmp_path_factory, images, fc_binaries) -> Path:
    t0 = time.monotonic()
    ws = tmp_path_factory.mktemp("fcws")
    site = fc_payload.python_site(paths.cache_dir() / "fc-tier")
    fc_payload.build(ws, inner_manifest=Path(images["minimal"]["manifest"]), firecracker=fc_binaries.firecracker,
                     jailer=fc_binaries.jailer, site=site)
    timed("payload (host)", time.monotonic() - t0)
    return ws


def _keep_dir() -> Path | None:
    keep = os.environ.get("AI_TEST_FC_KEEP_LOGS")
    if not keep:
        return None
    Path(keep).mkdir(parents=True, exist_ok=True)
    return Path(keep)


@pytest.fixture(scope="session")
def topo():
    with fake_internet() as t:
        yield t


@pytest.fixture(scope="session")
def outer(tmp_path_factory, topo, workspace) -> Outer:
    """The outer VM, booted by the host's `ai` on QEMU (TCG, `-cpu max`, tsc_early_khz) and set up for the tier."""
    host_ai = HostAi(topo, tmp_path_factory.mktemp("fcstate"))
    vm = Outer(host_ai)
    t0 = time.monotonic()
    res = host_ai("start", "--name", OUTER, "--workspace", str(workspace), "--image", "fc-outer", "--vmm", "qemu",
                  "--cpus", OUTER_CPUS, "--memory", OUTER_MEMORY, "--detach", check=False, timeout=1200)
    if res.returncode != 0:
        tail = vm.console_log.read_text(errors="replace")[-6000:] if vm.console_log.exists() else ""
        host_ai("rm", "--force", OUTER, check=False)
        pytest.fail(f"the outer VM did not start:\n{res.stderr}\n--- outer console ---\n{tail}")
    boot = step_seconds(res.stderr).get("boot (qemu)", 0.0)
    timed("outer VM start (ai start, qemu)", time.monotonic() - t0, f"boot step {boot:.1f} s")
    try:
        t0 = time.monotonic()
        out = vm.sh("/workspace/guest-setup.sh", timeout=1200)
        timed("outer guest setup", time.monotonic() - t0, out.stdout.strip().splitlines()[-1])
        yield vm
    finally:
        if (keep := _keep_dir()) and vm.console_log.exists():
            shutil.copy(vm.console_log, keep / "outer-console.log")
        host_ai("rm", "--force", OUTER, check=False)


@pytest.fixture(autouse=True)
def _logs_on_failure(request):
    """After a failed test: the inner sandboxes' logs and the outer console, printed (and kept if asked)."""
    yield
    rep = getattr(request.node, "rep_call", None)
    if rep is None or not rep.failed or "outer" not in request.fixturenames:
        return
    vm: Outer = request.getfixturevalue("outer")
    text = vm.inner_logs()
    if vm.console_log.exists():
        text += "\n===== outer console (tail)\n" + vm.console_log.read_text(errors="replace")[-6000:]
    print(text)
    if keep := _keep_dir():
        (keep / f"{request.node.name}.log").write_text(text)
